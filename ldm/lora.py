"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") on our UNet, and its file
in the key layout diffusers' ``load_lora_weights`` reads.

A LoRA adds ``scale * B @ A`` to a frozen weight W (out, in): A (rank, in), B (out, rank), scale =
alpha / rank; B starts at zero, so training starts from the pretrained model. Our fused projections
(self-attention ``qkv``, cross-attention ``kv``) are diffusers' separate to_q / to_k / to_v, so a fused
layer holds one low-rank pair per part and its update is the parts' updates stacked along the output
dimension: the file then holds exactly what diffusers' separate layers need. Convolutions get a
convolution A with the layer's kernel, stride and padding and a 1x1 convolution B (as peft does).

- ``LoRA(unet, LoRAConfig(rank, alpha, targets))`` builds the adapters; ``attach()`` adds them to the
  layers' outputs with forward hooks (training: the base weights stay untouched and frozen, the state
  dict of the UNet keeps its keys); ``merge(scale)`` adds the update into the weights for fast sampling
  and ``unmerge()`` puts the saved weights back bit for bit.
- ``save_lora(path, lora)`` writes ``unet.<diffusers module>.lora_A.weight`` / ``lora_B.weight`` with
  the scale folded into B, and peft's ``LoraConfig`` as the ``lora_adapter_metadata`` header diffusers
  reads (r, lora_alpha = r, target_modules); ``load_lora(path, unet)`` reads such a file (ours or one
  written by diffusers / peft, whose alpha it honours) back onto our UNet.

Targets (``LORA_TARGETS``): ``attn`` the attention projections (diffusers' to_q, to_k, to_v, to_out.0,
the usual choice), ``attn+ff`` also the GEGLU feed-forward, ``all`` every linear and convolution layer
that diffusers' UNet2DConditionModel has too.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open

from ldm.checkpoint import few_keys, load_tensors, save_tensors
from ldm.sd_format import unet_diffusers_keys

ATTN = re.compile(r"\.attn[12]\.(qkv|q|kv|out)$")
FF = re.compile(r"\.ff\.(proj|out)$")
OURS_ONLY = ("context_pool",)  # our pooled-prompt projection: diffusers' UNet has no such layer
LORA_TARGETS = ("attn", "attn+ff", "all")
PREFIX = "unet."  # diffusers' StableDiffusionLoraLoaderMixin.unet_name, the prefix of the UNet's keys
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY: peft's LoraConfig as JSON
OUR_KEY = "ldm_lora"  # our own header: rank, alpha and targets as trained
LORA_FILE = "lora.safetensors"  # the name train_unet --lora writes


@dataclass
class LoRAConfig:
    """Rank, alpha (None: alpha = rank, scale 1) and which layers (one of ``LORA_TARGETS``)."""

    rank: int = 4
    alpha: float | None = None
    targets: str = "attn"

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank}")
        if self.alpha is not None and not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
            raise ValueError(f"LoRA alpha must be positive, got {self.alpha}")
        if self.targets not in LORA_TARGETS:
            raise ValueError(f"LoRA targets must be one of {list(LORA_TARGETS)}, got {self.targets!r}")

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank


def target_names(unet: nn.Module, targets: str) -> list[str]:
    """The names of the UNet's layers that ``targets`` adapts, in the model's order."""
    names = []
    for name, m in unet.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)) or name.startswith(OURS_ONLY):
            continue
        if (targets == "all" or ATTN.search(name) or (targets == "attn+ff" and FF.search(name))):
            names.append(name)
    return names


