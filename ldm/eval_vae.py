"""`python -m ldm.eval_vae --ckpt DIR`: PSNR and SSIM of a trained VAE's reconstructions.

    python -m ldm.eval_vae --ckpt runs/vae                 # held-out built-in images (the eval split)
    python -m ldm.eval_vae --ckpt runs/vae --data DIR      # the images of a folder

Reconstructions go through the posterior mean. PSNR is averaged over images (pixels in [0, 1]);
SSIM is Wang et al. 2004 ("Image quality assessment: from error visibility to structural
similarity"): an 11 x 11 Gaussian window of sigma 1.5, K1 = 0.01, K2 = 0.03, computed per
channel over the valid region and averaged.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch
import torch.nn.functional as F

SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1]: (B, C, H, W) x 2 -> (B,)."""
    mse = ((x.float() - y.float()) / 2).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
    return -10.0 * torch.log10(mse)


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    t = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-t * t / (2 * sigma * sigma))
    return g / g.sum()  # (size,)


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Per-image SSIM of images in [-1, 1]: (B, C, H, W) x 2 -> (B,). H and W must be >= ``window``."""
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"ssim: expected two (B, C, H, W) tensors of one shape, "
                         f"got {tuple(x.shape)} and {tuple(y.shape)}")
    if min(x.shape[-2:]) < window:
        raise ValueError(f"ssim: images {tuple(x.shape[-2:])} are smaller than the {window} x {window} window")
    x, y = (x.double() + 1) / 2, (y.double() + 1) / 2  # dynamic range L = 1
    C = x.shape[1]
    g = _gaussian_window(window, sigma).to(x.device)

    def blur(t: torch.Tensor) -> torch.Tensor:  # separable, valid region: (B, C, H - w + 1, W - w + 1)
        t = F.conv2d(t, g.view(1, 1, 1, -1).expand(C, 1, 1, window), groups=C)
        return F.conv2d(t, g.view(1, 1, -1, 1).expand(C, 1, window, 1), groups=C)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x * mu_x
    var_y = blur(y * y) - mu_y * mu_y
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return s.mean(dim=(1, 2, 3)).float()


@torch.no_grad()
def evaluate(vae, dataset, n: int, batch_size: int = 64, device: str | torch.device = "cpu") -> dict:
    """Mean PSNR and SSIM of posterior-mean reconstructions of the first ``n`` items of ``dataset``."""
    n = min(n, len(dataset))
    if n <= 0:
        raise ValueError("evaluate: no images to evaluate")
    was_training = vae.training
    vae.eval()
    p, s = [], []
    for start in range(0, n, batch_size):
        x = torch.stack([dataset[i]["image"] for i in range(start, min(start + batch_size, n))]).to(device)
        x = x.contiguous(memory_format=torch.channels_last)
        recon = vae.decode(vae.encode(x).mode()).clamp(-1, 1)
        p.append(psnr(recon, x))
        if min(x.shape[-2:]) >= SSIM_WINDOW:
            s.append(ssim(recon, x))
    vae.train(was_training)
    out = {"psnr": torch.cat(p).mean().item(), "images": n}
    out["ssim"] = torch.cat(s).mean().item() if s else math.nan
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ldm.eval_vae", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="folder holding vae.safetensors and vae.json (train_vae's --out)")
    parser.add_argument("--data", default=None,
                        help="image folder to evaluate on (default: the built-in dataset's held-out eval split)")
    parser.add_argument("--caption-column", default="text", help="caption column of metadata.jsonl (with --data)")
    parser.add_argument("--resolution", type=int, default=None,
                        help="image side (default: the resolution the VAE was trained at)")
    parser.add_argument("--n", type=int, default=512, help="how many images to evaluate (default 512)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the built-in eval split (default 0)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line")
    args = parser.parse_args(argv)
    if args.n <= 0 or args.batch_size <= 0:
        parser.error("--n and --batch-size must be positive")

    from ldm.data import open_dataset
    from ldm.pretrained import load_vae

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        vae, meta = load_vae(args.ckpt, device)
        resolution = args.resolution or meta.get("resolution")
        f = vae.config.downsample_factor
        if not resolution or resolution % f:
            raise ValueError(f"--resolution {resolution} is not divisible by the VAE's downsampling factor {f}")
        dataset = open_dataset(args.data, resolution, split="eval", seed=args.seed,
                               caption_column=args.caption_column)
        result = evaluate(vae, dataset, args.n, args.batch_size, device)
    except (FileNotFoundError, ValueError) as e:
        print(f"eval_vae: error: {e}", file=sys.stderr)
        return 2
    where = f"folder {args.data}" if args.data else f"built-in eval split (seed {args.seed})"
    result.update(ckpt=str(args.ckpt), data=where, resolution=resolution)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"PSNR {result['psnr']:.2f} dB   SSIM {result['ssim']:.4f}   "
              f"on {result['images']} images of the {where}, {resolution} x {resolution}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
