"""The checks of a ``TrainConfig`` (``ldm.unet_training``) before a run touches anything: every flag no
run can take, and ``--unet-override``'s KEY=VALUE pairs, as one-line InputErrors naming the flag."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING

from ldm import image2image as i2i
from ldm.data import BUILTIN, is_builtin
from ldm.distributed import Dist
from ldm.errors import InputError
from ldm.lora import LoRAConfig
from ldm.trainer import check_optimizer, check_positive
from ldm.unet import UNetConfig

if TYPE_CHECKING:
    from ldm.unet_training import TrainConfig

FIXED_FIELDS = ("in_channels", "out_channels", "context_dim", "num_classes")  # the VAE's, the encoder's, the data's


def parse_overrides(items: list[str]) -> dict:
    """``KEY=VALUE`` strings (VALUE in JSON) -> UNetConfig fields; the widths are not among them."""
    names = {f.name for f in dataclasses.fields(UNetConfig)}
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in names:
            raise InputError(f"--unet-override {item!r}: expected KEY=VALUE with KEY a UNetConfig field "
                             f"({', '.join(sorted(names - set(FIXED_FIELDS)))})")
        if key in FIXED_FIELDS:
            raise InputError(f"--unet-override {key}: set by the VAE's latent channels, the text encoder's width "
                             "and the dataset's classes")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def check_config(c: TrainConfig, d: Dist) -> None:
    """InputError naming the flag for a value no run can take."""
    check_positive(c, ("steps", "batch_size", "ckpt_every", "log_every", "val_steps", "cache_images", "threads",
                       "resolution"))
    check_positive(c, ("warmup", "val_every", "eval", "workers", "weight_decay", "grad_clip",
                       "min_snr_gamma"), strict=False)
    if c.lr <= 0:
        raise InputError(f"--lr must be positive, got {c.lr}")
    check_optimizer(c.optimizer)
    if not 0 <= c.ema_decay < 1:
        raise InputError(f"--ema-decay must lie in [0, 1), got {c.ema_decay}")
    if not 0 <= c.t_focus <= 1:
        raise InputError(f"--t-focus must lie in [0, 1], got {c.t_focus}")
    if c.t_focus_std <= 0:
        raise InputError(f"--t-focus-std must be positive, got {c.t_focus_std}")
    if c.val_cfg < 0:
        raise InputError(f"--val-cfg must be >= 0 (1: no guidance), got {c.val_cfg}")
    if not 0 <= c.cfg_drop < 1:
        raise InputError(f"--cfg-drop must lie in [0, 1), got {c.cfg_drop}")
    if c.batch_size % d.world:
        raise InputError(f"--batch-size {c.batch_size} does not split over {d.world} processes")
    if not is_builtin(c.data) and not Path(c.data).is_dir():
        raise InputError(f"--data: folder not found: {c.data} (built-in: {', '.join(BUILTIN)})")
    if c.class_cond and c.text:
        raise InputError("--class-cond and --text: pick one conditioning")
    if c.class_cond and c.data not in BUILTIN:
        raise InputError("--class-cond needs a labelled dataset: --data digits")
    if c.text_encoder is not None and not c.text:
        raise InputError("--text-encoder needs --text (without it the UNet is unconditional)")
    if c.text_encoder is not None and not (Path(c.text_encoder) / "config.json").is_file():
        raise InputError(f"--text-encoder: {c.text_encoder} has no config.json "
                         "(expected a local Hugging Face model folder)")
    if c.task is not None and c.task not in i2i.TRAIN_TASKS:
        raise InputError(f"--task {c.task!r}: expected one of {', '.join(i2i.TRAIN_TASKS)}")
    if c.eval and c.task:
        raise InputError("--eval scores text-to-image; score a --task model with python -m ldm.eval_image2image")
    if c.eval and not c.text:
        raise InputError("--eval scores prompts; it needs --text")
    if c.init_from is not None and not c.text:
        raise InputError("--init-from fine-tunes a text-to-image model: it needs --text")
    if c.buckets and is_builtin(c.data):
        raise InputError("--buckets groups the pictures of an image folder by aspect ratio: it needs --data DIR")
    if c.class_prompt is not None:
        if c.init_from is None or is_builtin(c.data) or c.buckets:
            raise InputError("--class-prompt (prior preservation) needs --init-from and --data DIR, without --buckets")
        if c.class_images <= 0 or c.prior_weight < 0 or c.batch_size % (2 * d.world):
            raise InputError(f"--class-prompt needs --class-images >= 1 (got {c.class_images}), --prior-weight >= 0 "
                             f"(got {c.prior_weight}) and an even --batch-size per process (got {c.batch_size})")
    if c.lora < 0:
        raise InputError(f"--lora is a rank >= 1 (0: off), got {c.lora}")
    if c.lora:
        try:
            LoRAConfig(c.lora, c.lora_alpha, c.lora_targets)
        except ValueError as e:
            raise InputError(f"--lora: {e}") from None
    if c.eval and c.data is not None:
        raise InputError("--eval scores the built-in shapes; it does not apply to --data")
