"""Kept as run on the H200 of 2026-11-28 (bench/results/gpu-h200-2026-11-28-verify.txt): the auto rule of kernels.dispatch against all-PyTorch and all-Triton, end to end, alternating."""
import os, sys, time, json
import torch
sys.path.insert(0, os.getcwd())
from kernels import dispatch
from ldm.unet import UNet, UNET_CONFIGS
from autoencoder import VAE, VAE_CONFIGS
from ldm.diffusion import NoiseSchedule, diffusion_loss
dev, bf = "cuda", torch.bfloat16
res = {}
def log(k, v):
    res[k] = v; print(f"{k}: {v}", flush=True)
MODES = {"auto": "auto", "torch": "torch", "triton": "triton"}
def timed(f, n):
    torch.cuda.synchronize(); s = time.perf_counter()
    for _ in range(n): f()
    torch.cuda.synchronize(); return (time.perf_counter() - s) / n * 1e3
unet = UNet(UNET_CONFIGS["sd15"]).to(dev)
opt = torch.optim.AdamW(unet.parameters(), lr=1e-6)
sched = NoiseSchedule.from_name("scaled_linear")
x0 = torch.randn(8, 4, 64, 64, device=dev); ctx = torch.randn(8, 77, 768, device=dev)
def step():
    with torch.autocast("cuda", dtype=bf):
        loss = diffusion_loss(unet, x0, sched, context=ctx).mean()
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
for m in MODES:
    with dispatch.use_backend(m):
        step(); step()
times = {m: [] for m in MODES}
for rnd in range(4):
    for m in MODES:
        with dispatch.use_backend(m):
            times[m].append(round(timed(step, 3), 1))
for m in MODES: log(f"unet sd15 train step b8 ms [{m}]", times[m])
del unet, opt; torch.cuda.empty_cache()
vae = VAE(VAE_CONFIGS["sd"]).to(dev).eval()
z = torch.randn(4, 4, 64, 64, device=dev); img = torch.randn(4, 3, 512, 512, device=dev)
for mode, f in (("decode", lambda: vae.decode(z)), ("encode", lambda: vae.encode(img))):
    with torch.no_grad(), torch.autocast("cuda", dtype=bf):
        for m in MODES:
            with dispatch.use_backend(m):
                f(); f()
        times = {m: [] for m in MODES}
        for rnd in range(4):
            for m in MODES:
                with dispatch.use_backend(m):
                    times[m].append(round(timed(f, 4), 1))
    for m in MODES: log(f"vae sd {mode} b4 512px ms [{m}]", times[m])
json.dump(res, open(os.environ.get("OUT", "/tmp") + "/verify.json", "w"), indent=1)
print("done")
