"""Training the latent-diffusion UNet on cached VAE latents (and text tokens): ``train(TrainConfig(...))``.

The command ``python -m ldm.train_unet`` parses flags into a ``TrainConfig`` and calls ``train``; so can
any Python code. The run folder holds ``unet.safetensors`` (EMA weights) + ``unet.json`` (the
``ldm.pretrained.UNetFile`` schema), ``val/step_XXXXXXX.png`` (the EMA model on fixed prompts and
noise) and ``val/progress.gif``, ``metrics.jsonl``, ``loss.png`` and ``checkpoints/`` (model, EMA,
optimizer, step, RNG, data position; atomic). A run killed at any moment resumes (``resume=True``)
and, for the same seed, ends with the same weights as an uninterrupted run; Ctrl-C and SIGTERM write a
checkpoint first. Under ``torchrun`` every rank calls ``train`` (``ldm.distributed``); the cache and
batches are ``ldm.latent_cache``, the run folder and resume ``ldm.trainer``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from ldm.checkpoint import rng_state, set_rng_state
from ldm.data import open_dataset
from ldm.data.buckets import BucketedFolder
from ldm.diffusion import NoiseSchedule, diffusion_loss
from ldm.distributed import Dist, weights_digest
from ldm import image2image as i2i
from ldm.errors import InputError
from ldm.finetune import PriorDataset, Trainable, class_images, open_base
from ldm.latent_cache import (Batches, encoder_path, load_text_encoder, prepare_cache, same_inputs,
                              validation_prompts)
from ldm.lora import LoRAConfig
from ldm.pipeline import Pipeline, generate
from ldm.pretrained import DEFAULT_SAMPLER, TextEncoderSpec, UNetFile, load_vae
from ldm.runlog import MetricsLog, Progress, image_grid, plot_curves, save_gif
from ldm.train_checks import check_config, parse_overrides
from ldm.trainer import (RunFolder, build_optimizer, check_finite, learning_rate, restore,
                         sigterm_as_interrupt)
from ldm.unclip_decoder import attach_clip_embeddings, build_unet, check_train_config, decoder_fields
from ldm.unet import count_parameters, unet_config

CREATED_BY = "ldm.train_unet"  # what unet.json says when this module wrote it
SAMPLER = DEFAULT_SAMPLER  # the validation grids' sampler and the exported default
DATA_SEED = 0  # the built-in images are always this stream: the seed changes the run, not the data (or the cache)
ADAMW_BETAS = (0.9, 0.999)
EMA_WARMUP = 10  # decay(step) = min(ema_decay, (1 + step) / (EMA_WARMUP + step))
COSINE_FLOOR = 0.1  # the cosine schedule decays to this share of the rate
GIF_FRAME_MS = 400
VAL_BATCH = 64  # images per sampler run of the validation grids


@dataclass
class TrainConfig:
    """A train_unet run; the defaults are the demo (the built-in shapes on 2 CPU cores, 6-11 minutes
    by the machine's load).

    Figures in the comments are on the built-in shapes; those without a note were measured when the
    small shapes were 7 px. On today's 9 / 13-px shapes this recipe reaches 97.0% shape+colour+position
    in-distribution and 92.5% on noisy prompts in the idle demo run, 82.5-96.5% / 60.5-94.0% over
    seeds 0-2 (README, "Prompts in a person's words")."""

    # data and cache
    vae: str = "runs/vae"  # the VAE folder from train_vae; images are its resolution...
    resolution: int | None = None  # ...or this one: a convolutional VAE encodes any multiple of its factor
    data: str | None = None  # an image folder, or "digits" (ldm.data.digits); None: the built-in shapes
    caption_column: str = "text"
    # The built-in shapes' captions: "varied" (ldm.data.wording: many training-side words, frames and extras),
    # "varied-drop" or the six "templates". Varied against templates, 3000 steps (cosine, --threads 1, seed 0):
    # in-distribution 96.5 vs 96.0%, held-out combinations 95.5 vs 94.5%, noisy prompts 94.0 vs 23.0%.
    # docs/wording/NOTES.md section 5.
    captions: str = "varied"
    cache_images: int = 10_000  # ~6300 distinct captions: the text encoder's share of the cache time
    cache_dir: str | None = None  # None: OUT/cache
    workers: int = 0  # data loader processes while caching
    # text conditioning
    text: bool = False
    text_encoder: str | None = None  # None: the packaged all-MiniLM-L6-v2
    cfg_drop: float = 0.1  # share of captions (or class labels) dropped for classifier-free guidance
    # class conditioning (a labelled dataset: --data digits): the UNet's class embedding instead of text
    class_cond: bool = False
    # image conditioning (ldm.image2image): inpaint, outpaint, colorize, sr or palette (all four); None: none
    task: str | None = None
    # the unCLIP decoder (ldm.unclip_decoder): "clip-image" conditions on the --clip model's image embeddings
    cond: str | None = None
    clip: str | None = None
    # model and objective
    preset: str = "tiny"  # UNET_CONFIGS entry
    unet_override: list[str] = field(default_factory=list)  # KEY=VALUE (JSON) fields of the preset
    prediction: str = "v"
    schedule: str = "linear"
    # 0: plain MSE. Min-SNR-5 on v down-weights the noisiest steps, where the layout is decided: with it
    # positions were right in 21-23% of samples after 1200 steps, without it 99% after 800.
    min_snr_gamma: float = 0.0
    # Where the shape is decided: sampling with another shape's prompt down to sigma 1.78 and this one's
    # after still gives this shape in 65% of samples, down to 0.57 in 9% (DPM-Solver++ 20 steps); uniform
    # timesteps put 32% of the training there (t 150-470, sigma 0.52-2.9). With 70% of each batch from
    # logit-normal(-0.85, 1) over t / T (58% of those in that band), the rest uniform, shape+colour+position
    # of 400 held-out prompts (4 heads) went from 84.2 / 82.5% (seeds 0 / 1) to 87.2 / 94.8 / 85.2%
    # (seeds 0 / 1 / 2); a 50% share: 89.0 / 90.8%. All from the logit-normal: shapes 89% but positions
    # 57%, too few noisy steps left to place them.
    t_focus: float = 0.7  # share of timesteps from the logit-normal; 0: all uniform
    t_focus_mean: float = -0.85  # logit(0.3): centred at t = 300 (sigma 1.24 on the linear schedule)
    t_focus_std: float = 1.0
    grad_checkpointing: bool = False
    # fine-tuning (ldm.finetune): start from a pretrained folder; LoRA trains only low-rank adapters
    init_from: str | None = None  # a diffusers SD 1.x folder or one of ours: its UNet, VAE, text encoder, schedule
    lora: int = 0  # LoRA rank; 0: train every weight
    lora_alpha: float | None = None  # None: the rank (scale 1)
    lora_targets: str = "attn"  # ldm.lora.LORA_TARGETS
    buckets: bool = False  # aspect-ratio buckets of about the resolution's pixel count (ldm.data.buckets)
    class_prompt: str | None = None  # DreamBooth prior preservation (ldm.finetune): the class's pictures...
    class_images: int = 100  # ...this many, drawn by the pretrained model before training...
    prior_weight: float = 1.0  # ...and their loss's weight beside the user's pictures'
    # training
    # 3000 steps of the tiny preset take what 1500 did when it also attended at 8 x 8 (349 s on 2 idle
    # cores); at 1500 steps varied captions had not yet learnt position (docs/wording/NOTES.md section 3)
    steps: int = 3000
    batch_size: int = 64  # global: split over the ranks. Batch 32 for 2000 steps (same time): 68.2%, not 82.8%
    # On the 9 / 13-px shapes, shape+colour+position of 400 held-out prompts after 1500 steps, seeds 0 and 1:
    # lr 2e-3: 82.8 / 75.8%, 3e-3: 84.2 / 82.5%, 4e-3 (seed 0): 77.2%.
    lr: float = 3e-3
    # Cosine decay to 10% over 3000 steps, against constant: template captions 96.0 vs 91.0% in-distribution
    # (shape 96.0 vs 91.5%), varied 95.0 vs 94.5% (docs/wording/NOTES.md section 5). At 1500 steps, lr 2e-3
    # and EMA 0.995 on the 7-px shapes it had cost shape (68.2% against 82.8%).
    lr_schedule: str = "cosine"  # after warm-up: "constant" or "cosine" (to 10% at the last step)
    warmup: int = 100
    weight_decay: float = 0.01  # AdamW, on weight matrices and kernels only
    optimizer: str = "adamw"  # ldm.trainer.OPTIMIZERS: "adamw8bit" keeps both moments in 8 bits (bitsandbytes)
    grad_clip: float = 1.0  # 0: no clipping
    ema_decay: float = 0.999  # ceiling; the decay warms up as (1 + step) / (10 + step)
    seed: int = 0
    device: str = "auto"
    threads: int | None = None  # None: the cores divided among the processes
    # output
    out: str = "runs/unet"
    ckpt_every: int = 250
    val_every: int = 200  # 0: only at the end
    val_steps: int = 20  # UniPC, capped Karras sigmas; also unet.json's default
    val_cfg: float = 2.0  # the validation grids' and the exported default guidance (2 > 3 > 5 at 1500 steps)
    log_every: int = 10
    eval: int = 0  # held-out built-in prompts scored at the end (ldm.metrics.evaluate_prompts)
    val_prompts: int = 8
    val_images: int = 2  # per prompt (unconditional: val_prompts * val_images samples)


DEMO = TrainConfig()
# Fields that define a run: on resume they come from the checkpoint, and giving a different value is an error.
RUN_FIELDS = ("vae", "resolution", "data", "caption_column", "captions", "cache_images", "text", "text_encoder",
              "cfg_drop", "class_cond", "task", "cond", "clip", "preset", "unet_override", "prediction", "schedule",
              "min_snr_gamma", "t_focus", "t_focus_mean", "t_focus_std", "batch_size", "lr", "lr_schedule",
              "warmup", "weight_decay", "optimizer", "grad_clip", "ema_decay", "seed", "init_from", "lora",
              "lora_alpha", "lora_targets", "buckets", "class_prompt", "class_images", "prior_weight")
# Fields a resumed run keeps from its checkpoint unless given again (the thread count changes the order of
# floating-point sums, so an exact resume keeps it too).
KEPT_FIELDS = ("steps", "cache_dir", "workers", "threads", "grad_checkpointing", "ckpt_every", "val_every",
               "val_steps", "val_cfg", "log_every", "eval")


def ema_decay(step: int, ceiling: float) -> float:
    return min(ceiling, (1 + step) / (EMA_WARMUP + step))


def optimizer_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and kernels, none on biases, norms and embeddings' scales."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def average_gradients(params: list[torch.Tensor], world: int) -> None:
    """Each parameter's gradient becomes its mean over the ranks (what DistributedDataParallel does), in one
    all-reduce of the gradients laid end to end."""
    grads = [p.grad for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])  # (sum of numel,)
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def save_validation(pipe: Pipeline, prompts: list[str] | None, encoded, n: int, steps: int, cfg: float,
                    seed: int, path: Path, count: int, classes: list[int] | None = None) -> None:
    """The EMA model on the fixed validation prompts (or classes) and noise: one column per prompt, n rows
    (unconditional: ``count`` columns)."""
    rows = prompts or classes
    count = len(rows) if rows else count
    images = generate(pipe, prompts, classes=classes, n=n if rows else count * n, steps=steps, sampler=SAMPLER,
                      cfg=cfg, seed=seed, batch_size=VAL_BATCH, encoded=encoded)  # (count * n, 3, H, W)
    if rows:
        images = images.view(count, n, *images.shape[1:]).transpose(0, 1).reshape(-1, *images.shape[1:])
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, nrow=count, scale=max(1, 64 // images.shape[-1])).save(path)


def train(c: TrainConfig, d: Dist, device: torch.device, *, resume: bool = False, given=(),
          quiet: bool = False) -> int:
    """Run ``c`` on this rank: 0 when done, 130 when interrupted (a checkpoint written). ``resume``
    continues the run in ``c.out`` (``given``: the fields typed again, see ``RunFolder.resume``).
    Bad input raises InputError before the output folder is touched."""
    run = RunFolder(c.out)
    out = run.out
    start_step, parts = 0, None
    if resume:
        c, start_step, parts = run.resume(c, given, RUN_FIELDS, KEPT_FIELDS)
    check_config(c, d)
    check_train_config(c)
    overrides = parse_overrides(c.unet_override)
    try:  # the widths come later, from the VAE and the cache; the layout can be checked now
        layout = unet_config(c.preset, gradient_checkpointing=c.grad_checkpointing, **overrides)
    except (TypeError, ValueError) as e:
        raise InputError(f"--preset {c.preset} with --unet-override: {e}") from None
    torch.set_num_threads(c.threads or max(1, (os.cpu_count() or 1) // d.world))
    base, schedule_spec, text_options = None, c.schedule, None
    if c.init_from is not None:  # the pretrained folder's VAE, text encoder, schedule and prediction win
        base = open_base(c.init_from, out, device, d)
        vae_dir = c.vae if "vae" in given else str(base.vae_dir)  # --vae given: another decoder of its latents
        c = dataclasses.replace(c, vae=vae_dir, text_encoder=base.text_encoder,
                                prediction=base.info.prediction)
        schedule_spec, text_options = base.info.schedule, base.text_options
    try:
        vae, _ = load_vae(c.vae, device)
    except (FileNotFoundError, ValueError) as e:
        raise InputError(f"--vae: {e} (train one with python -m ldm.train_vae)") from None
    if vae.resolution is None and c.resolution is None:
        raise InputError(f"--vae: {Path(c.vae) / 'vae.json'} records no resolution; give --resolution")
    resolution = c.resolution or int(vae.resolution)
    try:
        latent_shape = vae.latent_shape(resolution)
    except ValueError as e:
        raise InputError(f"--resolution {resolution}: {e}") from None
    # the UNet's skips meet only if every level halves the latent whole
    halvings = len((base.info.config if base else layout).channel_mult) - 1
    if latent_shape[1] % 2**halvings:
        raise InputError(f"--resolution {resolution}: its {latent_shape[1]}-wide latents do not halve {halvings} "
                         f"times; use a multiple of {vae.config.downsample_factor * 2**halvings}")
    try:
        dataset = open_dataset(c.data, resolution, seed=DATA_SEED, caption_column=c.caption_column,
                               captions=c.captions)
    except (FileNotFoundError, ValueError) as e:
        raise InputError(str(e)) from None
    if c.buckets:  # a bucket side must survive the VAE and every UNet downsampling whole
        try:
            dataset = BucketedFolder(dataset, vae.config.downsample_factor * 2**halvings)
        except ValueError as e:
            raise InputError(f"--buckets: {e}") from None
    if c.class_prompt is not None:  # every picture of both sets is cached: the batches take half of each
        prior = open_dataset(class_images(base, c.class_prompt, c.class_images, out, device, c.seed, quiet, d),
                             resolution, seed=DATA_SEED)
        dataset = PriorDataset(dataset, prior)
    n_cache = len(dataset) if c.class_prompt is not None else min(c.cache_images, len(dataset))
    val_prompts = validation_prompts(c.data, dataset, n_cache, c.val_prompts) if c.text else []
    cache = prepare_cache(c.cache_dir or out / "cache", d, vae, c.vae, dataset, n_cache,
                          encoder_path(c.text_encoder) if c.text else None, val_prompts, device, c.workers, quiet,
                          text_options=text_options)
    if c.cond:  # the CLIP's image embeddings become the items' one-token captions
        val_prompts = attach_clip_embeddings(cache, c.clip, dataset, len(cache.mean), c.val_prompts, device,
                                             quiet or not d.main)
    if parts is not None and not same_inputs(parts["run"]["cache_keys"], cache.keys):
        raise InputError(f"the cache inputs changed since the checkpoint in {run.ckpt.root} (the VAE in {c.vae}, "
                         "the dataset or the text encoder); start a new run in another --out")
    N = len(cache.mean)
    width = cache.tokens.shape[-1] if c.text or c.cond else None

    torch.manual_seed(c.seed)
    num_classes = dataset.num_classes if c.class_cond else None
    try:
        task_fields = i2i.unet_fields(c.task, latent_shape[0]) if c.task else {}
        config = unet_config(c.preset, in_channels=latent_shape[0], out_channels=latent_shape[0],
                             num_classes=num_classes, gradient_checkpointing=c.grad_checkpointing, **task_fields,
                             **(decoder_fields(width) if c.cond else {"context_dim": width}), **overrides)
    except (TypeError, ValueError) as e:
        raise InputError(f"--preset {c.preset} with --unet-override: {e}") from None
    if base is not None:
        config = dataclasses.replace(base.info.config, gradient_checkpointing=c.grad_checkpointing)
        if config.context_dim != width:
            raise InputError(f"--init-from {c.init_from}: the UNet attends to {config.context_dim}-wide tokens, "
                             f"its text encoder gives {width}")
    if d.main and not resume:  # every input checked: only now touch an earlier run's outputs
        run.start_new("train_unet")
        for old in (out / "val").glob("step_*.png"):
            old.unlink()
    model = build_unet(config).to(device)
    ema = build_unet(config).to(device).eval().requires_grad_(False)
    if base is not None:
        model.load_state_dict(base.unet.state_dict())
        base.unet = None  # copied: not a third UNet in memory through the run
    ema.load_state_dict(model.state_dict())
    trainable = Trainable(model, ema, LoRAConfig(c.lora, c.lora_alpha, c.lora_targets) if c.lora else None)
    opt = build_optimizer(c.optimizer, optimizer_groups(trainable.module, c.weight_decay), c.lr, ADAMW_BETAS, device)
    if parts is not None:
        restore(parts, {**trainable.parts(), "optimizer": opt}, run.ckpt.root)
    if parts is not None and d.main:
        print(f"train_unet: resumed {out} at step {start_step} of {c.steps}", file=sys.stderr)
    ranks_rng = parts["rng"]["ranks"] if parts is not None else []
    if d.rank < len(ranks_rng):
        set_rng_state(ranks_rng[d.rank])
    else:  # a fresh run (or a rank the checkpoint did not record): per-rank dropout stream
        torch.manual_seed(c.seed * d.world + d.rank + start_step)
    net = model
    # LoRA's adapters hook into the frozen UNet from outside it: DDP would find nothing to train, so their
    # gradients are averaged over the ranks by hand after each backward pass instead
    average_by_hand = d.world > 1 and trainable.lora is not None
    if d.world > 1 and not average_by_hand:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None)
    schedule = (NoiseSchedule.from_name(c.schedule) if base is None else base.info.noise_schedule())
    min_snr = c.min_snr_gamma or None
    pipe = Pipeline(unet=ema, vae=vae, schedule=schedule, prediction=c.prediction, latent_shape=latent_shape,
                    autocast_dtype=torch.bfloat16 if device.type == "cuda" else None)
    val_encoded = None
    val_classes = list(range(num_classes)) if num_classes else None  # every class, one column each
    if c.text or c.cond:
        val_encoded = (cache.tokens[cache.val_rows].float(), cache.token_lengths[cache.val_rows],
                       (cache.tokens[cache.empty_row][None].float(), cache.token_lengths[cache.empty_row][None]))

    run_args = dataclasses.asdict(c)
    log = MetricsLog(out / "metrics.jsonl", resume_step=start_step if parts is not None else None, enabled=d.main)
    B, b = c.batch_size, c.batch_size // d.world
    if d.main:
        what = (f"text-conditional ({width}-wide tokens)" if c.text else f"{c.cond} ({width}-wide)" if c.cond else
                f"class-conditional ({num_classes} classes)" if c.class_cond else "unconditional")
        print(f"train_unet: {c.preset if base is None else 'pretrained'} UNet, "
              f"{count_parameters(model) / 1e6:.2f}M parameters ({trainable.describe()}), "
              f"{what}, {c.prediction}-prediction on the {schedule_spec} schedule; {N} cached latents "
              f"{latent_shape} of {dataset.describe()['name']}; {c.steps} steps of {B}"
              f"{f' ({d.world} processes x {b})' if d.world > 1 else ''} on {device}", file=sys.stderr)

    def checkpoint(step: int, gather: bool = True) -> None:
        if not finite.item():
            raise InputError(f"the loss became non-finite by step {step}; nothing was saved past the last "
                             f"checkpoint (lower --lr, now {c.lr}, and --resume)")
        check_finite(step, model, ema)
        states = d.gather(rng_state()) if gather else [rng_state()]
        if d.main:
            run.ckpt.save(step, {
                **{k: m.state_dict() for k, m in trainable.parts().items()}, "optimizer": opt.state_dict(),
                "rng": {"ranks": states},
                "run": {"args": run_args, "step": step, "data_position": step * B, "world_size": d.world,
                        "cache_keys": cache.keys, "dataset": dataset.describe()},
            })
        if gather:
            d.barrier()

    def validate(step: int) -> None:
        if d.main and c.task:
            i2i.save_validation(pipe, c.task, val_images, cache, c.val_steps, c.val_cfg, c.seed,
                           out / "val" / f"step_{step:07d}.png")
        elif d.main:
            save_validation(pipe, val_prompts, val_encoded, c.val_images, c.val_steps, c.val_cfg, c.seed,
                            out / "val" / f"step_{step:07d}.png", c.val_prompts, val_classes)
            plot_curves(log.read(), ["loss"], out / "loss.png", title="train_unet: diffusion loss")

    batches = Batches(cache, B, d, c.seed, c.cfg_drop, schedule.num_timesteps, device,
                      t_focus=(c.t_focus, c.t_focus_mean, c.t_focus_std), null_class=num_classes,
                      prior=(dataset.n_instance, c.prior_weight) if c.class_prompt else None)
    val_images = None
    if c.task:  # the sources of the conditioning: the cached items' images, rendered once
        images = i2i.rendered_images(dataset, N)
        attrs = [dataset.attributes(i) for i in range(N)] if hasattr(dataset, "attributes") else None
        batches = i2i.TaskBatches(batches, c.task, images, vae.eval().requires_grad_(False), schedule, c.seed,
                                  d.rank, attrs, config.noise_level_embed)
        val_images = images[:c.val_prompts].float().div(127.5).sub(1)  # (V, 3, H, W) training items
        pipe.meta["task"] = c.task
    ema_params, model_params = trainable.ema_params, trainable.params
    loss_sum, loss_count, shown_loss = torch.zeros((), device=device), 0, float("nan")
    finite = torch.ones((), dtype=torch.bool, device=device)  # every loss so far; read before any save
    progress = Progress(c.steps, initial=start_step, desc="train_unet", enabled=d.main and not quiet)
    step, saved_step, t_start = start_step, start_step if parts is not None else -1, time.perf_counter()
    model.train()
    try:
        with sigterm_as_interrupt():
            while step < c.steps:
                x0, t, noise, cond = batches(step)
                lr = learning_rate(c.lr, step, warmup=c.warmup, schedule=c.lr_schedule, total=c.steps,
                                   floor=COSINE_FLOOR)
                for group in opt.param_groups:
                    group["lr"] = lr
                weight = cond.pop("loss_weight", 1.0)  # (b,) with prior preservation
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    loss = (weight * diffusion_loss(net, x0, schedule, c.prediction, min_snr_gamma=min_snr, t=t,
                                                    noise=noise, **cond)).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if average_by_hand:
                    average_gradients(model_params, d.world)
                grad_norm = torch.nn.utils.clip_grad_norm_(model_params, c.grad_clip if c.grad_clip > 0 else math.inf)
                opt.step()
                decay = ema_decay(step, c.ema_decay)
                with torch.no_grad():
                    torch._foreach_lerp_(ema_params, model_params, 1.0 - decay)
                step += 1
                loss_sum += loss.detach()
                finite &= torch.isfinite(loss.detach())
                loss_count += 1
                if step % c.log_every == 0 or step == c.steps:
                    if d.world > 1:
                        dist.all_reduce(loss_sum)
                    shown_loss = loss_sum.item() / (loss_count * d.world)
                    loss_sum.zero_()
                    loss_count = 0
                    if not math.isfinite(shown_loss):
                        raise InputError(f"loss became {shown_loss} at step {step}; lower --lr (now {c.lr})")
                rate = progress.update(B, **({} if math.isnan(shown_loss) else {"loss": shown_loss}))
                if loss_count == 0:
                    log.write(step=step, loss=shown_loss, lr=lr, grad_norm=grad_norm.item(), ema_decay=decay,
                              images_per_s=rate, seconds=time.perf_counter() - t_start)
                if (c.val_every and step % c.val_every == 0) or step == c.steps:
                    validate(step)
                if step % c.ckpt_every == 0 or step == c.steps:
                    checkpoint(step)
                    saved_step = step
    except KeyboardInterrupt:
        progress.close()
        if step > saved_step:
            checkpoint(step, gather=False)
        if d.main:
            print(f"\ntrain_unet: interrupted at step {step}; checkpoint written, continue with --resume",
                  file=sys.stderr)
        return 130
    progress.close()
    train_seconds = time.perf_counter() - t_start

    digests = d.gather(weights_digest(trainable.module, trainable.ema_module))
    if len(set(digests)) > 1:
        raise InputError(f"the {d.world} processes ended with different weights: {digests}")
    if not d.main:
        d.barrier()  # the ranks tear their process group down together, after rank 0 has written everything
        return 0
    frames = sorted((out / "val").glob("step_*.png"))
    if frames:
        save_gif(frames, out / "val" / "progress.gif", duration_ms=GIF_FRAME_MS,
                 labels=[f"step {int(f.stem.split('_')[1])}" for f in frames])
    scores = None
    if c.eval:
        from ldm.metrics import HEADLINE, evaluate_prompts

        pipe.encoder = load_text_encoder(cache.keys["text"]["text_encoder"], device, text_options)
        scores = evaluate_prompts(pipe, n=c.eval, sampler=SAMPLER, steps=c.val_steps, cfg=c.val_cfg, seed=c.seed)
    enc_path = None if c.text_encoder is None else str(Path(c.text_encoder).resolve())  # None: the default
    info = UNetFile(config=config, prediction=c.prediction, schedule=schedule_spec,
                    num_timesteps=schedule.num_timesteps, latent_shape=latent_shape, resolution=resolution,
                    text_encoder=(TextEncoderSpec(path=enc_path, width=width, **(text_options or {}))
                                  if c.text else None),
                    vae=str(Path(c.vae).resolve()), vae_sha256=cache.keys["latents"]["vae_sha256"],
                    sampler=SAMPLER, sample_steps=c.val_steps, cfg_scale=c.val_cfg, val_prompts=val_prompts,
                    created_by=CREATED_BY,
                    extra={"conditioning": c.cond or ("text" if c.text else "class" if c.class_cond else "none"),
                           "task": c.task, **({"clip": cache.keys["clip"]["clip"]} if c.cond else {}),
                           "dataset": dataset.describe(), "cached_items": N, "steps": step, "batch_size": B,
                           "ema_decay": c.ema_decay, "eval": scores,
                           "training": {"world_size": d.world, "weights_sha256": digests,
                                        "seconds": round(train_seconds, 1)},
                           **({} if base is None else base.carried(c.init_from, trainable))})
    trainable.export(out, ema, info)
    plot_curves(log.read(), ["loss"], out / "loss.png", title="train_unet: diffusion loss")
    trained = step - start_step
    summary = (f"train_unet: {step} steps ({trained} in this process, {train_seconds:.0f} s, "
               f"{trained * B / max(train_seconds, 1e-9):.0f} img/s), loss {shown_loss:.4f}; "
               f"wrote {out / 'unet.safetensors'} (EMA) and {out / 'val' / 'progress.gif'}")
    if scores is not None:
        summary += f"; eval: {HEADLINE} {100 * scores[HEADLINE]:.1f}% of {scores['n']} prompts"
    if d.world > 1:
        summary += f"; {d.world} processes hold identical weights"
    print(summary, file=sys.stderr)
    d.barrier()  # the other ranks wait here since the digest check
    return 0