class Adapter(nn.Module):
    """One layer's low-rank update, ``parts`` pairs stacked along the output (a fused q/k/v has 3).
    Linear: A (parts, r, in), B (parts, out / parts, r). Conv2d: A (1, r, in, kh, kw), B (1, out, r)."""

    def __init__(self, layer: nn.Linear | nn.Conv2d, parts: int, rank: int):
        super().__init__()
        self.conv = isinstance(layer, nn.Conv2d)
        w = layer.weight  # (out, in) or (out, in, kh, kw)
        if w.shape[0] % parts:
            raise ValueError(f"{w.shape[0]} outputs do not split into {parts} parts")
        if self.conv:
            self.stride, self.padding, self.dilation = layer.stride, layer.padding, layer.dilation
        # float32 over a bf16 / fp16 base: the update is small next to W and would round away
        dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
        self.A = nn.Parameter(torch.empty(parts, rank, *w.shape[1:], device=w.device, dtype=dtype))
        self.B = nn.Parameter(torch.zeros(parts, w.shape[0] // parts, rank, device=w.device, dtype=dtype))
        for a in self.A:  # peft's and the paper's start: A as a default layer init, B zero
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def delta(self) -> torch.Tensor:
        """B @ A, the weight update: (out, in) or (out, in, kh, kw)."""
        d = torch.bmm(self.B, self.A.flatten(2))  # (parts, out / parts, in * kh * kw)
        return d.reshape(-1, *self.A.shape[2:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.A.dtype)
        if self.conv:
            h = F.conv2d(x, self.A[0], None, self.stride, self.padding, self.dilation)  # (B, r, H', W')
            return torch.einsum("bchw,oc->bohw", h, self.B[0])  # (B, out, H', W')
        h = torch.einsum("...i,pri->...pr", x, self.A)  # (..., parts, r)
        return torch.einsum("...pr,por->...po", h, self.B).flatten(-2)  # (..., out)


class LoRA(nn.Module):
    """The adapters of one UNet (see the module docstring). ``self.names[i]`` is the UNet layer of
    ``self.adapters[str(i)]`` (module names hold dots, which ModuleDict keys may not)."""

    def __init__(self, unet: nn.Module, config: LoRAConfig, names: list[str] | None = None):
        super().__init__()
        self.config = config
        self.unet = [unet]  # in a list: not a submodule, so the LoRA's parameters and state dict are its own
        self.names = names if names is not None else target_names(unet, config.targets)
        if not self.names:
            raise ValueError(f"LoRA targets {config.targets!r} match no layer of this UNet")
        layers = dict(unet.named_modules())
        self.adapters = nn.ModuleDict({
            str(i): Adapter(layers[n], len(unet_diffusers_keys(n + ".weight")), config.rank)
            for i, n in enumerate(self.names)})
        self.scale = config.scale
        self._hooks: list = []
        self._saved: dict[str, torch.Tensor] | None = None

    def layers(self):
        modules = dict(self.unet[0].named_modules())
        for i, name in enumerate(self.names):
            yield name, modules[name], self.adapters[str(i)]

    def attach(self) -> LoRA:
        """Add ``scale * adapter(input)`` to every target layer's output (forward hooks)."""
        if self._hooks:
            return self
        for _, layer, adapter in self.layers():
            def hook(module, args, out, adapter=adapter):
                return out + (self.scale * adapter(args[0])).to(out.dtype)
            self._hooks.append(layer.register_forward_hook(hook))
        return self

    def detach_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    @torch.no_grad()
    def merge(self, scale: float = 1.0) -> LoRA:
        """W += scale * self.scale * B @ A in every target layer; the weights before are kept for ``unmerge``."""
        if self._saved is not None:
            raise RuntimeError("this LoRA is already merged; unmerge() first")
        if self._hooks:  # the update would count twice: once in the weights, once in the hooks
            raise RuntimeError("this LoRA is attached; detach_hooks() before merge()")
        self._saved = {}
        for name, layer, adapter in self.layers():
            self._saved[name] = layer.weight.detach().clone()
            layer.weight += (scale * self.scale * adapter.delta()).to(layer.weight.dtype)
        return self

    @torch.no_grad()
    def unmerge(self) -> LoRA:
        """Put back the weights ``merge`` found, bit for bit."""
        if self._saved is None:
            raise RuntimeError("this LoRA is not merged")
        for name, layer, _ in self.layers():
            layer.weight.copy_(self._saved[name])
        self._saved = None
        return self


def diffusers_modules(name: str) -> list[str]:
    """Our layer -> diffusers' module names (several for a fused projection), without '.weight'."""
    return [k.removesuffix(".weight") for k in unet_diffusers_keys(name + ".weight")]


def lora_tensors(lora: LoRA, linear_projection: bool = False) -> dict[str, torch.Tensor]:
    """The diffusers keys: ``unet.<module>.lora_A.weight`` (r, in[, kh, kw]) and ``lora_B.weight``
    (out, r[, 1, 1]) with the scale folded into B. ``linear_projection``: the transformers' proj_in /
    proj_out are linear layers in diffusers (SD 2.x), 1x1 convolutions here."""
    out = {}
    for name, _, adapter in lora.layers():
        for p, module in enumerate(diffusers_modules(name)):
            a, b = adapter.A[p].detach(), (lora.scale * adapter.B[p]).detach()  # (r, in, ...), (out_p, r)
            if adapter.conv and not (linear_projection and re.search(r"\.proj_(in|out)$", name)):
                b = b[:, :, None, None]  # (out_p, r, 1, 1): a 1x1 convolution
            elif adapter.conv:
                a = a.flatten(1)  # (r, in): the 1x1 convolution as a linear layer
            out[f"{PREFIX}{module}.lora_A.weight"] = a
            out[f"{PREFIX}{module}.lora_B.weight"] = b
    return out


def save_lora(path: str | Path, lora: LoRA, linear_projection: bool = False, extra: dict | None = None) -> Path:
    """Write ``lora`` as one safetensors file (atomically) that diffusers' ``load_lora_weights`` opens."""
    tensors = lora_tensors(lora, linear_projection)
    modules = sorted({k[len(PREFIX):].rsplit(".lora_", 1)[0] for k in tensors})
    rank = lora.config.rank
    # The scale is already in B, so the convention alpha = rank (scale 1) holds for any reader,
    # including those that never look at the header.
    peft_config = {f"{PREFIX}r": rank, f"{PREFIX}lora_alpha": rank, f"{PREFIX}target_modules": modules}
    ours = {**asdict(lora.config), **(extra or {})}
    save_tensors(tensors, path, metadata={"format": "pt", METADATA_KEY: json.dumps(peft_config, sort_keys=True),
                                          OUR_KEY: json.dumps(ours, sort_keys=True)})
    return Path(path)


def _header(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def _module_scales(header: dict, modules: set[str], ranks: dict[str, int], path: Path) -> dict[str, float]:
    """alpha / r of every module from peft's LoraConfig in the header (alpha = rank when there is none)."""
    raw = header.get(METADATA_KEY)
    if not raw:
        return {m: 1.0 for m in modules}
    try:
        meta = {k.removeprefix(PREFIX): v for k, v in json.loads(raw).items() if k.startswith(PREFIX)}
    except (json.JSONDecodeError, AttributeError):
        raise ValueError(f"{path}: its {METADATA_KEY} header is not a JSON object") from None
    scales = {}
    for m in modules:
        alpha, r = meta.get("lora_alpha", ranks[m]), ranks[m]
        for pattern, value in (meta.get("alpha_pattern") or {}).items():
            if m == pattern or m.endswith("." + pattern):
                alpha = value
        scales[m] = alpha / r
    return scales


def load_lora(path: str | Path, unet: nn.Module, linear_projection: bool = False) -> LoRA:
    """A LoRA file in diffusers' layout (``unet.<module>.lora_A.weight`` / ``lora_B.weight``, ours or
    diffusers' / peft's) -> a ``LoRA`` on ``unet`` with scale 1 (each module's alpha / r folded into B).
    A fused layer whose file covers only some parts (say to_q and to_v) gets zeros for the others; parts
    of different ranks are zero-padded to the largest. Keys with no home are an error naming them."""
    path = Path(path)
    state = load_tensors(path, "LoRA file")
    header = _header(path)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    bad = []
    for key, t in state.items():
        m = re.fullmatch(re.escape(PREFIX) + r"(.+)\.lora_([AB])\.weight", key)
        if m is None:
            bad.append(key)
            continue
        pairs.setdefault(m[1], {})[m[2]] = t
    if bad:
        raise ValueError(f"{path}: {len(bad)} key(s) are not UNet LoRA weights in diffusers' layout "
                         f"(unet.<module>.lora_A/lora_B.weight): {few_keys(bad, 4)}")
    half = [m for m, ab in pairs.items() if len(ab) != 2]
    if half:
        raise ValueError(f"{path}: module(s) with only one of lora_A / lora_B: {few_keys(half, 4)}")
    if not pairs:
        raise ValueError(f"{path}: holds no LoRA weights")
    ranks = {m: ab["A"].shape[0] for m, ab in pairs.items()}
    scales = _module_scales(header, set(pairs), ranks, path)
    candidates = target_names(unet, "all")
    owner = {mod: (name, p) for name in candidates for p, mod in enumerate(diffusers_modules(name))}
    homeless = sorted(set(pairs) - set(owner))
    if homeless:
        raise ValueError(f"{path}: {len(homeless)} module(s) this UNet does not have: {few_keys(homeless, 4)}")
    names = [n for n in candidates if any(mod in pairs for mod in diffusers_modules(n))]
    rank = max(ranks.values())
    try:
        targets = json.loads(header.get(OUR_KEY, "{}")).get("targets", "all")
    except json.JSONDecodeError:
        targets = "all"
    lora = LoRA(unet, LoRAConfig(rank=rank, targets=targets if targets in LORA_TARGETS else "all"), names)
    layers = dict(unet.named_modules())
    with torch.no_grad():
        for i, name in enumerate(names):
            adapter = lora.adapters[str(i)]
            adapter.A.zero_()
            for p, mod in enumerate(diffusers_modules(name)):
                if mod not in pairs:
                    continue
                a, b = pairs[mod]["A"], pairs[mod]["B"]
                r = a.shape[0]
                want_a = (r, *adapter.A.shape[2:])
                if a.shape != want_a and a.numel() == math.prod(want_a):
                    a = a.reshape(want_a)  # a linear proj_in / proj_out read onto our 1x1 convolution
                b = b.reshape(b.shape[0], b.shape[1])  # (out_p, r): 1x1 convolution kernels flattened
                if a.shape != want_a or b.shape != (adapter.B.shape[1], r):
                    raise ValueError(f"{path}: {mod} has lora_A {tuple(pairs[mod]['A'].shape)}, lora_B "
                                     f"{tuple(pairs[mod]['B'].shape)}; our {name} "
                                     f"{tuple(layers[name].weight.shape)} needs lora_A {want_a} and lora_B "
                                     f"({adapter.B.shape[1]}, {r})")
                adapter.A[p, :r] = a.to(adapter.A.dtype)
                adapter.B[p, :, :r] = (scales[mod] * b.to(torch.float64)).to(adapter.B.dtype)
    return lora
