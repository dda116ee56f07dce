"""The unCLIP decoder (Ramesh et al. 2022, section 2.1): a latent-diffusion UNet that draws an image from a
CLIP image embedding, and the two ways to use it: text -> prior -> embedding -> image, and image variations
(image -> CLIP embedding -> new images).

The embedding reaches the UNet twice, as in the paper: ``ClipDecoderUNet`` projects it into ``clip_tokens``
extra context tokens that every cross-attention reads beside the embedding itself, and the UNet's pooled
context (``pooled_context``, the mean of those tokens projected) adds it to the timestep embedding of every
ResBlock. For classifier-free guidance training replaces the embedding by zeros in ``cfg_drop`` of the
batch (the paper drops it 10% of the time); sampling guides from the zero embedding.

Training reuses the text UNet's machinery: ``attach_clip_embeddings`` puts the CLIP's image embedding of
each cached training image into the latent cache as that item's one-token "caption" (row N, zeros, is the
dropped one), so ``ldm.latent_cache.Batches`` draws and drops them as it does captions.

    python -m ldm.train_unet --cond clip-image --clip runs/clip --out runs/decoder
    pipe, clip = load_decoder("runs/decoder")
    images = generate_unclip(pipe, clip, load_prior("runs/prior")[0], ["a red circle ..."], n=4)
    images = variations(pipe, clip, source_images, n=4)          # (B * n, 3, H, W) in [-1, 1]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.errors import InputError
from ldm.unet import UNet, UNetConfig

COND = "clip-image"  # train_unet --cond, and unet.json's "conditioning"
CLIP_TOKENS = 4  # extra context tokens the embedding is projected into: the paper's four
EMBED_BATCH = 256  # images per CLIP forward while embedding the cache


class ClipDecoderUNet(UNet):
    """``unet(x, t, context (B, 1, D) CLIP image embeddings, context_lengths=None, ...)``: the UNet with
    ``context_dim`` D attending to [embedding, its ``clip_tokens`` projections] (B, 1 + K, D)."""

    def __init__(self, config: UNetConfig):
        if not config.clip_tokens or config.context_dim is None:
            raise ValueError("ClipDecoderUNet: needs clip_tokens > 0 and context_dim (the CLIP's embedding width)")
        super().__init__(config)
        self.clip_proj = nn.Linear(config.context_dim, config.clip_tokens * config.context_dim)

    def forward(self, x, t, context=None, context_lengths=None, **kwargs):
        D = self.config.context_dim
        if not isinstance(context, torch.Tensor) or context.dim() != 3 or context.shape[1:] != (1, D):
            got = tuple(context.shape) if isinstance(context, torch.Tensor) else context
            raise ValueError(f"ClipDecoderUNet: context must be CLIP image embeddings (B, 1, {D}), got {got}")
        B = context.shape[0]
        extra = self.clip_proj(context[:, 0]).view(B, self.config.clip_tokens, D)  # (B, K, D)
        tokens = torch.cat([context, extra.to(context.dtype)], 1)  # (B, 1 + K, D), every token valid
        return super().forward(x, t, tokens, None, **kwargs)


def build_unet(config: UNetConfig) -> UNet:
    """The model class ``config`` describes: the decoder when it has ``clip_tokens``, else the plain UNet."""
    return ClipDecoderUNet(config) if config.clip_tokens else UNet(config)


# --------------------------------------------------------------------------------------------- training
def check_train_config(c) -> None:
    """InputError for flags that do not combine with ``--cond clip-image`` (c: a TrainConfig)."""
    if c.cond is None:
        if c.clip is not None:
            raise InputError(f"--clip {c.clip} is for --cond {COND} (the decoder); train_unet takes no CLIP otherwise")
        return
    if c.cond != COND:
        raise InputError(f"--cond {c.cond}: expected {COND}")
    if c.clip is None:
        raise InputError(f"--cond {COND} needs --clip DIR (python -m ldm.train_clip) to embed the training images")
    clash = [flag for flag, on in (("--text", c.text), ("--class-cond", c.class_cond), ("--task", c.task),
                                   ("--init-from", c.init_from), ("--lora", c.lora), ("--buckets", c.buckets),
                                   ("--eval", c.eval)) if on]
    if clash:
        raise InputError(f"--cond {COND} conditions on the CLIP image embedding alone; it takes no {clash[0]}")
    from ldm.clip import load_clip

    try:  # before the output folder or the cache is touched
        load_clip(c.clip, load_text_encoder=False)
    except InputError as e:
        raise InputError(f"--clip: {e}") from None


def source_images(dataset, n: int) -> torch.Tensor:
    """Items 0..n-1 of ``dataset`` as (n, 3, H, W) float32 in [-1, 1]."""
    return torch.stack([dataset[i]["image"] for i in range(n)])


@torch.no_grad()
def embed_images(clip, images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> (N, D) unit-norm CLIP image embeddings, resized to the CLIP's side."""
    side = clip.config.resolution
    out = []
    for s in range(0, len(images), EMBED_BATCH):
        x = images[s:s + EMBED_BATCH].float()  # (b, 3, H, W)
        if x.shape[-1] != side or x.shape[-2] != side:
            x = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
        out.append(clip.encode_image(x).float().cpu())
    return torch.cat(out)


