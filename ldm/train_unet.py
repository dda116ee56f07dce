"""`python -m ldm.train_unet [--text]`: train the latent-diffusion UNet on cached VAE latents (and text tokens).

    python -m ldm.train_unet --text                     # the CPU demo: built-in shapes, runs/vae's VAE, MiniLM
    python -m ldm.train_unet                            # an unconditional model of the same data
    python -m ldm.train_unet --text --resume            # continue runs/unet from its last checkpoint
    python -m ldm.train_unet --data digits --class-cond --vae runs/digits-vae --out runs/digits-unet
    python -m ldm.train_unet --text --data DIR --preset small --text-encoder PATH --batch-size 256
    python -m ldm.train_unet --text --init-from SD_FOLDER --data DIR --lora 16 --out runs/lora   # LoRA on SD 1.x
    python -m ldm.train_unet --text --init-from runs/unet --data DIR --lora 8 --lora-targets attn+ff
    python -m ldm.train_unet --text --init-from SD_FOLDER --data DOG_PHOTOS --class-prompt "a photo of a dog" \
        --class-images 200 --lr 5e-6 --steps 800 --out runs/dreambooth     # DreamBooth, captions "a photo of sks dog"
    python -m ldm.train_unet --text --init-from SD_FOLDER --data DIR --buckets --lora 16   # keep aspect ratios
    python -m ldm.train_unet --text --init-from SD_FOLDER --data DIR --grad-checkpointing --optimizer adamw8bit
    python -m ldm.train_unet --text --task inpaint --out runs/inpaint   # image-conditioned (ldm.image2image):
    python -m ldm.train_unet --text --task palette --out runs/palette   # inpaint, outpaint, colorize, sr in one
    python -m ldm.train_unet --cond clip-image --clip runs/clip --out runs/decoder   # the unCLIP decoder
    torchrun --nproc_per_node 8 -m ldm.train_unet --text --data DIR --preset small   # DDP, one GPU a process

The latent cache (``--cache-dir``, default ``OUT/cache``) is built once: the VAE's posterior mean
and std of the first ``--cache-images`` items (scaled to unit variance with the VAE's latent scale
factor and mean), so every step draws a fresh latent sample; with ``--text`` also the captions'
token states, each distinct caption encoded once (fp16), plus the empty prompt that replaces
``--cfg-drop`` of the captions for classifier-free guidance and the validation prompts. Each file
records what it was built from (VAE digest, dataset, resolution, text encoder, item count): a
changed input rebuilds it, an unchanged one is reused.

A shell over ``ldm.unet_training.train`` (the loop), ``ldm.latent_cache`` and ``ldm.distributed``:
the flags fill a ``TrainConfig``. The output folder holds ``unet.safetensors`` (EMA weights) +
``unet.json`` (config, prediction, noise schedule, text encoder, VAE folder, latent shape,
validation prompts, sampling defaults), ``val/step_XXXXXXX.png`` (the EMA model on fixed prompts
and noise) and ``val/progress.gif``, ``metrics.jsonl``, ``loss.png`` and ``checkpoints/`` (model,
EMA, optimizer, step, RNG, data position; atomic). A run killed at any moment resumes with
``--resume`` and, for the same seed, ends with the same weights as an uninterrupted run; Ctrl-C
and SIGTERM write a checkpoint first.

Many processes: under ``torchrun`` each rank trains on its shard of every global batch with
DistributedDataParallel (NCCL on GPUs, gloo on CPUs). The noise, timesteps and caption drops of
step ``s`` are drawn for the whole global batch from seed (``--seed``, ``s``) and each rank takes
its shard's rows, so the ranks' noise differs and the run does not depend on how many processes
share it (up to the order of floating-point sums). Rank 0 builds the cache, logs, validates and saves.
"""

from __future__ import annotations

import argparse
import sys

import torch.distributed as dist

