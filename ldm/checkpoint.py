"""Checkpoints as safetensors + JSON, written atomically, never pickled.

Two kinds of file:
- an exported model: ``NAME.safetensors`` (the state dict) and ``NAME.json`` (its config and
  whatever a consumer needs, e.g. the VAE's latent scale factor), rebuilt with ``load_model``;
- a training checkpoint: a folder ``checkpoints/step_XXXXXXX/`` of parts (model, EMA, optimizer,
  RNG, data position...), each part one safetensors file whose header holds the JSON skeleton of
  the nested state. The folder is written under a temporary name and renamed, then the ``latest``
  file is replaced atomically, so a run killed at any moment resumes from a whole checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

_SKELETON_KEY = "ldm_skeleton"
_TENSOR_TAG = "__tensor__"


# ---------------------------------------------------------------- atomic files
def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_json(obj: Any, path: str | Path) -> None:
    """Write JSON atomically (temporary file in the same folder, then rename)."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
    _atomic_write(Path(path), write)


def load_json(path: str | Path, what: str = "file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path} is not valid JSON: {e}") from None


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically; tensors are made contiguous CPU copies first."""
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    _atomic_write(Path(path), lambda tmp: save_file(flat, tmp, metadata=metadata))


def load_tensors(path: str | Path, what: str = "weights") -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{what} {path} is not a readable safetensors file: {e}") from None


# ---------------------------------------------------------------- nested state <-> tensors + JSON
def flatten_state(obj: Any, tensors: dict[str, torch.Tensor] | None = None, prefix: str = "s"):
    """Split nested dicts/lists/tuples of tensors and JSON values into (tensors, JSON skeleton).

    Tensors are replaced in the skeleton by ``{"__tensor__": key}``; dict keys become strings
    (integer keys, as in optimizer state, are tagged so they come back as integers).
    """
    tensors = {} if tensors is None else tensors
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}"
        tensors[key] = obj
        return tensors, {_TENSOR_TAG: key}
    if isinstance(obj, dict):
        items = []
        for i, (k, v) in enumerate(obj.items()):
            if not isinstance(k, (str, int)):
                raise TypeError(f"cannot save a dict key of type {type(k).__name__} ({k!r})")
            _, sk = flatten_state(v, tensors, f"{prefix}.{i}")
            items.append([k, sk])
        return tensors, {"__dict__": items}
    if isinstance(obj, (list, tuple)):
        out = [flatten_state(v, tensors, f"{prefix}.{i}")[1] for i, v in enumerate(obj)]
        return tensors, ({"__tuple__": out} if isinstance(obj, tuple) else out)
    if isinstance(obj, np.ndarray):
        return flatten_state(torch.from_numpy(obj.copy()), tensors, prefix)
    if isinstance(obj, (np.integer, np.floating)):
        return tensors, obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return tensors, obj
    raise TypeError(f"cannot save a value of type {type(obj).__name__} at {prefix}")


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(skeleton, dict):
        if _TENSOR_TAG in skeleton:
            return tensors[skeleton[_TENSOR_TAG]]
        if "__tuple__" in skeleton:
            return tuple(unflatten_state(v, tensors) for v in skeleton["__tuple__"])
        return {k: unflatten_state(v, tensors) for k, v in skeleton["__dict__"]}
    if isinstance(skeleton, list):
        return [unflatten_state(v, tensors) for v in skeleton]
    return skeleton


def save_state(obj: Any, path: str | Path) -> None:
    """Save any nested state (optimizer state dict, RNG states, counters) as one safetensors file."""
    tensors, skeleton = flatten_state(obj)
    save_tensors(tensors, path, metadata={_SKELETON_KEY: json.dumps(skeleton)})


def load_state(path: str | Path, what: str = "state") -> Any:
    from safetensors import safe_open

    path = Path(path)
    tensors = load_tensors(path, what)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if _SKELETON_KEY not in meta:
        raise ValueError(f"{what} {path} holds no saved state skeleton (written by another tool?)")
    return unflatten_state(json.loads(meta[_SKELETON_KEY]), tensors)


# ---------------------------------------------------------------- RNG
def rng_state() -> dict:
    """Every RNG a training step draws from: Python, NumPy, torch CPU and CUDA."""
    np_state = np.random.get_state()
    state = {
        "python": [list(random.getstate()[1]), random.getstate()[2]],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    internal, gauss = state["python"]
    random.setstate((3, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- exported models
def config_dict(config: Any) -> dict:
    return asdict(config) if is_dataclass(config) else dict(config)


def save_model(folder: str | Path, name: str, model: torch.nn.Module, config: Any, **extra: Any) -> Path:
    """Write ``folder/name.safetensors`` (state dict) and ``folder/name.json`` ({"config", **extra})."""
    folder = Path(folder)
    save_tensors(model.state_dict(), folder / f"{name}.safetensors")
    save_json({"config": config_dict(config), **extra}, folder / f"{name}.json")
    return folder / f"{name}.safetensors"


def load_model_files(folder: str | Path, name: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Read ``folder/name.safetensors`` and ``folder/name.json``; errors name the missing file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {folder}")
    meta = load_json(folder / f"{name}.json", f"{name} config")
    if "config" not in meta:
        raise ValueError(f"{folder / (name + '.json')} has no 'config' entry")
    return load_tensors(folder / f"{name}.safetensors", f"{name} weights"), meta


def load_state_dict_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str,
                           assign: bool = False) -> None:
    """load_state_dict that names every missing, unexpected or mis-shaped key and the file. ``assign``
    takes the tensors themselves as the parameters (a model built on the meta device: no copy, no init)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    if shapes:
        problems.append(f"shape mismatches {shapes[:8]}")
    if problems:
        raise ValueError(f"{source} does not fit {type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict(state, assign=assign)


# ---------------------------------------------------------------- training checkpoints
class CheckpointDir:
    """``root/step_XXXXXXX/`` folders of parts plus a ``root/latest`` pointer; keeps the newest ``keep``."""

    def __init__(self, root: str | Path, keep: int = 2):
        self.root = Path(root)
        self.keep = keep

    def save(self, step: int, parts: dict[str, Any]) -> Path:
        final = self.root / f"step_{step:07d}"
        tmp = self.root / f".step_{step:07d}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        for name, obj in parts.items():
            save_state(obj, tmp / f"{name}.safetensors")
        save_json({"step": step, "parts": sorted(parts)}, tmp / "checkpoint.json")
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        _atomic_write(self.root / "latest", lambda p: Path(p).write_text(final.name + "\n"))
        self._prune(final.name)
        return final

    def _prune(self, newest: str) -> None:
        done = sorted(p for p in self.root.glob("step_*") if p.is_dir())
        for p in done[:-self.keep] if self.keep > 0 else []:
            if p.name != newest:
                shutil.rmtree(p, ignore_errors=True)
        for p in self.root.glob(".step_*.tmp"):  # leftovers of a run killed mid-write
            shutil.rmtree(p, ignore_errors=True)

    def latest(self) -> Path | None:
        pointer = self.root / "latest"
        if not pointer.is_file():
            return None
        folder = self.root / pointer.read_text().strip()
        if not (folder / "checkpoint.json").is_file():
            raise FileNotFoundError(f"{pointer} names {folder}, which holds no checkpoint.json")
        return folder

    def load(self, folder: Path | None = None) -> tuple[int, dict[str, Any]]:
        folder = folder or self.latest()
        if folder is None:
            raise FileNotFoundError(f"no checkpoint to resume from in {self.root}")
        info = load_json(folder / "checkpoint.json", "checkpoint index")
        parts = {name: load_state(folder / f"{name}.safetensors", f"checkpoint part {name}")
                 for name in info["parts"]}
        return int(info["step"]), parts