def attach_clip_embeddings(cache, clip_dir: str, dataset, n: int, val_count: int, device, quiet: bool = False
                           ) -> list[str]:
    """Embed the cache's n items with the CLIP in ``clip_dir`` and store them as its one-token captions
    (row n: the zero embedding that replaces a dropped one). Returns the validation rows' captions."""
    from ldm.clip import CLIP_NAME, load_clip
    from ldm.latent_cache import dataset_captions
    from ldm.pretrained import file_digest

    clip = load_clip(clip_dir, device, load_text_encoder=False)
    t0 = time.perf_counter()
    emb = embed_images(clip, source_images(dataset, n))  # (n, D)
    tokens = torch.cat([emb, torch.zeros(1, emb.shape[1])])[:, None]  # (n + 1, 1, D)
    dev = cache.mean.device
    cache.tokens = tokens.to(dev)
    cache.token_lengths = torch.ones(n + 1, dtype=torch.long, device=dev)  # (n + 1,)
    cache.caption_row = torch.arange(n, device=dev)  # (n,): item i's embedding is row i
    cache.empty_row = n
    count = min(val_count, n)
    cache.val_rows = torch.arange(count, device=dev)  # the grids redraw the first training items
    weights = Path(clip_dir) / f"{CLIP_NAME}.safetensors"
    cache.keys["clip"] = {"clip": str(Path(clip_dir).resolve()),
                          "sha256": file_digest(weights) if weights.is_file() else None}
    if not quiet:
        print(f"train_unet: {n} CLIP image embeddings ({emb.shape[1]} wide) in {time.perf_counter() - t0:.0f} s",
              file=sys.stderr)
    captions = dataset_captions(dataset, count)
    return [c or f"item {i}" for i, c in enumerate(captions)]


def decoder_fields(width: int) -> dict:
    """The UNetConfig fields of a decoder of ``width``-wide embeddings (beside the preset's)."""
    return {"context_dim": width, "clip_tokens": CLIP_TOKENS, "pooled_context": True}


# --------------------------------------------------------------------------------------------- sampling
def load_decoder(folder: str | Path, device="cpu", clip_dir: str | Path | None = None, text: bool = False):
    """-> (ldm.Pipeline of the decoder, its CLIP; ``text``: with the CLIP's text encoder, which the prior
    needs). An InputError says when ``folder`` is not a decoder."""
    from ldm.clip import load_clip
    from ldm.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(folder, device=device, load_text_encoder=False)
    if pipe.meta.get("conditioning") != COND or not pipe.unet.config.clip_tokens:
        raise InputError(f"--decoder {folder}: not an unCLIP decoder (its unet.json says conditioning "
                         f"{pipe.meta.get('conditioning')!r}); train one with python -m ldm.train_unet --cond {COND}")
    clip_dir = clip_dir or pipe.meta.get("clip")
    if clip_dir is None:
        raise InputError(f"--decoder {folder}: unet.json records no CLIP folder")
    return pipe, load_clip(clip_dir, device, load_text_encoder=text)


