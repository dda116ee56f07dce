"""Kept as run on the H200 of 2026-11-28 (bench/results/gpu-h200-2026-11-28-probe.txt): where does the fixed ~100-400 us per call of our kernels go on the GPU machine, and which
backend combination is fastest end to end? One short run."""
import json, os, sys, time, contextlib
import torch, torch.nn.functional as F
import triton, triton.language as tl
sys.path.insert(0, os.getcwd())
import kernels
from kernels import dispatch
import kernels.groupnorm as gn
at = sys.modules['kernels.attention']
OUT = os.environ.get("OUT", "/tmp")
res = {}
dev = "cuda"
def log(k, v):
    res[k] = v; print(f"{k}: {v}", flush=True)

def cpu_us(f, n=300):
    for _ in range(20): f()
    torch.cuda.synchronize(); s = time.perf_counter()
    for _ in range(n): f()
    t_cpu = (time.perf_counter() - s) / n * 1e6
    torch.cuda.synchronize(); t_all = (time.perf_counter() - s) / n * 1e6
    return round(t_cpu, 1), round(t_all, 1)

def graph_us(f, reps=20, n=20):
    """GPU time alone: f captured reps times in one CUDA graph, replayed."""
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3): f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps): f()
    g.replay(); torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(n): g.replay()
    b.record(); torch.cuda.synchronize()
    return round(a.elapsed_time(b) * 1e3 / (n * reps), 2)

@triton.jit
def _k1(X, n, B: tl.constexpr):
    o = tl.arange(0, B); tl.store(X + o, tl.load(X + o, mask=o < n), mask=o < n)
@triton.jit
def _k12(X0, X1, X2, X3, X4, X5, X6, X7, X8, X9, X10, X11, n, B: tl.constexpr):
    o = tl.arange(0, B); tl.store(X0 + o, tl.load(X11 + o, mask=o < n), mask=o < n)

x = torch.zeros(1024, device=dev)
log("launch/torch add_ (cpu us, incl sync)", cpu_us(lambda: x.add_(1)))
log("launch/triton 1 ptr", cpu_us(lambda: _k1[(1,)](x, 1024, B=1024)))
ptrs = [torch.zeros(1024, device=dev) for _ in range(12)]
log("launch/triton 12 ptrs", cpu_us(lambda: _k12[(1,)](*ptrs, 1024, B=1024)))
try:
    b = _k1[(1,)](x, 1024, B=1024)
    log("launch/triton CompiledKernel direct", cpu_us(lambda: b[(1, 1, 1)](x, 1024)))
except Exception as e:
    log("launch/direct error", repr(e)[:200])

bf = torch.bfloat16
for shape in [(2, 320, 8, 8), (2, 320, 64, 64), (2, 1280, 16, 16), (1, 128, 512, 512), (1, 256, 256, 256)]:
    xg = torch.randn(shape, device=dev, dtype=bf); w = torch.randn(shape[1], device=dev, dtype=bf); bb = torch.randn_like(w)
    k = "x".join(map(str, shape))
    log(f"gn/{k}/eager cpu,all", cpu_us(lambda: F.silu(F.group_norm(xg, 32, w, bb))))
    log(f"gn/{k}/launcher cpu,all", cpu_us(lambda: gn.group_norm_forward(xg, 32, w, bb, silu=True)))
    log(f"gn/{k}/custom-op cpu,all", cpu_us(lambda: gn.group_norm_fwd_op(xg, w, bb, None, 32, 1e-5, True, gn.MAX_TILE)))
    log(f"gn/{k}/public cpu,all", cpu_us(lambda: gn.group_norm(xg, 32, w, bb, silu=True, backend="triton")))
    log(f"gn/{k}/graph us eager", graph_us(lambda: F.silu(F.group_norm(xg, 32, w, bb))))
    log(f"gn/{k}/graph us ours", graph_us(lambda: gn.group_norm_forward(xg, 32, w, bb, silu=True)))
    xr = xg.detach().requires_grad_(); dy = torch.randn_like(xg)
    def fb_e():
        torch.autograd.grad(F.silu(F.group_norm(xr, 32, w, bb)), xr, dy)
    def fb_o():
        torch.autograd.grad(gn.group_norm(xr, 32, w, bb, silu=True, backend="triton"), xr, dy)
    log(f"gn/{k}/fwd+bwd cpu,all eager", cpu_us(fb_e, 100))
    log(f"gn/{k}/fwd+bwd cpu,all ours", cpu_us(fb_o, 100))

