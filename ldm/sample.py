"""`python -m ldm.sample`: images from a trained UNet + VAE (+ text encoder), as a grid PNG.

    python -m ldm.sample                                           # runs/unet, its validation prompts
    python -m ldm.sample --prompt "a large red circle in the center on a black background" --n 8
    python -m ldm.sample --prompts-file prompts.txt --sampler ddpm --steps 1000 --cfg 3 --seed 1
    python -m ldm.sample --init-image photo.png --strength 0.5 --prompt "..."      # image-to-image
    python -m ldm.sample --unet runs/digits-unet --class 7 --n 8    # a class-conditional UNet (the digits)
    python -m ldm.sample --unet DIR --prompt "..."                  # DIR from python -m ldm.convert from-diffusers
    python -m ldm.sample --from-diffusers PATH --prompt "..."       # a Stable Diffusion 1.x folder
    python -m ldm.sample --unet runs/uncond --clip runs/clip-noisy --clip-guidance 30 --prompt "..."  # GLIDE
    python -m ldm.sample --clip runs/clip-noisy --clip-guidance 10 --prompt "..."   # on top of the text UNet's CFG
    python -m ldm.sample --from-diffusers PATH --lora runs/lora/lora.safetensors:0.8 --prompt "..."  # + a LoRA
    python -m ldm.sample --unet runs/unet --lora a.safetensors --lora b.safetensors:0.5   # two LoRAs stacked
    python -m ldm.sample --unet runs/inpaint --task inpaint --init-image I.png --mask M.png --prompt "..."
    python -m ldm.sample --unet runs/palette --task sr --init-image LOW.png --prompt "..."   # 8 or 16 px in
    python -m ldm.sample --prompt "..." --upscaler runs/sr64 [--upscaler runs/sr128]   # a cascade
    python -m ldm.sample --from-diffusers SD-INPAINT --task inpaint --init-image I.png --mask M.png --prompt "..."
    python -m ldm.sample --prior runs/prior --decoder runs/decoder --prompt "..."   # unCLIP: prior + decoder
    python -m ldm.sample --decoder runs/decoder --variations image.png --n 8       # image variations

The grid has one row per prompt (or ``--class``: a class-conditional UNet, all its classes when none is
given) and ``--n`` images a row; ``--images DIR`` also writes each image.
Image ``k`` (prompt-major order) starts from noise drawn on the CPU from seed ``--seed + k``, so it
is the same whatever the batch size, the number of prompts after it, or the device. A shell over
``ldm.Pipeline`` (``ldm/pipeline.py``).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path


from ldm.data.folder import read_text_utf8
from ldm import unclip_decoder
from ldm.distributed import resolve_device
from ldm.errors import InputError, command_main
from ldm.image2image import SAMPLE_AUG_LEVEL, TASKS, generate_cascade, task_inputs
from ldm.pipeline import DEFAULT_STRENGTH, SPACINGS, Pipeline, generate, load_image
from ldm.runlog import image_grid
from ldm.samplers import SAMPLERS

DEFAULT_CLIP_GUIDANCE = 10.0  # --clip-guidance when --clip comes without it
GRID_SIDE = 128  # small images are scaled up in the grid to about this many pixels a side


# ------------------------------------------------------------------------------------------- CLI
def read_classes(args: argparse.Namespace, pipe: Pipeline) -> list[int] | None:
    """The ``--class`` labels of a class-conditional UNet (default: every class); None for any other UNet."""
    n = pipe.num_classes
    if n is None:
        if args.classes:
            raise InputError(f"{pipe.meta.get('source', args.unet)}: the UNet is not class-conditional "
                             "(num_classes null); it takes no --class")
        return None
    bad = [c for c in args.classes or [] if not 0 <= c < n]
    if bad:
        raise InputError(f"--class {bad[0]}: the UNet draws classes 0..{n - 1}")
    return list(args.classes) if args.classes else list(range(n))


def read_prompts(args: argparse.Namespace, pipe: Pipeline) -> list[str] | None:
    if not pipe.conditional and not args.clip:
        if args.prompt or args.prompts_file:
            raise InputError(f"{pipe.meta.get('source', args.unet)}: the UNet is not text-conditional "
                              "(context_dim null); it takes no --prompt or --prompts-file")
        return None
    prompts = list(args.prompt or [])
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise InputError(f"--prompts-file: file not found: {path}")
        try:
            lines = [line.strip() for line in read_text_utf8(path).splitlines()]
        except ValueError as e:
            raise InputError(f"--prompts-file: {e}") from None
        from_file = [line for line in lines if line]
        if not from_file:
            raise InputError(f"--prompts-file {path} holds no prompts (expected one prompt a line)")
        prompts += from_file
    if not prompts and pipe.conditional:
        prompts = list(pipe.meta.get("val_prompts") or [])
    if not prompts:
        raise InputError("no prompts: pass --prompt TEXT or --prompts-file FILE")
    return prompts


def slug(text: str, length: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:length] or "image"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ldm.sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    src = p.add_argument_group("model")
    src.add_argument("--unet", default="runs/unet", metavar="DIR",
                     help="folder with unet.safetensors + unet.json from train_unet (default runs/unet)")
    src.add_argument("--vae", default=None, metavar="DIR", help="VAE folder (default: the one unet.json records)")
    src.add_argument("--text-encoder", default=None, metavar="PATH",
                     help="local Hugging Face text encoder folder (default: the one unet.json records); its "
                          "width must equal the UNet's context_dim")
    src.add_argument("--from-diffusers", default=None, metavar="PATH",
                     help="sample a Stable Diffusion 1.x folder in diffusers' layout instead of --unet/--vae "
                          "(--unet takes one too)")
    src.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                     help="merge a LoRA file (train_unet --lora's lora.safetensors, or diffusers' layout) into the "
                          "UNet, times SCALE (default 1); repeat to stack several")
    src.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    what = p.add_argument_group("what to draw")
    what.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt (repeat for more)")
    what.add_argument("--prompts-file", default=None, metavar="FILE", help="prompts, one a line")
    what.add_argument("--class", dest="classes", type=int, action="append", metavar="N",
                      help="a class label of a class-conditional UNet, a row each (repeat for more; "
                           "default: every class)")
    what.add_argument("--n", type=int, default=4, help="images per prompt (default 4)")
    what.add_argument("--init-image", default=None, metavar="PATH", help="start from this image (image-to-image)")
    what.add_argument("--strength", type=float, default=None,
                      help=f"with --init-image: how much to change it, in (0, 1]; 1 ignores it "
                           f"(default {DEFAULT_STRENGTH})")
    what.add_argument("--clip", default=None, metavar="DIR",
                      help="a noise-aware CLIP (train_clip --vae) that guides sampling towards the prompts "
                           "(GLIDE); an unconditional UNet then takes prompts too")
    what.add_argument("--clip-guidance", type=float, default=None, metavar="S",
                      help="with --clip: the scale s of the CLIP gradient added to the score (default 10)")
    what.add_argument("--task", choices=TASKS, default=None,
                      help="image-conditioned (a model from train_unet --task, or SD inpainting): inpaint or "
                           "outpaint --init-image where --mask is white, colorize --init-image, sr (upscale the "
                           "low-res --init-image to the model's size)")
    what.add_argument("--mask", default=None, metavar="PATH", help="with --task inpaint/outpaint: white = draw, "
                                                                    "the size of --init-image")
    what.add_argument("--noise-level", type=int, default=SAMPLE_AUG_LEVEL,
                      help=f"with --task sr or --upscaler: the noise-augmentation level of the low-res input, a "
                           f"timestep (default {SAMPLE_AUG_LEVEL})")
    what.add_argument("--upscaler", action="append", default=None, metavar="DIR",
                      help="a cascade: refine the --unet's images with this sr (or palette) model, at a multiple of "
                           "their resolution (repeat for more stages)")
    how = p.add_argument_group("sampler")
    how.add_argument("--sampler", choices=list(SAMPLERS), default=None,
                     help="default: unet.json's (unipc, UniPC of order 3, when it names none)")
    how.add_argument("--steps", type=int, default=None, help="model calls (default: unet.json's)")
    how.add_argument("--spacing", choices=SPACINGS, default=None,
                     help="sigma spacing (default: karras, capped at sigma 10, for unipc, dpmpp_2m and euler; "
                          "uniform for ddpm and ddim)")
    how.add_argument("--cfg", type=float, default=None,
                     help="classifier-free guidance scale, 1 = none (default: unet.json's)")
    how.add_argument("--seed", type=int, default=0, help="image k starts from noise of seed + k (default 0)")
    how.add_argument("--batch-size", type=int, default=16, help="images per sampler run (default 16)")
    out = p.add_argument_group("output")
    out.add_argument("--out", default="grid.png", help="grid PNG, a row per prompt (default grid.png)")
    out.add_argument("--images", default=None, metavar="DIR", help="also write each image into DIR")
    out.add_argument("--progress", action="store_true", help="show the sampler's progress bar")
    unclip_decoder.add_arguments(p)
    return p


def check_args(args: argparse.Namespace) -> None:
    for flag in ("n", "batch_size", "steps"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise InputError(f"--{flag.replace('_', '-')} must be positive, got {value}")
    if args.strength is not None:
        if args.init_image is None:
            raise InputError("--strength needs --init-image")
        if not 0.0 < args.strength <= 1.0:
            raise InputError(f"--strength must lie in (0, 1], got {args.strength}")
    if args.upscaler and (args.task or args.init_image):
        raise InputError("--upscaler refines text-to-image samples; it takes no --task or --init-image")
    if args.task is None and args.mask is not None:
        raise InputError("--mask needs --task inpaint or outpaint")
    if args.task is not None and args.strength is not None:
        raise InputError(f"--strength is for image-to-image without --task; --task {args.task} redraws as trained")
    if args.init_image is not None and not Path(args.init_image).is_file():
        raise InputError(f"--init-image: file not found: {args.init_image}")
    if args.cfg is not None and args.cfg < 0:
        raise InputError(f"--cfg must be >= 0, got {args.cfg}")
    if args.clip_guidance is not None and args.clip is None:
        raise InputError("--clip-guidance needs --clip DIR")
    if args.clip_guidance is not None and args.clip_guidance < 0:
        raise InputError(f"--clip-guidance must be >= 0, got {args.clip_guidance}")
    if args.clip is not None and (args.task or args.upscaler):
        raise InputError("--clip guides text-to-image sampling; it does not combine with --task or --upscaler")


def parse_lora(spec: str) -> tuple[str, float]:
    """``FILE`` or ``FILE:SCALE`` -> (file, scale); a file name may hold colons, the scale is the last field."""
    path, sep, tail = spec.rpartition(":")
    if sep:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return spec, 1.0


def run(args: argparse.Namespace) -> int:
    check_args(args)
    device = resolve_device(args.device)
    if unclip_decoder.wanted(args):
        return write_outputs(args, *unclip_decoder.run_sample(args, device, lambda pipe: read_prompts(args, pipe)),
                             "unCLIP")
    if args.from_diffusers is not None:
        pipe = Pipeline.from_pretrained(args.from_diffusers, text_encoder=args.text_encoder, device=device)
    else:
        unclip_decoder.refuse_as_unet(args.unet)
        pipe = Pipeline.from_pretrained(args.unet, vae=args.vae, text_encoder=args.text_encoder, device=device)
    for spec in args.lora:
        path, scale = parse_lora(spec)
        try:
            pipe.load_lora(path, scale)
        except (FileNotFoundError, ValueError) as e:
            raise InputError(f"--lora {spec}: {e}") from None
    if args.task and pipe.conditional and not (args.prompt or args.prompts_file):
        prompts = [""]  # no prompt: the conditioning image alone (the empty prompt the model was trained with)
    else:
        prompts = read_prompts(args, pipe)
    if args.task and prompts and len(prompts) > 1:
        raise InputError(f"--task {args.task} draws from one --init-image with one prompt, got {len(prompts)}")
    classes = read_classes(args, pipe)
    sampler = args.sampler or pipe.defaults.sampler
    steps = args.steps or pipe.defaults.steps
    cfg = args.cfg if args.cfg is not None else pipe.defaults.cfg
    init, strength = None, 1.0
    if args.task is not None:
        images, masks = task_inputs(args.task, args.init_image, args.mask, pipe.resolution)
        if classes is not None:
            raise InputError("--task: class-conditional UNets take no conditioning image")
        images = pipe.image2image(args.task, images, masks, prompts, n=args.n, steps=steps,
                                  sampler=sampler, cfg=cfg, seed=args.seed, noise_level=args.noise_level,
                                  batch_size=args.batch_size)
    elif args.init_image is not None:
        init = load_image(args.init_image, pipe.resolution, what="--init-image")
        strength = args.strength if args.strength is not None else DEFAULT_STRENGTH
    guide = None
    if args.clip is not None:
        from ldm.clip import load_clip
        from ldm.clip_guidance import clip_guide

        scale = DEFAULT_CLIP_GUIDANCE if args.clip_guidance is None else args.clip_guidance
        guide = clip_guide(load_clip(args.clip, device), prompts, scale, pipe.schedule, pipe.latent_shape, device)
    if args.upscaler:
        ups = [Pipeline.from_pretrained(u, device=device) for u in args.upscaler]
        try:
            stages = generate_cascade(pipe, ups, prompts, n=args.n, seed=args.seed, batch_size=args.batch_size,
                                      noise_level=args.noise_level,
                                      base_kwargs=dict(steps=steps, sampler=sampler, cfg=cfg, spacing=args.spacing))
        except ValueError as e:
            raise InputError(str(e)) from None
        images = stages[-1]
        print("sample: cascade " + " -> ".join(f"{s.shape[-1]} px" for s in stages), file=sys.stderr)
    elif args.task is None:
        images = generate(pipe, prompts, classes=classes, n=args.n, steps=steps, sampler=sampler, cfg=cfg,
                          seed=args.seed, batch_size=args.batch_size, spacing=args.spacing, init_image=init,
                          strength=strength, progress=args.progress, guide=guide)
    rows = prompts or [f"class {c}" for c in classes or []] or ["(unconditional)"]
    guided = pipe.conditional or classes is not None
    return write_outputs(args, images, rows, args.n, f"{sampler}, {steps} steps, cfg {cfg if guided else 'n/a'}")


def write_outputs(args: argparse.Namespace, images, rows: list[str], per_row: int, how: str) -> int:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, nrow=per_row, scale=max(1, GRID_SIDE // images.shape[-1])).save(out)
    print(f"sample: wrote {out}: {len(rows)} row(s) of {per_row}, {images.shape[-1]} x {images.shape[-2]} each "
          f"({how}, seed {args.seed})", file=sys.stderr)
    for i, text in enumerate(rows):
        print(f"  row {i}: {text}", file=sys.stderr)
    if args.images:
        folder = Path(args.images)
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(len(images)):
            image_grid(images[k:k + 1], pad=0).save(folder / f"{k:04d}_{slug(rows[k // per_row])}.png")
        print(f"sample: wrote {len(images)} images to {folder}/", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    return command_main("sample", build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
