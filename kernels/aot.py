"""Ahead-of-time compilation of our Triton kernels for real GPUs, on a machine without one.

``triton.compile`` with ``GPUTarget("cuda", 80 | 90, 32)`` builds the cubin for an A100 or H100;
the ``cuobjdump`` that ships in Triton's wheel reads back registers, local memory (spills) and the
SASS, where tensor-core instructions show as ``HMMA`` (sm_80 mma) or ``HGMMA`` (sm_90 wgmma).

Each kernel module lists what to build in ``aot_specs() -> list[AotSpec]``.
This module must be imported without ``TRITON_INTERPRET=1``: under the interpreter ``@triton.jit``
makes functions that cannot be compiled.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Any

ARCHS = (80, 90)
KERNEL_MODULES = ("kernels.attention", "kernels.groupnorm")
WARP_SIZE = 32
# Shared memory one program may use (opt-in maximum per block): A100 163 KiB, H100 227 KiB. A config
# over it compiles but fails to launch.
MAX_SHARED_BYTES = {80: 163 * 1024, 90: 227 * 1024}


@dataclass(frozen=True)
class AotSpec:
    kernel: str                      # display name, e.g. "attn_fwd"
    config: str                      # human label of the config, e.g. "bf16 D=64 BM=128 BN=64 w4 s3"
    fn: Any                          # the @triton.jit function
    signature: dict[str, str]        # every runtime argument -> Triton type: "*bf16", "*fp32", "i32", "fp32"
    constexprs: dict[str, Any]       # every tl.constexpr argument -> value
    num_warps: int = 4
    num_stages: int = 2
    uses_dot: bool = False           # holds tl.dot: must compile to tensor-core instructions
    aligned: tuple[str, ...] = ()    # runtime arguments the launcher guarantees divisible by 16
    core: bool = True                # in the representative set tests/test_inspect.py builds (--core)


@dataclass
class AotResult:
    spec: AotSpec
    arch: int
    registers: int
    local_bytes: int                 # per-thread local memory: register spills and stack arrays
    shared_bytes: int                # static + dynamic shared memory per program
    hmma: int                        # count of HMMA (mma.sync) instructions in the SASS
    hgmma: int                       # count of HGMMA (wgmma) instructions in the SASS
    spill_note: str = field(default="")

    @property
    def tensor_core(self) -> bool:
        return self.hmma + self.hgmma > 0

    @property
    def ok(self) -> bool:
        return (self.local_bytes == 0 and (self.tensor_core or not self.spec.uses_dot)
                and self.shared_bytes <= MAX_SHARED_BYTES[self.arch])


def _bin(tool: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{tool} not found at {path}: this Triton wheel ships no NVIDIA tools")
    return path


def compile_spec(spec: AotSpec, arch: int):
    """Compile one spec for sm_<arch>; returns Triton's CompiledKernel (cubin in ``.asm['cubin']``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("kernels.aot cannot compile under TRITON_INTERPRET=1; run it in a process without it")
    names = spec.fn.arg_names
    missing = [n for n in names if n not in spec.signature and n not in spec.constexprs]
    if missing:
        raise ValueError(f"{spec.kernel} [{spec.config}]: no type or value given for {missing}")
    signature = {n: ("constexpr" if n in spec.constexprs else spec.signature[n]) for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in spec.aligned}
    src = ASTSource(fn=spec.fn, signature=signature, constexprs=dict(spec.constexprs), attrs=attrs)
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
    return triton.compile(src, target=GPUTarget("cuda", arch, WARP_SIZE), options=options)


def inspect_spec(spec: AotSpec, arch: int) -> AotResult:
    """Compile, then read registers, local memory and tensor-core use off the cubin."""
    compiled = compile_spec(spec, arch)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([_bin("cuobjdump"), "-res-usage", cubin], check=True,
                               capture_output=True, text=True).stdout
        sass = subprocess.run([_bin("cuobjdump"), "-sass", cubin], check=True,
                              capture_output=True, text=True).stdout

    def field_of(name: str) -> int:
        m = re.search(rf"\b{name}:(\d+)", usage)
        return int(m.group(1)) if m else 0

    return AotResult(
        spec=spec, arch=arch,
        registers=field_of("REG"),
        local_bytes=field_of("LOCAL") + field_of("STACK"),
        shared_bytes=field_of("SHARED") + int(getattr(compiled.metadata, "shared", 0)),
        hmma=len(re.findall(r"\bHMMA\b", sass)),
        hgmma=len(re.findall(r"\bHGMMA\b", sass)),
    )


def all_specs() -> list[AotSpec]:
    """Every kernel config the project ships, gathered from the kernel modules."""
    import importlib

    specs: list[AotSpec] = []
    for name in KERNEL_MODULES:  # by module name: `kernels.attention` the attribute is the function
        specs.extend(importlib.import_module(name).aot_specs())
    return specs