@torch.no_grad()
def decode_embeddings(pipe, emb: torch.Tensor, *, n: int = 1, **kwargs) -> torch.Tensor:
    """``n`` images of each embedding (E, D), embedding-major: (E * n, 3, H, W) in [-1, 1]. ``kwargs``:
    ``ldm.pipeline.generate``'s (steps, sampler, cfg, seed, batch_size...)."""
    from ldm.pipeline import generate

    D = pipe.unet.config.context_dim
    if emb.dim() != 2 or emb.shape[1] != D:
        raise InputError(f"the decoder takes ({D},)-wide CLIP embeddings, got {tuple(emb.shape)}")
    dev = pipe.device
    context = emb.float().to(dev)[:, None]  # (E, 1, D)
    lengths = torch.ones(len(emb), dtype=torch.long, device=dev)  # (E,)
    uncond = (torch.zeros(1, 1, D, device=dev), torch.ones(1, dtype=torch.long, device=dev))  # the dropped one
    return generate(pipe, [""] * len(emb), n=n, encoded=(context, lengths, uncond), **kwargs)


def generate_unclip(pipe, clip, prior, prompts: list[str], *, n: int = 1, prior_steps: int = 20, seed: int = 0,
                    **kwargs) -> torch.Tensor:
    """Text -> ``n`` prior samples of the image embedding per prompt -> one image each: (P * n, 3, H, W)."""
    from ldm.unclip import sample_prior

    if prior.config.embed_dim != pipe.unet.config.context_dim:
        raise InputError(f"the prior samples {prior.config.embed_dim}-wide embeddings, the decoder takes "
                         f"{pipe.unet.config.context_dim}-wide ones (another CLIP)")
    emb = sample_prior(prior, clip, list(prompts), steps=prior_steps, seed=seed, n=n)  # (P * n, D)
    return decode_embeddings(pipe, emb, n=1, seed=seed, **kwargs)


def variations(pipe, clip, images: torch.Tensor, *, n: int = 1, **kwargs) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] -> ``n`` new images of each one's CLIP embedding: (B * n, 3, H, W)."""
    return decode_embeddings(pipe, embed_images(clip, images), n=n, **kwargs)


# --------------------------------------------------------------------------------------------- ldm.sample
def add_arguments(p) -> None:
    """``ldm.sample``'s unCLIP flags."""
    g = p.add_argument_group("unCLIP (ldm.unclip_decoder)")
    g.add_argument("--decoder", default=None, metavar="DIR",
                   help=f"an unCLIP decoder (train_unet --cond {COND}); draws from CLIP image embeddings, which "
                        "--prior samples from the prompts or --variations takes from images")
    g.add_argument("--prior", default=None, metavar="DIR", help="with --decoder: the diffusion prior (train_prior)")
    g.add_argument("--variations", action="append", default=None, metavar="IMAGE",
                   help="with --decoder: draw --n new images of this image's CLIP embedding (repeat for more)")
    g.add_argument("--prior-steps", type=int, default=20, help="sampler steps of the prior (default 20)")


def wanted(args) -> bool:
    return bool(args.decoder or args.prior or args.variations)


def check_args(args) -> None:
    if args.decoder is None:
        raise InputError(f"--{'prior' if args.prior else 'variations'} needs --decoder DIR (an unCLIP decoder)")
    if bool(args.prior) == bool(args.variations):
        raise InputError("--decoder draws either from the prompts through --prior DIR or from --variations IMAGE; "
                         "give one of them")
    has_prompts = bool(args.prompt or args.prompts_file)
    if args.prior and not has_prompts:
        raise InputError("--prior needs prompts: pass --prompt TEXT or --prompts-file FILE")
    if args.variations and has_prompts:
        raise InputError("--variations draws from the image alone; it takes no --prompt")
    clash = [f for f, on in (("--task", args.task), ("--init-image", args.init_image), ("--clip", args.clip),
                             ("--upscaler", args.upscaler), ("--class", args.classes), ("--lora", args.lora),
                             ("--from-diffusers", args.from_diffusers)) if on]
    if clash:
        raise InputError(f"--decoder takes no {clash[0]}")
    if args.prior_steps <= 0:
        raise InputError(f"--prior-steps must be positive, got {args.prior_steps}")
    for path in args.variations or []:
        if not Path(path).is_file():
            raise InputError(f"--variations: file not found: {path}")