from torch.nn.attention import sdpa_kernel, SDPBackend
for (B, N, Nk, H, D) in [(1, 64, 77, 8, 160), (2, 4096, 4096, 8, 40), (2, 1024, 1024, 8, 80), (2, 4096, 77, 8, 40), (1, 4096, 4096, 1, 512)]:
    q = torch.randn(B, N, H, D, device=dev, dtype=bf); kk = torch.randn(B, Nk, H, D, device=dev, dtype=bf); v = torch.randn_like(kk)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, kk, v))
    key = f"attn/{B}x{N}x{Nk}h{H}d{D}"
    log(f"{key}/sdpa cpu,all", cpu_us(lambda: F.scaled_dot_product_attention(qt, kt, vt), 100))
    log(f"{key}/ours launcher cpu,all", cpu_us(lambda: at.attention_forward(q, kk, v, D ** -0.5), 100))
    log(f"{key}/ours public cpu,all", cpu_us(lambda: at.attention(q, kk, v, backend="triton"), 100))
    log(f"{key}/graph us sdpa", graph_us(lambda: F.scaled_dot_product_attention(qt, kt, vt), 5, 10))
    log(f"{key}/graph us ours", graph_us(lambda: at.attention_forward(q, kk, v, D ** -0.5), 5, 10))
json.dump(res, open(f"{OUT}/probe.json", "w"), indent=1)

# end to end: every backend combination, sd15 train step batch 8 and sd VAE decode batch 4
from ldm.unet import UNet, UNET_CONFIGS as UP
from autoencoder import VAE, VAE_CONFIGS as VP
from ldm.diffusion import NoiseSchedule, diffusion_loss
def combo(attn, norm):
    st = contextlib.ExitStack()
    st.enter_context(dispatch.use_backend(attn, ("attention",)))
    st.enter_context(dispatch.use_backend(norm, ("groupnorm",)))
    return st
unet = UNet(UP["sd15"]).to(dev)
opt = torch.optim.AdamW(unet.parameters(), lr=1e-6)
sched = NoiseSchedule.from_name("scaled_linear")
x0 = torch.randn(8, 4, 64, 64, device=dev); ctx = torch.randn(8, 77, 768, device=dev)
def step():
    with torch.autocast("cuda", dtype=bf):
        loss = diffusion_loss(unet, x0, sched, context=ctx).mean()
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
combos = [("torch", "torch"), ("triton", "triton"), ("torch", "triton"), ("triton", "torch")]
for rnd in range(2):
    for a, n in combos:
        with combo(a, n):
            for _ in range(2): step()
            torch.cuda.synchronize(); s = time.perf_counter()
            for _ in range(4): step()
            torch.cuda.synchronize()
            log(f"e2e/unet train sd15 b8/attn={a} gn={n}/round{rnd} ms", round((time.perf_counter() - s) / 4 * 1e3, 1))
del unet, opt; torch.cuda.empty_cache()
vae = VAE(VP["sd"]).to(dev).eval()
z = torch.randn(4, 4, 64, 64, device=dev); img = torch.randn(4, 3, 512, 512, device=dev)
for rnd in range(2):
    for a, n in combos:
        with combo(a, n), torch.no_grad(), torch.autocast("cuda", dtype=bf):
            for mode, f in (("decode", lambda: vae.decode(z)), ("encode", lambda: vae.encode(img))):
                for _ in range(2): f()
                torch.cuda.synchronize(); s = time.perf_counter()
                for _ in range(5): f()
                torch.cuda.synchronize()
                log(f"e2e/vae {mode} sd b4/attn={a} gn={n}/round{rnd} ms", round((time.perf_counter() - s) / 5 * 1e3, 1))
json.dump(res, open(f"{OUT}/probe.json", "w"), indent=1)
print("done")
