"""The latent and text cache ``train_unet`` trains from, and the batches it draws from it.

The cache is built once: the VAE's posterior mean and std of the first N items (in the UNet's units:
``VAE.latent_moments``), so every step draws a fresh latent sample; with a text encoder also the
captions' token states, each distinct caption encoded once (fp16), plus the empty prompt (for
classifier-free guidance) and the validation prompts; a labelled dataset (the digits) also leaves its
class labels in the latent file. Each file records what it was built from (VAE digest, dataset,
resolution, text encoder, item count): a changed input rebuilds it, an unchanged one is reused.

``Batches(step)`` draws step s's global batch from seed (seed, s) and gives each rank its shard, so a
run does not depend on how many processes share it, and resumes mid-epoch exactly. It conditions on
the captions' tokens (a text cache), or on the class labels (``null_class`` given), each dropped to
the empty prompt / the null class with probability ``cfg_drop``, or on nothing.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from ldm.checkpoint import load_tensors, save_tensors
from ldm.data import eval_prompts
from ldm.diffusion import sample_timesteps
from ldm.distributed import Dist
from ldm.errors import InputError
from ldm.pretrained import file_digest
from ldm.text import pad_context

ENCODE_BATCH = 128  # images per VAE call while caching
TEXT_BATCH = 256  # captions per text-encoder call while caching
CACHE_FORMAT = 1  # bump when the cache layout changes
CACHE_ON_DEVICE_BYTES = 2 << 30  # caches up to this size live on the training device, larger ones on the CPU
STEP_SEED_STRIDE = 1 << 32  # step s of a run with --seed k draws from seed k * STRIDE + s
VAL_PROMPT_SEED = 0  # eval_prompts(count, VAL_PROMPT_SEED) for the built-in data


def read_cache_key(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {}).get("ldm_cache", "null"))
    except (OSError, ValueError):
        return None


def cache_is_current(path: Path, key: dict, what: str) -> bool:
    """True when ``path`` was built from ``key``; says on stderr whether it is reused or rebuilt, and why."""
    old = read_cache_key(path)
    if old == key:
        print(f"train_unet: reusing the {what} cache {path}", file=sys.stderr)
        return True
    why = "none yet" if old is None else "changed: " + ", ".join(k for k in key if old.get(k) != key[k])
    print(f"train_unet: building the {what} cache {path} ({why})", file=sys.stderr)
    return False


def dataset_captions(dataset, n: int) -> list[str]:
    """The captions of items 0..n-1 without decoding their images where the dataset allows."""
    if hasattr(dataset, "attributes"):  # the built-in shapes: captions come from the drawn attributes
        return [dataset.caption(i) for i in range(n)]
    if hasattr(dataset, "captions"):
        return list(dataset.captions[:n])
    return [dataset[i]["text"] for i in range(n)]


@torch.no_grad()
def encode_latents(vae, dataset, n: int, device, workers: int, quiet: bool) -> dict:
    """Posterior mean and std of items 0..n-1 in the UNet's units (``vae.latent_moments``):
    (n, C, h, w) float16 each."""
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(n)), batch_size=ENCODE_BATCH,
                                         num_workers=workers, generator=torch.Generator().manual_seed(0))
    means, stds = [], []
    for batch in tqdm(loader, desc="caching latents", disable=quiet, file=sys.stderr, dynamic_ncols=True):
        x = batch["image"].to(device).contiguous(memory_format=torch.channels_last)  # (b, 3, R, R)
        mean, std = vae.latent_moments(x)  # (b, C, h, w) each
        means.append(mean.half().cpu())
        stds.append(std.half().cpu())
    return {"mean": torch.cat(means), "std": torch.cat(stds)}


@torch.no_grad()
def encode_bucketed_latents(vae, dataset, n: int, device, workers: int, quiet: bool) -> dict:
    """``encode_latents`` for an ``ldm.data.buckets.BucketedFolder``: each bucket's items encoded together;
    item i's latent in the top-left (h_i, w_i) corner of (n, C, h_max, w_max) float16 tensors, zeros
    elsewhere; bucket (n,) and bucket_sizes (K, 2), the latent size of each bucket."""
    f = vae.config.downsample_factor
    sizes = torch.tensor([[h // f, w // f] for h, w in dataset.sizes], dtype=torch.long)  # (K, 2)
    bucket = torch.as_tensor(dataset.bucket[:n], dtype=torch.long)  # (n,)
    C, (H, W) = vae.config.latent_channels, sizes.max(0).values.tolist()
    mean, std = torch.zeros(n, C, H, W, dtype=torch.float16), torch.zeros(n, C, H, W, dtype=torch.float16)
    for k, (h, w) in enumerate(sizes.tolist()):
        items = torch.nonzero(bucket == k).flatten().tolist()
        if not items:
            continue
        part = encode_latents(vae, torch.utils.data.Subset(dataset, items), len(items), device, workers, quiet)
        mean[items, :, :h, :w], std[items, :, :h, :w] = part["mean"], part["std"]  # (n_k, C, h, w) each
    return {"mean": mean, "std": std, "bucket": bucket, "bucket_sizes": sizes}


@torch.no_grad()
def encode_captions(encoder, captions: list[str], extra: list[str], quiet: bool) -> dict:
    """Each distinct text of ``captions`` + ``extra`` + the empty prompt encoded once:
    tokens (U, L, width) float16 zero-padded, lengths (U,), index (n,) of each caption's row,
    empty_index () and extra_index (len(extra),)."""
    unique = sorted(set(captions) | set(extra) | {""})
    row = {text: i for i, text in enumerate(unique)}
    order = sorted(range(len(unique)), key=lambda i: len(unique[i]))  # batch similar lengths: less padding
    states, lengths = [None] * len(unique), torch.zeros(len(unique), dtype=torch.long)
    for start in tqdm(range(0, len(unique), TEXT_BATCH), desc="caching text", disable=quiet, file=sys.stderr,
                      dynamic_ncols=True):
        rows = order[start:start + TEXT_BATCH]
        context, n = encoder.encode([unique[i] for i in rows])  # (b, L_b, width), (b,)
        for j, i in enumerate(rows):
            lengths[i] = n[j]
            states[i] = context[j, : n[j]].half().cpu()  # (n_j, width)
    return {"tokens": pad_context(states), "lengths": lengths,  # (U, L, width), (U,)
            "index": torch.tensor([row[c] for c in captions], dtype=torch.long),
            "empty_index": torch.tensor(row[""]),
            "extra_index": torch.tensor([row[t] for t in extra], dtype=torch.long)}


def encoder_path(text_encoder: str | None) -> str:
    """The absolute folder of the text encoder (None: the packaged MiniLM), as the cache records it."""
    if text_encoder is not None:
        return str(Path(text_encoder).resolve())
    from ldm.text import default_encoder_path

    try:
        return str(default_encoder_path())
    except ImportError as e:
        raise InputError(str(e)) from None


def load_text_encoder(path: str, device, options: dict | None = None):
    """``options``: TextEncoder's tokenization (SD's CLIP: pad_to_max, mask_padding False); None: ours."""
    from ldm.text import TextEncoder

    try:
        return TextEncoder(path, device=device, **(options or {}))
    except (FileNotFoundError, ImportError, OSError, ValueError) as e:
        raise InputError(f"--text-encoder: {e}") from None


def validation_prompts(data: str | None, dataset, n: int, count: int) -> list[str]:
    """Built-in data: ``count`` held-out prompts (the dataset's own ``prompts(count)`` where it has one); a
    folder: its first ``count`` distinct non-empty captions among items 0..n-1."""
    if data is None:
        return [text for _, text in eval_prompts(count, VAL_PROMPT_SEED)]
    if hasattr(dataset, "prompts"):
        return dataset.prompts(count)
    seen = dict.fromkeys(c for c in dataset_captions(dataset, n) if c)
    return list(seen)[:count] or [""]  # no captions at all: the grids show the empty prompt


@dataclass
class Cache:
    mean: torch.Tensor  # (N, C, h, w) float16, posterior means in the UNet's units
    std: torch.Tensor  # (N, C, h, w) float16
    keys: dict
    tokens: torch.Tensor | None = None  # (U, L, width) float16, distinct captions
    token_lengths: torch.Tensor | None = None  # (U,)
    caption_row: torch.Tensor | None = None  # (N,) row of tokens for each item
    empty_row: int = 0
    val_rows: torch.Tensor | None = None  # (V,)
    labels: torch.Tensor | None = None  # (N,) int64 class of each item, for a labelled dataset
    bucket: torch.Tensor | None = None  # (N,) aspect-ratio bucket of each item (--buckets); None: all one size
    bucket_sizes: torch.Tensor | None = None  # (K, 2) latent (h, w) of each bucket

    def to(self, device) -> Cache:
        nbytes = sum(t.numel() * t.element_size() for t in (self.mean, self.std, self.tokens) if t is not None)
        if nbytes > CACHE_ON_DEVICE_BYTES:
            device = torch.device("cpu")
        for f in ("mean", "std", "tokens", "token_lengths", "caption_row", "val_rows", "labels", "bucket"):
            if getattr(self, f) is not None:
                setattr(self, f, getattr(self, f).to(device))
        return self


def same_inputs(recorded: dict, now: dict) -> bool:
    """Were the caches a checkpoint recorded (``Cache.keys``) built from the inputs of ``now``? A field of
    the text key that older checkpoints lack (``captions_sha256``) is not compared, so they still resume."""
    now = dict(now)
    if recorded.get("text") is not None and now.get("text") is not None and "captions_sha256" not in recorded["text"]:
        now["text"] = {k: v for k, v in now["text"].items() if k != "captions_sha256"}
    return recorded == now


def prepare_cache(folder: str | Path, d: Dist, vae, vae_dir: str | Path, dataset, n: int,
                  text_encoder: str | None, val_prompts: list[str], device, workers: int = 0,
                  quiet: bool = False, text_options: dict | None = None) -> Cache:
    """Build (rank 0) or reuse the latent cache of items 0..n-1 in ``folder`` (and, with ``text_encoder``,
    the resolved encoder folder, the text cache), then load them on every rank."""
    folder = Path(folder)
    vae_dir = Path(vae_dir)
    base = {"format": CACHE_FORMAT, "dataset": dataset.describe(), "images": n}
    latent_key = {**base, "vae_sha256": file_digest(vae_dir / "vae.safetensors"),
                  "vae_json_sha256": file_digest(vae_dir / "vae.json")}
    text_key = {**base, "text_encoder": text_encoder, "val_prompts": val_prompts} if text_encoder else None
    if text_key is not None and text_options:  # another tokenization is another cache (absent: older caches hold)
        text_key["text_options"] = text_options
    captions = None
    if text_key is not None and (hasattr(dataset, "attributes") or hasattr(dataset, "captions")):
        # the captions themselves, where reading them decodes no image: a changed caption writer (the
        # built-in shapes' wording) or an edited caption file is another cache, though the dataset's
        # description is the same
        captions = dataset_captions(dataset, n)
        text_key["captions_sha256"] = hashlib.sha256("\n".join(captions).encode()).hexdigest()
    latent_file, text_file = folder / "latents.safetensors", folder / "text.safetensors"

    def build():
        if not cache_is_current(latent_file, latent_key, "latent"):
            t0 = time.perf_counter()
            encode = encode_bucketed_latents if hasattr(dataset, "sizes") else encode_latents
            latents = encode(vae, dataset, n, device, workers, quiet)
            if getattr(dataset, "labels", None) is not None:
                latents["labels"] = torch.as_tensor(np.asarray(dataset.labels[:n]), dtype=torch.long)  # (n,)
            save_tensors(latents, latent_file, metadata={"ldm_cache": json.dumps(latent_key)})
            print(f"train_unet: cached {n} latents {tuple(latents['mean'].shape[1:])} in "
                  f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
        if text_key is not None and not cache_is_current(text_file, text_key, "text"):
            t0 = time.perf_counter()
            encoder = load_text_encoder(text_key["text_encoder"], device, text_options)
            text = encode_captions(encoder, dataset_captions(dataset, n) if captions is None else captions, val_prompts,
                                   quiet)
            save_tensors(text, text_file, metadata={"ldm_cache": json.dumps(text_key)})
            print(f"train_unet: cached {len(text['tokens'])} distinct captions of {n} items, "
                  f"{tuple(text['tokens'].shape[1:])} tokens each, in {time.perf_counter() - t0:.0f} s",
                  file=sys.stderr)

    d.on_main(build)
    latents = load_tensors(latent_file, "latent cache")
    cache = Cache(latents["mean"], latents["std"], keys={"latents": latent_key, "text": text_key},
                  labels=latents.get("labels"), bucket=latents.get("bucket"),
                  bucket_sizes=latents.get("bucket_sizes"))
    if text_key is not None:
        text = load_tensors(text_file, "text cache")
        cache.tokens, cache.token_lengths, cache.caption_row = text["tokens"], text["lengths"], text["index"]
        cache.empty_row, cache.val_rows = int(text["empty_index"]), text["extra_index"]
    return cache.to(device)


class Positions:
    """Position k of the stream is cached item perm_e[k % N] of epoch e = k // N, each epoch's order
    drawn from (seed, e) (the same rule as ``ldm.data.ShuffledStream``): a run resumes mid-epoch
    from ``step * batch_size``."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self._perms = n, seed, {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:  # keep one epoch: batches look epochs up in order
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return self._perms[epoch]

    def take(self, start: int, count: int) -> torch.Tensor:
        out = np.empty(count, dtype=np.int64)
        k = 0
        while k < count:
            epoch, offset = divmod(start + k, self.n)
            m = min(count - k, self.n - offset)
            out[k:k + m] = self._perm(epoch)[offset:offset + m]
            k += m
        return torch.from_numpy(out)


class BucketPositions:
    """``Positions`` for bucketed items: every global batch comes from one bucket. Epoch e shuffles each
    bucket's items (seed, e, k), cuts them into batches of B (a bucket's last batch wraps round to its
    start) and shuffles the batches; step s takes batch s of the stream of epochs. Deterministic in
    (seed, step): a run resumes exactly."""

    def __init__(self, bucket: torch.Tensor, batch_size: int, seed: int):
        self.bucket, self.B, self.seed, self._epochs = bucket.cpu().numpy(), batch_size, seed, {}
        self.members = [np.nonzero(self.bucket == k)[0] for k in range(int(self.bucket.max()) + 1)]
        self.per_epoch = sum(-(-len(m) // batch_size) for m in self.members)

    def _epoch(self, e: int) -> list[np.ndarray]:
        if e not in self._epochs:
            batches = []
            for k, items in enumerate(self.members):
                if len(items):
                    order = np.random.default_rng([self.seed, e, k]).permutation(items)
                    reps = -(-len(order) // self.B)
                    order = np.resize(order, reps * self.B)  # the last batch wraps round
                    batches += list(order.reshape(reps, self.B))
            self._epochs = {e: [batches[i] for i in np.random.default_rng([self.seed, e]).permutation(len(batches))]}
        return self._epochs[e]

    def take(self, start: int, count: int) -> torch.Tensor:
        step, first = divmod(start, self.B)
        e, j = divmod(step, self.per_epoch)
        return torch.from_numpy(self._epoch(e)[j][first:first + count].copy())


class PriorPositions:
    """DreamBooth's batches: rows 0..B/2-1 from the user's pictures (items 0..n_instance-1), the rest
    from the class pictures after them, each an endless shuffled stream of its own (``Positions``)."""

    def __init__(self, n: int, n_instance: int, batch_size: int, seed: int):
        self.B, self.half, self.n_instance = batch_size, batch_size // 2, n_instance
        self.instance, self.prior = Positions(n_instance, seed), Positions(n - n_instance, seed + 1)

    def take(self, start: int, count: int) -> torch.Tensor:
        step, first = divmod(start, self.B)
        rows = torch.cat([self.instance.take(step * self.half, self.half),
                          self.n_instance + self.prior.take(step * (self.B - self.half), self.B - self.half)])
        return rows[first:first + count]


class Batches:
    """Step s's global batch: the cached items at stream positions s*B .. s*B + B - 1, a fresh posterior
    sample of each latent, timesteps, noise and caption drops, all drawn for the whole global batch
    from seed (``seed``, s); rank r keeps rows r*b .. (r+1)*b - 1 (b = B / world). One process or
    many, step s trains on the same numbers. ``null_class``: condition on the cache's labels instead of
    text, a dropped label becoming ``null_class``."""

    def __init__(self, cache: Cache, batch_size: int, d: Dist, seed: int, cfg_drop: float, num_timesteps: int,
                 device: torch.device, t_focus: tuple[float, float, float] = (0.0, 0.0, 1.0),
                 null_class: int | None = None, prior: tuple[int, float] | None = None):
        self.cache, self.B, self.seed, self.cfg_drop, self.T, self.device = (
            cache, batch_size, seed, cfg_drop, num_timesteps, device)
        if null_class is not None and cache.labels is None:
            raise InputError("class conditioning needs a labelled dataset (--data digits); this cache has no labels")
        self.null_class = null_class
        self.focus = dict(zip(("focus", "focus_mean", "focus_std"), t_focus, strict=True))  # sample_timesteps
        self.b = batch_size // d.world
        self.first = d.rank * self.b  # this rank's first row of every global batch
        self.rows = slice(self.first, self.first + self.b)
        self.positions = (Positions(len(cache.mean), seed) if cache.bucket is None else
                          BucketPositions(cache.bucket, batch_size, seed))
        self.weight = None
        if prior is not None:  # (n_instance, prior weight): loss = instance + weight x class, a row's share
            self.positions = PriorPositions(len(cache.mean), prior[0], batch_size, seed)
            w = torch.full((batch_size,), 2.0 * prior[1], device=device)  # (B,): mean(w * loss) is the sum
            w[: batch_size // 2] = 2.0
            self.weight = w[self.rows]
        self.gen = torch.Generator(device)

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        """-> x0 (b, C, h, w), t (b,) integer timesteps, noise (b, C, h, w), the UNet's context kwargs."""
        c, B, dev = self.cache, self.B, self.device
        idx = self.positions.take(step * B + self.first, self.b).to(c.mean.device)  # (b,) cached items
        self.gen.manual_seed((self.seed * STEP_SEED_STRIDE + step) % 2**64)
        shape = (B, *c.mean.shape[1:])
        t = sample_timesteps(B, self.T, dev, self.gen, **self.focus)[self.rows]  # (b,)
        z_noise = torch.randn(shape, generator=self.gen, device=dev)[self.rows]  # (b, C, h, w)
        noise = torch.randn(shape, generator=self.gen, device=dev)[self.rows]  # (b, C, h, w)
        drop = (torch.rand(B, generator=self.gen, device=dev) < self.cfg_drop)[self.rows]  # (b,)
        x0 = c.mean[idx].to(dev).float() + c.std[idx].to(dev).float() * z_noise  # (b, C, h, w)
        if c.bucket is not None:  # one bucket a batch: its latents fill the top-left (h_k, w_k) corner
            h, w = c.bucket_sizes[int(c.bucket[idx[0]])].tolist()
            x0, noise = x0[..., :h, :w], noise[..., :h, :w]  # (b, C, h_k, w_k)
        if self.null_class is not None:
            labels = torch.where(drop, self.null_class, c.labels[idx].to(dev))  # (b,)
            return x0, t, noise, {"class_labels": labels}
        if c.tokens is None:
            return x0, t, noise, {}
        extra = {} if self.weight is None else {"loss_weight": self.weight}  # popped before the UNet
        row = torch.where(drop, c.empty_row, c.caption_row[idx].to(dev)).to(c.tokens.device)  # (b,)
        return x0, t, noise, {"context": c.tokens[row].to(dev).float(),  # (b, L, width)
                              "context_lengths": c.token_lengths[row].to(dev), **extra}  # (b,)