def run_sample(args, device, prompts_of) -> tuple[torch.Tensor, list[str], int]:
    """-> (images (R * per_row, 3, H, W), row labels, per_row) for ``ldm.sample``; ``prompts_of(pipe)``
    reads --prompt / --prompts-file."""
    from ldm.pipeline import load_image

    check_args(args)
    pipe, clip = load_decoder(args.decoder, device, text=bool(args.prior))
    kwargs = dict(steps=args.steps or pipe.defaults.steps, sampler=args.sampler or pipe.defaults.sampler,
                  cfg=args.cfg if args.cfg is not None else pipe.defaults.cfg, batch_size=args.batch_size,
                  spacing=args.spacing, progress=args.progress)
    if args.prior:
        from ldm.unclip import load_prior

        prior, _ = load_prior(args.prior)
        prompts = prompts_of(pipe)
        images = generate_unclip(pipe, clip, prior, prompts, n=args.n, prior_steps=args.prior_steps, seed=args.seed,
                                 **kwargs)
        return images, prompts, args.n
    sources = torch.stack([load_image(p, pipe.resolution, what=f"--variations {p}") for p in args.variations])
    drawn = variations(pipe, clip, sources, n=args.n, seed=args.seed, **kwargs)  # (S * n, 3, H, W)
    rows = [torch.cat([src[None], drawn[i * args.n:(i + 1) * args.n]]) for i, src in enumerate(sources)]
    labels = [f"variations of {Path(p).name} (first)" for p in args.variations]
    return torch.cat(rows), labels, args.n + 1


# --------------------------------------------------------------------------------------------- scores
def evaluate_unclip(pipe, clip, prior, n: int, *, seed: int = 0, prior_steps: int = 20, **kwargs) -> dict:
    """eval_text's first ``n`` held-out prompts through the prior and the decoder, one image each, read
    back by the attribute reader: {"n", "seconds", share per attribute and combination}."""
    from ldm.metrics import PROMPT_SEED, score
    from ldm.data.shapes import eval_prompts

    pairs = eval_prompts(n, PROMPT_SEED)
    t0 = time.perf_counter()
    images = generate_unclip(pipe, clip, prior, [p for _, p in pairs], n=1, prior_steps=prior_steps, seed=seed,
                             **kwargs)  # (n, 3, H, W)
    shares, _ = score(images, [a for a, _ in pairs])
    return {"n": n, "seconds": round(time.perf_counter() - t0, 1), **shares, "images": images}


def evaluate_variations(pipe, clip, n: int, *, seed: int = 0, **kwargs) -> dict:
    """The renders of eval_text's first ``n`` held-out prompts' attributes as sources, one variation each:
    the share of variations whose reader-read attributes match the source's."""
    from ldm.data.shapes import eval_prompts, render, to_tensor
    from ldm.metrics import PROMPT_SEED, score

    pairs = eval_prompts(n, PROMPT_SEED)
    sources = torch.stack([to_tensor(render(a, pipe.resolution)) for a, _ in pairs])  # (n, 3, H, W)
    t0 = time.perf_counter()
    images = variations(pipe, clip, sources, n=1, seed=seed, **kwargs)  # (n, 3, H, W)
    shares, _ = score(images, [a for a, _ in pairs])
    return {"n": n, "seconds": round(time.perf_counter() - t0, 1), **shares, "images": images, "sources": sources}


def add_eval_arguments(p) -> None:
    """``ldm.eval_text``'s unCLIP flags."""
    g = p.add_argument_group("unCLIP (ldm.unclip_decoder)")
    g.add_argument("--decoder", default=None, metavar="DIR",
                   help="score an unCLIP decoder (train_unet --cond clip-image) instead of --unet: through --prior, "
                        "or its --variations of the held-out prompts' renders")
    g.add_argument("--prior", default=None, metavar="DIR", help="with --decoder: the prior (train_prior)")
    g.add_argument("--variations", action="store_true",
                   help="with --decoder: one variation of each held-out scene's render, scored against its attributes")


