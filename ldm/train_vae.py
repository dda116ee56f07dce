"""`python -m ldm.train_vae`: train the KL autoencoder (on the built-in shapes unless told otherwise).

    python -m ldm.train_vae                                  # the CPU demo: 32 x 32 shapes, `tiny` preset
    python -m ldm.train_vae --out runs/vae --resume          # continue from the last checkpoint
    python -m ldm.train_vae --data DIR --resolution 256 --preset sd --batch-size 8 --disc-start 50000

The output folder holds ``vae.safetensors`` + ``vae.json`` (config, latent scale factor,
resolution, dataset), ``recon/step_XXXXXXX.png`` (originals above reconstructions of held-out
images), ``metrics.jsonl``, ``loss.png`` and ``checkpoints/`` (model, discriminator, both
optimizers, step, RNG and data position, written atomically). A run killed at any moment resumes
from its last checkpoint with ``--resume``; Ctrl-C writes one first.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import torch

from autoencoder import VAE, VAE_CONFIGS, LossConfig, VAELoss, num_parameters
from autoencoder.losses import REC_LOSSES
from ldm.checkpoint import CheckpointDir, resume_run, rng_state, save_model, set_rng_state
from ldm.data import ShuffledStream, open_dataset
from ldm.eval_vae import evaluate, psnr
from ldm.runlog import MetricsLog, Progress, image_grid, plot_curves

DEMO_PRESET, DEMO_RESOLUTION = "tiny", 32
# Adam betas. The discriminator keeps latent diffusion's (0.5, 0.9), the usual choice for GAN stability;
# for the autoencoder itself (0.9, 0.99) measured 27.3 -> 29.2 dB PSNR at 1200 demo steps.
VAE_BETAS = (0.9, 0.99)
DISC_BETAS = (0.5, 0.9)
SCALE_SAMPLE = 512  # images whose latents set the scale factor
EVAL_IMAGES = 256  # held-out images scored at the end
GRID_IMAGES = 8
# Flags that define a run: on --resume they come from the checkpoint, and giving a different value is an error.
RUN_FLAGS = ("data", "caption_column", "crop", "flip", "resolution", "preset", "batch_size", "lr", "schedule", "warmup",
             "rec_loss", "kl_weight", "disc_start", "disc_weight", "lpips_weights", "seed")


class RunError(Exception):
    """Bad input found after parsing: printed as one line, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ldm.train_vae", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--data", default=None, metavar="DIR",
                      help="image folder (metadata.jsonl or .txt captions); default: the built-in shapes")
    data.add_argument("--caption-column", default="text", help="caption column of metadata.jsonl (default text)")
    data.add_argument("--crop", choices=("center", "random"), default="random",
                      help="square crop after resizing the short side (default random)")
    data.add_argument("--flip", action="store_true", help="random horizontal flips (off: captions say left/right)")
    data.add_argument("--resolution", type=int, default=DEMO_RESOLUTION,
                      help=f"image side in pixels, divisible by the preset's downsampling factor "
                           f"(default {DEMO_RESOLUTION})")
    data.add_argument("--workers", type=int, default=0, help="data loader processes (default 0: in the main one)")
    model = p.add_argument_group("model and loss")
    model.add_argument("--preset", choices=list(VAE_CONFIGS), default=DEMO_PRESET,
                       help=f"VAE size; {DEMO_PRESET} is the CPU demo, sd is Stable Diffusion 1.x kl-f8 "
                            f"(default {DEMO_PRESET})")
    model.add_argument("--rec-loss", choices=REC_LOSSES, default=None,
                       help="reconstruction loss: l1 (latent diffusion's) or l2 (squared error) (default: l2 on "
                            "the built-in data, where a 1200-step run reached about 6 dB more PSNR with it; "
                            "l1 on a folder)")
    model.add_argument("--kl-weight", type=float, default=LossConfig.kl_weight,
                       help=f"weight of the KL term (default {LossConfig.kl_weight})")
    model.add_argument("--disc-start", type=int, default=None,
                       help="first step of the PatchGAN loss (default: half of --steps on a folder; "
                            "off on the built-in data, whose short demo run it only costs PSNR)")
    model.add_argument("--disc-weight", type=float, default=LossConfig.disc_weight,
                       help=f"scale of the adaptive GAN weight; 0 turns the GAN off (default {LossConfig.disc_weight})")
    model.add_argument("--lpips-weights", default=None, metavar="PATH",
                       help="VGG16 weights (.safetensors or .pth) to add LPIPS; default: $LDM_LPIPS_WEIGHTS, else off")
    train = p.add_argument_group("training")
    train.add_argument("--steps", type=int, default=None,
                       help="total optimizer steps (default: 1500 on the built-in data, 10000 on a folder)")
    train.add_argument("--batch-size", type=int, default=16, help="images per step (default 16)")
    train.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of VAE and discriminator "
                       "(default 1e-3)")
    train.add_argument("--schedule", choices=("cosine", "constant"), default="cosine",
                       help="learning rate after warm-up: cosine decay to 10%% at the last step, or constant "
                            "(default cosine)")
    train.add_argument("--warmup", type=int, default=20, help="steps of linear learning-rate warm-up (default 20)")
    train.add_argument("--seed", type=int, default=0, help="seed of weights, data order and sampling (default 0)")
    train.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    train.add_argument("--threads", type=int, default=os.cpu_count(),
                       help=f"CPU threads for PyTorch (default: all {os.cpu_count()} cores)")
    out = p.add_argument_group("output")
    out.add_argument("--out", default="runs/vae", help="output folder (default runs/vae)")
    out.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    out.add_argument("--ckpt-every", type=int, default=100, help="steps between checkpoints (default 100)")
    out.add_argument("--sample-every", type=int, default=100,
                     help="steps between reconstruction grids (default 100)")
    out.add_argument("--log-every", type=int, default=10, help="steps between metrics rows (default 10)")
    out.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def check_args(args: argparse.Namespace) -> None:
    if args.warmup < 0:
        raise RunError(f"--warmup must be >= 0, got {args.warmup}")
    for flag in ("batch_size", "ckpt_every", "sample_every", "log_every", "threads"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            raise RunError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if args.steps is not None and args.steps < 0:
        raise RunError(f"--steps must be >= 0, got {args.steps}")
    if args.lr <= 0:
        raise RunError(f"--lr must be positive, got {args.lr}")
    f = VAE_CONFIGS[args.preset].downsample_factor
    if args.resolution <= 0 or args.resolution % f:
        raise RunError(f"--resolution {args.resolution} is not divisible by the downsampling factor {f} "
                       f"of preset {args.preset!r}")
    if args.data is not None and not Path(args.data).is_dir():
        raise RunError(f"--data: folder not found: {args.data}")


def learning_rate(args: argparse.Namespace, step: int) -> float:
    """Linear warm-up over ``--warmup`` steps, then constant or cosine decay to 0 at ``--steps``."""
    warm = min(1.0, (step + 1) / args.warmup) if args.warmup > 0 else 1.0
    if args.schedule == "constant":
        return args.lr * warm
    progress = min(1.0, step / max(1, args.steps - 1))
    return args.lr * warm * 0.5 * (1.0 + math.cos(math.pi * progress))


def channels_last(x: torch.Tensor, device) -> torch.Tensor:
    return x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def latent_scale_factor(vae: VAE, dataset, n: int, batch_size: int, device, seed: int) -> tuple[float, float]:
    """1 / std of posterior samples of the first ``n`` items; also their mean. Uses its own generator."""
    gen = torch.Generator(device=device).manual_seed(seed)
    zs = []
    for start in range(0, min(n, len(dataset)), batch_size):
        x = torch.stack([dataset[i]["image"] for i in range(start, min(start + batch_size, n, len(dataset)))])
        zs.append(vae.encode(channels_last(x, device)).sample(gen).float().cpu())
    z = torch.cat(zs)  # (n, C, h, w)
    return 1.0 / z.std().item(), z.mean().item()


def save_grid(vae: VAE, images: torch.Tensor, path: Path) -> None:
    with torch.no_grad():
        recon = vae.decode(vae.encode(images).mode()).clamp(-1, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = image_grid(torch.cat([images, recon]).float().cpu(), nrow=len(images), scale=max(1, 128 // images.shape[-1]))
    grid.save(path)


def train(args: argparse.Namespace, argv: list[str]) -> int:
    out = Path(args.out)
    ckpt = CheckpointDir(out / "checkpoints")
    try:
        start_step, parts = resume_run(args, argv, ckpt, RUN_FLAGS, kept_flags=("steps",))
    except ValueError as e:
        raise RunError(str(e)) from None
    check_args(args)
    if args.steps is None:
        args.steps = 1500 if args.data is None else 10_000
    if args.rec_loss is None:
        args.rec_loss = "l2" if args.data is None else "l1"
    if args.disc_start is None:
        args.disc_start = args.steps if args.data is None else args.steps // 2
    torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if not args.resume and ckpt.root.is_dir():  # a new run: keep the old one aside, never mix the two
        aside = out / "checkpoints.previous"
        if aside.exists():
            shutil.rmtree(aside)
        ckpt.root.rename(aside)
        print(f"train_vae: starting a new run in {out}; the earlier run's checkpoints moved to {aside} "
              "(--resume continues a run instead)", file=sys.stderr)

    try:
        dataset = open_dataset(args.data, args.resolution, seed=args.seed, caption_column=args.caption_column,
                               crop=args.crop, flip=args.flip)
        held_out = open_dataset(args.data, args.resolution, split="eval", seed=args.seed,
                                caption_column=args.caption_column)
    except (FileNotFoundError, ValueError) as e:
        raise RunError(str(e)) from None

    torch.manual_seed(args.seed)
    config = VAE_CONFIGS[args.preset]
    vae = VAE(config).to(device, memory_format=torch.channels_last)
    loss_cfg = LossConfig(rec_loss=args.rec_loss, kl_weight=args.kl_weight,
                          disc_start=args.disc_start if args.disc_weight > 0 else 2**62,
                          disc_weight=args.disc_weight, lpips_weights=args.lpips_weights)
    try:
        loss_fn = VAELoss(loss_cfg).to(device, memory_format=torch.channels_last)
    except (FileNotFoundError, ValueError) as e:
        raise RunError(str(e)) from None
    print(f"train_vae: {loss_fn.lpips_notice}", file=sys.stderr)
    opt_vae = torch.optim.Adam(vae.parameters(), lr=args.lr, betas=VAE_BETAS)
    opt_disc = torch.optim.Adam(loss_fn.discriminator.parameters(), lr=args.lr, betas=DISC_BETAS)
    if parts is not None:
        vae.load_state_dict(parts["vae"])
        loss_fn.discriminator.load_state_dict(parts["discriminator"])
        opt_vae.load_state_dict(parts["opt_vae"])
        opt_disc.load_state_dict(parts["opt_disc"])
        set_rng_state(parts["rng"])
        print(f"train_vae: resumed {out} at step {start_step} of {args.steps}", file=sys.stderr)

    run_args = {k: v for k, v in vars(args).items() if k not in ("resume", "quiet")}
    grid_images = channels_last(torch.stack([held_out[i]["image"] for i in range(min(GRID_IMAGES, len(held_out)))]),
                                device)
    log = MetricsLog(out / "metrics.jsonl", resume_step=start_step if parts is not None else None)
    print(f"train_vae: {args.preset} VAE, {num_parameters(vae) / 1e6:.2f}M parameters, factor "
          f"{config.downsample_factor}, {args.resolution} x {args.resolution} images of "
          f"{dataset.describe()['name']}, {args.steps} steps of {args.batch_size} on {device}", file=sys.stderr)

    def checkpoint(step: int) -> None:
        ckpt.save(step, {
            "vae": vae.state_dict(), "discriminator": loss_fn.discriminator.state_dict(),
            "opt_vae": opt_vae.state_dict(), "opt_disc": opt_disc.state_dict(), "rng": rng_state(),
            "run": {"args": run_args, "step": step, "data_position": step * args.batch_size,
                    "dataset": dataset.describe()},
        })

    stream = ShuffledStream(dataset, seed=args.seed)
    batches = iter(stream.loader(args.batch_size, start_step * args.batch_size, args.workers))
    progress = Progress(args.steps, initial=start_step, desc="train_vae", enabled=not args.quiet)
    step, saved_step, t_start = start_step, start_step if parts is not None else -1, time.perf_counter()
    previous_sigterm = signal.signal(signal.SIGTERM, signal.default_int_handler)  # kill -TERM acts as Ctrl-C
    try:
        while step < args.steps:
            x = channels_last(next(batches)["image"], device)
            lr = learning_rate(args, step)
            for group in opt_vae.param_groups + opt_disc.param_groups:
                group["lr"] = lr
            recon, posterior = vae(x)
            loss, logs = loss_fn.generator_loss(x, recon, posterior, step, vae.last_layer)
            opt_vae.zero_grad(set_to_none=True)
            loss.backward()
            opt_vae.step()
            if loss_fn.gan_on(step):
                d_loss, d_logs = loss_fn.discriminator_loss(x, recon)
                opt_disc.zero_grad(set_to_none=True)
                d_loss.backward()
                opt_disc.step()
                logs.update(d_logs)
            step += 1
            batch_psnr = psnr(recon.detach().clamp(-1, 1), x).mean().item()
            rate = progress.update(len(x), loss=logs["loss"], psnr=batch_psnr)
            if not math.isfinite(logs["loss"]):
                raise RunError(f"loss became {logs['loss']} at step {step}; lower --lr (now {args.lr})")
            if step % args.log_every == 0 or step == args.steps:
                log.write(step=step, psnr=batch_psnr, images_per_s=rate, lr=lr, **logs)
            if step % args.sample_every == 0 or step == args.steps:
                save_grid(vae, grid_images, out / "recon" / f"step_{step:07d}.png")
                plot_curves(log.read(), ["l1", "d_loss"], out / "loss.png", title="train_vae: L1 per pixel, D loss")
            if step % args.ckpt_every == 0 or step == args.steps:
                checkpoint(step)
                saved_step = step
    except KeyboardInterrupt:
        progress.close()
        if step > saved_step:
            checkpoint(step)
        print(f"\ntrain_vae: interrupted at step {step}; checkpoint written, continue with --resume",
              file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
    progress.close()
    train_seconds = time.perf_counter() - t_start

    vae.eval()
    scale, shift = latent_scale_factor(vae, dataset, SCALE_SAMPLE, 64, device, args.seed)
    scores = evaluate(vae, held_out, EVAL_IMAGES, 64, device)
    info = dataset.describe()
    save_model(out, "vae", vae, config, latent_scale_factor=scale, latent_mean=shift, resolution=args.resolution,
               downsample_factor=config.downsample_factor,
               latent_shape=[config.latent_channels, args.resolution // config.downsample_factor,
                             args.resolution // config.downsample_factor],
               dataset=info, steps=step, eval={**scores, "split": "eval" if args.data is None else "train images"},
               created_by="ldm.train_vae")
    plot_curves(log.read(), ["l1", "d_loss"], out / "loss.png", title="train_vae: L1 per pixel, D loss")
    print(f"train_vae: PSNR {scores['psnr']:.2f} dB, SSIM {scores['ssim']:.4f} on {scores['images']} "
          f"{'held-out' if args.data is None else 'training'} images; latent scale factor {scale:.4f}; "
          f"{train_seconds:.0f} s of training; wrote {out / 'vae.safetensors'}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        return train(args, argv)
    except RunError as e:
        print(f"train_vae: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
