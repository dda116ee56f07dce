"""`python -m bench.finetune_memory`: the activation memory of fine-tuning the SD 1.x UNet at 512 px, counted.

The UNet runs forward on the meta device (shapes, no storage, no time) in bf16 under
``saved_tensors_hooks``, which sees every tensor autograd keeps for the backward pass; the bytes at
batch 1 and 2 give the per-image activations and the fixed part (the bf16 weight copies). With
PyTorch's attention path, which keeps the attention probabilities: an upper bound for the Triton
kernel, which keeps only the output and the log-sum-exp. The README's "Fine-tune Stable Diffusion"
table adds the weights, gradients, AdamW moments and EMA from the parameter count.
"""

from __future__ import annotations

import sys

import torch

from kernels import use_backend
from ldm.lora import LoRA, LoRAConfig
from ldm.unet import UNet, count_parameters, unet_config

GIB = 2**30
LATENT = 64  # 512 px through the SD VAE's factor 8
TOKENS, WIDTH = 77, 768  # CLIP ViT-L/14's context


def saved_bytes(checkpointing: bool, batch: int) -> int:
    """Bytes autograd saves in one forward of the sd15 UNet (bf16, training mode)."""
    with torch.device("meta"):
        unet = UNet(unet_config("sd15", gradient_checkpointing=checkpointing)).to(torch.bfloat16).train()
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    x = torch.empty(batch, 4, LATENT, LATENT, device="meta", dtype=torch.bfloat16)
    t = torch.empty(batch, device="meta", dtype=torch.bfloat16)
    context = torch.empty(batch, TOKENS, WIDTH, device="meta", dtype=torch.bfloat16)
    with use_backend("torch"), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        unet(x, t, context)
    return total


def main() -> int:
    with torch.device("meta"):
        unet = UNet(unet_config("sd15"))
    n = count_parameters(unet)
    print(f"sd15 UNet: {n} parameters, fp32 weights {4 * n / GIB:.2f} GiB (gradients the same, AdamW 2x, EMA 1x); "
          f"8-bit AdamW moments {(2 + 8 / 256) * n / GIB:.2f} GiB (a byte each + a float32 scale per 256)")
    for ckpt in (False, True):
        one, two = saved_bytes(ckpt, 1), saved_bytes(ckpt, 2)
        print(f"gradient checkpointing {ckpt}: activations {(two - one) / GIB:.2f} GiB per image, "
              f"fixed {(2 * one - two) / GIB:.2f} GiB")
    for targets in ("attn", "attn+ff", "all"):
        lora = LoRA(unet, LoRAConfig(16, targets=targets))
        k = sum(p.numel() for p in lora.parameters())
        print(f"LoRA rank 16 {targets}: {len(lora.names)} layers, {k} parameters ({4 * k / 2**20:.1f} MiB fp32)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