def run_eval(args) -> int:
    """``ldm.eval_text --decoder DIR (--prior DIR | --variations)``: one table row, --json, --grid."""
    from ldm.checkpoint import save_json
    from ldm.distributed import resolve_device
    from ldm.metrics import ATTRIBUTES, HEADLINE
    from ldm.runlog import image_grid

    if args.decoder is None:
        raise InputError(f"--{'prior' if args.prior else 'variations'} needs --decoder DIR (an unCLIP decoder)")
    if bool(args.prior) == bool(args.variations):
        raise InputError("--decoder is scored either through --prior DIR or with --variations; give one of them")
    if args.n <= 0 or args.batch_size <= 0 or args.steps <= 0:
        raise InputError("--n, --batch-size and --steps must be positive")
    if args.guide_clip or args.sampler and len(args.sampler) > 1:
        raise InputError("--decoder takes no --guide-clip and one --sampler NAME[:STEPS]")
    sampler, _, steps = (args.sampler[0] if args.sampler else f"unipc:{args.steps}").partition(":")
    device = resolve_device(args.device)
    pipe, clip = load_decoder(args.decoder, device, text=bool(args.prior))
    cfg = args.cfg if args.cfg is not None else pipe.defaults.cfg
    kwargs = dict(steps=int(steps or args.steps), sampler=sampler, cfg=cfg, seed=args.seed, batch_size=args.batch_size)
    if args.prior:
        from ldm.unclip import load_prior

        prior = load_prior(args.prior)[0]
        r = evaluate_unclip(pipe, clip, prior, args.n, **kwargs)
    else:
        r = evaluate_variations(pipe, clip, args.n, **kwargs)
    if args.clip:  # the CLIP score of eval_text --clip: each image against its prompt (its source's caption)
        from ldm.clip import clip_score, load_clip
        from ldm.data.shapes import eval_prompts
        from ldm.metrics import PROMPT_SEED

        prompts = [t for _, t in eval_prompts(args.n, PROMPT_SEED)]
        r["clip_score"] = clip_score(load_clip(args.clip, device), r["images"], prompts).mean().item()
    if args.grid:
        shown = r["images"][:20] if args.prior else torch.cat([r["sources"][:20], r["images"][:20]])
        image_grid(shown, nrow=20).save(args.grid)
    r = {k: v for k, v in r.items() if k not in ("images", "sources")}
    what = "unCLIP (prior + decoder)" if args.prior else "variations (attributes of the source kept)"
    print(" ".join(f"{a:>10}" for a in ATTRIBUTES) + f" | {HEADLINE:>21} {'all':>6} | seconds")
    print(" ".join(f"{100 * r[a]:>9.1f}%" for a in ATTRIBUTES)
          + f" | {100 * r[HEADLINE]:>20.1f}% {100 * r['all']:>5.1f}% | {r['seconds']:.1f}"
          + (f" | CLIP score {r['clip_score']:.4f}" if "clip_score" in r else ""))
    print(f"{what}: {args.n} held-out prompts of the built-in shapes, {sampler} {kwargs['steps']} steps, cfg {cfg}, "
          f"seed {args.seed}, decoder {args.decoder}")
    if args.diversity:  # K images of each of the first P prompts (each its own prior sample) or sources
        from ldm.data.shapes import render, to_tensor
        from ldm.diversity import evaluate_diversity, report, vae_codec

        def draw(pairs, k):
            if args.prior:
                return generate_unclip(pipe, clip, prior, [t for _, t in pairs], n=k, **kwargs)
            sources = torch.stack([to_tensor(render(a, pipe.resolution)) for a, _ in pairs])  # (P, 3, H, W)
            return variations(pipe, clip, sources, n=k, **kwargs)

        r["diversity"] = evaluate_diversity(draw, args.diversity_prompts, args.diversity, vae_codec(pipe))
        print(report(r["diversity"], "unCLIP" if args.prior else "variations"))
    if args.json:
        save_json({"decoder": str(args.decoder), "prior": args.prior, "what": what, "sampler": sampler, "cfg": cfg,
                   **r}, args.json, sort_keys=False)
    return 0


def refuse_as_unet(folder) -> None:
    """InputError when ``--unet folder`` is a decoder, which takes embeddings, not prompts."""
    import json

    path = Path(folder) / "unet.json"
    try:
        conditioning = json.loads(path.read_text()).get("conditioning") if path.is_file() else None
    except (OSError, ValueError):
        return  # the loader names what is wrong with the file
    if conditioning == COND:
        raise InputError(f"--unet {folder} is an unCLIP decoder (it draws CLIP image embeddings): pass it as "
                         "--decoder with --prior DIR or --variations")