from ldm.data.shapes import CAPTION_STYLES
from ldm.diffusion import PREDICTIONS, SCHEDULES
from ldm.distributed import init_distributed
from ldm.errors import InputError
from ldm.lora import LORA_TARGETS
from ldm.image2image import TRAIN_TASKS
from ldm.trainer import OPTIMIZERS, config_from_args, given_fields
from ldm.unclip_decoder import COND
from ldm.unet import UNET_CONFIGS
from ldm.unet_training import DEMO, EMA_WARMUP, TrainConfig, train


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ldm.train_unet", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    data = p.add_argument_group("data and cache")
    data.add_argument("--vae", default="runs/vae", metavar="DIR",
                      help="VAE folder from ldm.train_vae (default runs/vae); images are its resolution. With "
                           "--init-from: the folder's VAE unless given")
    data.add_argument("--resolution", type=int, default=None, metavar="PX",
                      help="images at this side instead of the VAE's (its convolutions take any multiple of its "
                           "factor: the demo VAE serves a 64-px super-resolution stage); the UNet records its latent "
                           "shape (default: the VAE's resolution)")
    data.add_argument("--data", default=None, metavar="DIR",
                      help="image folder (metadata.jsonl or .txt captions), or 'digits' for the real handwritten "
                           "digits (ldm.data.digits, at the VAE's resolution); default: the built-in shapes")
    data.add_argument("--caption-column", default="text", help="caption column of metadata.jsonl (default text)")
    data.add_argument("--captions", choices=CAPTION_STYLES, default=DEMO.captions,
                      help=f"built-in shapes: the six template captions, or captions in many words and frames "
                           f"(ldm.data.wording, training-side words only), varied-drop: some leave one attribute "
                           f"unsaid (default {DEMO.captions})")
    data.add_argument("--cache-images", type=int, default=DEMO.cache_images,
                      help=f"items of the dataset to encode into the cache (default {DEMO.cache_images}; "
                           "a folder gives at most its size)")
    data.add_argument("--cache-dir", default=None, metavar="DIR",
                      help="where the latent and text caches live (default OUT/cache); runs may share one")
    data.add_argument("--buckets", action="store_true",
                      help="aspect-ratio buckets: each picture of --data DIR goes to the size (about the resolution's "
                           "pixel count, sides at most 2:1) nearest its aspect ratio and keeps its framing; every "
                           "batch comes from one bucket (default: crop square)")
    data.add_argument("--workers", type=int, default=0, help="data loader processes while caching (default 0)")
    text = p.add_argument_group("conditioning")
    text.add_argument("--text", action="store_true", help="condition on captions (default: unconditional)")
    text.add_argument("--text-encoder", default=None, metavar="PATH",
                      help="local Hugging Face text encoder folder (default: the packaged all-MiniLM-L6-v2); "
                           "the UNet's context width follows it")
    text.add_argument("--cfg-drop", type=float, default=DEMO.cfg_drop,
                      help=f"share of captions replaced by the empty prompt (or of class labels by the null "
                           f"class), for classifier-free guidance (default {DEMO.cfg_drop})")
    text.add_argument("--class-cond", action="store_true",
                      help="condition on the class labels of a labelled dataset (--data digits) instead of text: "
                           "a learned class embedding, with a null class for guidance")
    text.add_argument("--task", choices=TRAIN_TASKS, default=None,
                      help="condition on an image too (ldm.image2image): inpaint (boxes, strokes, the shape's box), "
                           "outpaint (half the image), colorize (the greyscale image), sr (the image at 1/2 or "
                           "1/4 of the side, noise-augmented) or palette (all four in one model)")
    text.add_argument("--cond", choices=(COND,), default=None,
                      help=f"{COND}: the unCLIP decoder (ldm.unclip_decoder), conditioned on the --clip model's "
                           "image embedding of each training image, dropped to zeros for guidance (--cfg-drop)")
    text.add_argument("--clip", default=None, metavar="DIR",
                      help=f"with --cond {COND}: the CLIP folder (python -m ldm.train_clip) that embeds the images")
    model = p.add_argument_group("model and objective")
    model.add_argument("--preset", choices=list(UNET_CONFIGS), default=DEMO.preset,
                       help=f"UNet size (default {DEMO.preset})")
    model.add_argument("--unet-override", action="append", default=[], metavar="KEY=VALUE",
                       help="replace a field of the preset's UNetConfig, VALUE in JSON, e.g. model_channels=32 "
                            "or channel_mult=[1,2,2] (repeatable)")
    model.add_argument("--prediction", choices=PREDICTIONS, default=DEMO.prediction,
                       help=f"what the UNet predicts: the noise, v (Salimans & Ho 2022) or the clean latent "
                            f"(default {DEMO.prediction})")
    model.add_argument("--schedule", choices=list(SCHEDULES), default=DEMO.schedule,
                       help=f"noise schedule, 1000 steps (default {DEMO.schedule})")
    model.add_argument("--min-snr-gamma", type=float, default=DEMO.min_snr_gamma,
                       help=f"Min-SNR loss weighting gamma; 0 turns it off (default {DEMO.min_snr_gamma})")
    model.add_argument("--t-focus", type=float, default=DEMO.t_focus,
                       help=f"share of training timesteps drawn from a logit-normal over t/T instead of uniformly, "
                            f"to train more where the samples' content is decided; 0: uniform (default {DEMO.t_focus})")
    model.add_argument("--t-focus-mean", type=float, default=DEMO.t_focus_mean,
                       help=f"mean of that logit-normal, in logit(t/T) (default {DEMO.t_focus_mean}: t/T = 0.3)")
    model.add_argument("--t-focus-std", type=float, default=DEMO.t_focus_std,
                       help=f"standard deviation of that logit-normal (default {DEMO.t_focus_std})")
    model.add_argument("--grad-checkpointing", action="store_true",
                       help="recompute activations in the backward pass to save memory")
    tune = p.add_argument_group("fine-tuning (ldm.finetune, ldm.lora)")
    tune.add_argument("--init-from", default=None, metavar="PATH",
                      help="start from a pretrained model: a diffusers Stable Diffusion 1.x folder or a folder of "
                           "ours; its UNet, VAE, text encoder (and tokenization), schedule and prediction replace "
                           "--preset, --vae (unless given), --text-encoder, --schedule and --prediction")
    tune.add_argument("--class-prompt", default=None, metavar="TEXT",
                      help="DreamBooth prior preservation: before training the --init-from model draws --class-images "
                           "pictures of TEXT (e.g. 'a photo of a dog'); each batch is half --data's pictures, half "
                           "those, the loss instance + --prior-weight x class")
    tune.add_argument("--class-images", type=int, default=DEMO.class_images, metavar="N",
                      help=f"pictures of --class-prompt to draw, once, into OUT/class_images "
                           f"(default {DEMO.class_images})")
    tune.add_argument("--prior-weight", type=float, default=DEMO.prior_weight,
                      help=f"weight of the class pictures' loss (default {DEMO.prior_weight})")
    tune.add_argument("--lora", type=int, default=0, metavar="RANK",
                      help="train only LoRA adapters of this rank (the UNet frozen); writes OUT/lora.safetensors in "
                           "diffusers' layout beside the merged model (default 0: train every weight)")
    tune.add_argument("--lora-alpha", type=float, default=None, metavar="A",
                      help="LoRA alpha: the update is scaled by alpha / rank (default: the rank, scale 1)")
    tune.add_argument("--lora-targets", choices=LORA_TARGETS, default=DEMO.lora_targets,
                      help="layers that get adapters: attention projections, also the feed-forward, or every "
                           f"linear and convolution (default {DEMO.lora_targets})")
    train = p.add_argument_group("training")
    train.add_argument("--steps", type=int, default=DEMO.steps, help=f"optimizer steps (default {DEMO.steps})")
    train.add_argument("--batch-size", type=int, default=DEMO.batch_size,
                       help=f"latents per step over all processes (default {DEMO.batch_size})")
    train.add_argument("--lr", type=float, default=DEMO.lr, help=f"AdamW learning rate (default {DEMO.lr})")
    train.add_argument("--lr-schedule", choices=("constant", "cosine"), default=DEMO.lr_schedule,
                       help=f"after warm-up: constant, or cosine decay to 10%% at the last step "
                            f"(default {DEMO.lr_schedule})")
    train.add_argument("--warmup", type=int, default=DEMO.warmup,
                       help=f"steps of linear learning-rate warm-up (default {DEMO.warmup})")
    train.add_argument("--weight-decay", type=float, default=DEMO.weight_decay,
                       help=f"AdamW weight decay of weight matrices and kernels (default {DEMO.weight_decay})")
    train.add_argument("--optimizer", choices=OPTIMIZERS, default=DEMO.optimizer,
                       help="adamw (PyTorch's, fused on CPU and CUDA) or adamw8bit (bitsandbytes' 8-bit moments: "
                            "2 bytes of state per parameter instead of 8; needs bitsandbytes) "
                            f"(default {DEMO.optimizer})")
    train.add_argument("--grad-clip", type=float, default=DEMO.grad_clip,
                       help=f"clip the gradient norm to this; 0 turns clipping off (default {DEMO.grad_clip})")
    train.add_argument("--ema-decay", type=float, default=DEMO.ema_decay,
                       help=f"EMA decay, warmed up as (1 + step) / ({EMA_WARMUP} + step) (default {DEMO.ema_decay})")
    train.add_argument("--seed", type=int, default=0, help="seed of weights, data order and noise (default 0)")
    train.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda when available; "
                                                        "under torchrun: cuda:LOCAL_RANK)")
    train.add_argument("--threads", type=int, default=None,
                       help="CPU threads for PyTorch (default: the cores divided among the processes)")
    out = p.add_argument_group("output")
    out.add_argument("--out", default="runs/unet", help="output folder (default runs/unet)")
    out.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    out.add_argument("--ckpt-every", type=int, default=250, help="steps between checkpoints (default 250)")
    out.add_argument("--val-every", type=int, default=DEMO.val_every,
                     help=f"steps between validation grids; 0: only at the end (default {DEMO.val_every})")
    out.add_argument("--val-steps", type=int, default=DEMO.val_steps,
                     help=f"sampler steps of the validation grids, also unet.json's default (default "
                          f"{DEMO.val_steps})")
    out.add_argument("--val-cfg", type=float, default=DEMO.val_cfg,
                     help=f"guidance scale of the validation grids, also unet.json's default (default "
                          f"{DEMO.val_cfg})")
    out.add_argument("--log-every", type=int, default=10, help="steps between metrics rows (default 10)")
    out.add_argument("--eval", type=int, default=0, metavar="N",
                     help="at the end, score N held-out built-in prompts with ldm.eval_text (default 0: off)")
    out.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    config = config_from_args(TrainConfig, args)
    try:
        d, device = init_distributed(config.device)
    except InputError as e:
        print(f"train_unet: error: {e}", file=sys.stderr)
        return 2
    try:
        return train(config, d, device, resume=args.resume, given=given_fields(parser, argv), quiet=args.quiet)
    except InputError as e:
        where = f" (rank {d.rank})" if d.world > 1 else ""
        if d.main or d.world > 1:
            print(f"train_unet: error{where}: {e}", file=sys.stderr)
        return 2
    finally:
        if d.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
