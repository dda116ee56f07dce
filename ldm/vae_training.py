"""Training the KL autoencoder: ``train(VAETrainConfig(...))``.

The command ``python -m ldm.train_vae`` parses flags into a ``VAETrainConfig`` and calls ``train``. The
run folder holds ``vae.safetensors`` + ``vae.json`` (config, latent codec, resolution, dataset; read
back by ``ldm.pretrained.load_vae``), ``recon/step_XXXXXXX.png`` (originals above reconstructions of
held-out images), ``metrics.jsonl``, ``loss.png`` and ``checkpoints/`` (model, discriminator, both
optimizers, step, RNG and data position, written atomically). A run killed at any moment resumes from
its last checkpoint (``resume=True``); Ctrl-C and SIGTERM write one first.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from autoencoder import VAE, VAE_CONFIGS, LossConfig, VAELoss, num_parameters
from ldm.checkpoint import rng_state, set_rng_state
from ldm.data import BUILTIN, ShuffledStream, is_builtin, open_dataset
from ldm.errors import InputError
from ldm.metrics import evaluate_vae, psnr
from ldm.pretrained import save_vae
from ldm.runlog import MetricsLog, Progress, image_grid, plot_curves
from ldm.distributed import resolve_device
from ldm.trainer import (RunFolder, check_finite, check_positive, learning_rate, restore,
                         sigterm_as_interrupt)

# Adam betas. The discriminator keeps latent diffusion's (0.5, 0.9), the usual choice for GAN stability;
# for the autoencoder itself (0.9, 0.99) measured 27.3 -> 29.2 dB PSNR at 1200 demo steps.
VAE_BETAS = (0.9, 0.99)
DISC_BETAS = (0.5, 0.9)
SCALE_SAMPLE = 512  # images whose latents set the scale factor
SCALE_BATCH = 64  # images per VAE call while measuring it, and while scoring
EVAL_IMAGES = 256  # held-out images scored at the end
GRID_IMAGES = 8
GRID_SIDE = 128  # the reconstruction grids scale small images up to about this many pixels a side
BUILTIN_STEPS, FOLDER_STEPS = 1500, 10_000  # default steps on the built-in shapes / on an image folder
GAN_OFF = 2**62  # a disc_start no run reaches


@dataclass
class VAETrainConfig:
    """A train_vae run; the defaults are the CPU demo (32 x 32 built-in shapes, ``tiny`` preset). Fields
    left None are resolved by ``resolved()`` from whether the data is the built-in shapes or a folder."""

    data: str | None = None  # an image folder; None: the built-in shapes
    caption_column: str = "text"
    crop: str = "random"  # square crop after resizing the short side: center or random
    flip: bool = False  # random horizontal flips (off: captions say left / right)
    resolution: int = 32
    workers: int = 0
    preset: str = "tiny"
    rec_loss: str | None = None  # None: l2 on the built-in data (about 6 dB more PSNR at 1200 steps), l1 on a folder
    kl_weight: float = LossConfig.kl_weight
    disc_start: int | None = None  # None: off on the built-in data, half of the steps on a folder
    disc_weight: float = LossConfig.disc_weight
    lpips_weights: str | None = None
    steps: int | None = None  # None: 1500 on the built-in data, 10000 on a folder
    batch_size: int = 16
    lr: float = 1e-3
    schedule: str = "cosine"  # after warm-up: cosine decay to 0 at the last step, or constant
    warmup: int = 20
    seed: int = 0
    device: str = "auto"
    threads: int | None = None  # None: every core
    out: str = "runs/vae"
    ckpt_every: int = 100
    sample_every: int = 100
    log_every: int = 10

    def resolved(self) -> VAETrainConfig:
        """The defaults that depend on the data filled in."""
        builtin = is_builtin(self.data)
        steps = self.steps if self.steps is not None else (BUILTIN_STEPS if builtin else FOLDER_STEPS)
        return dataclasses.replace(
            self, steps=steps,
            rec_loss=self.rec_loss if self.rec_loss is not None else ("l2" if builtin else "l1"),
            disc_start=self.disc_start if self.disc_start is not None else (steps if builtin else steps // 2))


DEMO = VAETrainConfig()
# Fields that define a run: on resume they come from the checkpoint, and giving a different value is an error.
RUN_FIELDS = ("data", "caption_column", "crop", "flip", "resolution", "preset", "batch_size", "lr", "schedule",
              "warmup", "rec_loss", "kl_weight", "disc_start", "disc_weight", "lpips_weights", "seed")


def check_config(c: VAETrainConfig) -> None:
    """InputError naming the flag for a value no run can take."""
    check_positive(c, ("warmup",), strict=False)
    check_positive(c, ("steps", "batch_size", "ckpt_every", "sample_every", "log_every", "threads"))
    if c.lr <= 0:
        raise InputError(f"--lr must be positive, got {c.lr}")
    f = VAE_CONFIGS[c.preset].downsample_factor
    if c.resolution <= 0 or c.resolution % f:
        raise InputError(f"--resolution {c.resolution} is not divisible by the downsampling factor {f} "
                         f"of preset {c.preset!r}")
    if not is_builtin(c.data) and not Path(c.data).is_dir():
        raise InputError(f"--data: folder not found: {c.data} (built-in: {', '.join(BUILTIN)})")


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
    grid = image_grid(torch.cat([images, recon]).float().cpu(), nrow=len(images),
                      scale=max(1, GRID_SIDE // images.shape[-1]))
    grid.save(path)


def train(c: VAETrainConfig, *, resume: bool = False, given=(), quiet: bool = False) -> int:
    """Run ``c``: 0 when done, 130 when interrupted (a checkpoint written). Bad input raises InputError
    before the output folder is touched."""
    run = RunFolder(c.out)
    out = run.out
    start_step, parts = 0, None
    if resume:
        c, start_step, parts = run.resume(c, given, RUN_FIELDS, kept_fields=("steps",))
    check_config(c)
    c = c.resolved()
    torch.set_num_threads(c.threads or os.cpu_count() or 1)
    device = resolve_device(c.device)
    try:
        dataset = open_dataset(c.data, c.resolution, seed=c.seed, caption_column=c.caption_column,
                               crop=c.crop, flip=c.flip)
        held_out = open_dataset(c.data, c.resolution, split="eval", seed=c.seed, caption_column=c.caption_column)
    except (FileNotFoundError, ValueError) as e:
        raise InputError(str(e)) from None

    torch.manual_seed(c.seed)
    config = VAE_CONFIGS[c.preset]
    vae = VAE(config, resolution=c.resolution).to(device, memory_format=torch.channels_last)
    loss_cfg = LossConfig(rec_loss=c.rec_loss, kl_weight=c.kl_weight,
                          disc_start=c.disc_start if c.disc_weight > 0 else GAN_OFF,
                          disc_weight=c.disc_weight, lpips_weights=c.lpips_weights)
    try:
        loss_fn = VAELoss(loss_cfg).to(device, memory_format=torch.channels_last)
    except (FileNotFoundError, ValueError) as e:
        raise InputError(str(e)) from None
    if not resume:  # every input checked: only now touch an earlier run's outputs
        run.start_new("train_vae")
    print(f"train_vae: {loss_fn.lpips_notice}", file=sys.stderr)
    opt_vae = torch.optim.Adam(vae.parameters(), lr=c.lr, betas=VAE_BETAS)
    opt_disc = torch.optim.Adam(loss_fn.discriminator.parameters(), lr=c.lr, betas=DISC_BETAS)
    if parts is not None:
        restore(parts, {"vae": vae, "discriminator": loss_fn.discriminator, "opt_vae": opt_vae,
                        "opt_disc": opt_disc}, run.ckpt.root)
        set_rng_state(parts["rng"])
        print(f"train_vae: resumed {out} at step {start_step} of {c.steps}", file=sys.stderr)

    run_args = dataclasses.asdict(c)
    grid_images = channels_last(torch.stack([held_out[i]["image"] for i in range(min(GRID_IMAGES, len(held_out)))]),
                                device)
    log = MetricsLog(out / "metrics.jsonl", resume_step=start_step if parts is not None else None)
    print(f"train_vae: {c.preset} VAE, {num_parameters(vae) / 1e6:.2f}M parameters, factor "
          f"{config.downsample_factor}, {c.resolution} x {c.resolution} images of "
          f"{dataset.describe()['name']}, {c.steps} steps of {c.batch_size} on {device}", file=sys.stderr)

    def checkpoint(step: int) -> None:
        check_finite(step, vae, loss_fn.discriminator)
        run.ckpt.save(step, {
            "vae": vae.state_dict(), "discriminator": loss_fn.discriminator.state_dict(),
            "opt_vae": opt_vae.state_dict(), "opt_disc": opt_disc.state_dict(), "rng": rng_state(),
            "run": {"args": run_args, "step": step, "data_position": step * c.batch_size,
                    "dataset": dataset.describe()},
        })

    stream = ShuffledStream(dataset, seed=c.seed)
    batches = iter(stream.loader(c.batch_size, start_step * c.batch_size, c.workers))
    progress = Progress(c.steps, initial=start_step, desc="train_vae", enabled=not quiet)
    step, saved_step, t_start = start_step, start_step if parts is not None else -1, time.perf_counter()
    try:
        with sigterm_as_interrupt():
            while step < c.steps:
                x = channels_last(next(batches)["image"], device)
                lr = learning_rate(c.lr, step, warmup=c.warmup, schedule=c.schedule, total=c.steps)
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
                    raise InputError(f"loss became {logs['loss']} at step {step}; lower --lr (now {c.lr})")
                if step % c.log_every == 0 or step == c.steps:
                    log.write(step=step, psnr=batch_psnr, images_per_s=rate, lr=lr, **logs)
                if step % c.sample_every == 0 or step == c.steps:
                    save_grid(vae, grid_images, out / "recon" / f"step_{step:07d}.png")
                    plot_curves(log.read(), ["l1", "d_loss"], out / "loss.png",
                                title="train_vae: L1 per pixel, D loss")
                if step % c.ckpt_every == 0 or step == c.steps:
                    checkpoint(step)
                    saved_step = step
    except KeyboardInterrupt:
        progress.close()
        if step > saved_step:
            checkpoint(step)
        print(f"\ntrain_vae: interrupted at step {step}; checkpoint written, continue with --resume",
              file=sys.stderr)
        return 130
    progress.close()
    train_seconds = time.perf_counter() - t_start

    vae.eval()
    vae.latent_scale, vae.latent_shift = latent_scale_factor(vae, dataset, SCALE_SAMPLE, SCALE_BATCH, device, c.seed)
    scores = evaluate_vae(vae, held_out, EVAL_IMAGES, SCALE_BATCH, device)
    save_vae(out, vae, dataset=dataset.describe(), steps=step,
             eval={**scores, "split": "eval" if is_builtin(c.data) else "train images"}, created_by="ldm.train_vae")
    plot_curves(log.read(), ["l1", "d_loss"], out / "loss.png", title="train_vae: L1 per pixel, D loss")
    print(f"train_vae: PSNR {scores['psnr']:.2f} dB, SSIM {scores['ssim']:.4f} on {scores['images']} "
          f"{'held-out' if is_builtin(c.data) else 'training'} images; latent scale factor {vae.latent_scale:.4f}; "
          f"{train_seconds:.0f} s of training; wrote {out / 'vae.safetensors'}", file=sys.stderr)
    return 0
