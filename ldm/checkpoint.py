"""Checkpoints as safetensors + JSON, written atomically, never pickled.

Two kinds of file:
- an exported model: ``NAME.safetensors`` (the state dict) and ``NAME.json`` (its config and
  whatever a consumer needs, e.g. the VAE's latent scale factor), rebuilt with ``load_model``;
- a training checkpoint: a folder ``checkpoints/step_XXXXXXX/`` of parts (model, EMA, optimizer,
  RNG, data position...), each part one safetensors file whose header holds the JSON skeleton of
  the nested state. The folder is written under a temporary name and renamed, then the ``latest``
  file is replaced atomically, so a run killed at any moment resumes from a whole checkpoint.

Every file is written to a temporary name, flushed to disk and renamed over the old one, and the
folder is flushed after the rename, so a crash leaves the old file or the new one, never a mix. An
exported pair (weights + JSON) carries one export id in both files: a crash between the two renames
leaves a pair whose ids differ, which ``load_model_files`` refuses rather than mixing new weights
with old settings. ``CheckpointDir.load`` falls back to the newest older checkpoint when the latest
is missing or damaged. A write that fails (a full disk) is an ``InputError`` naming the file, and
leaves no temporary file behind. Files get the usual permissions (0644 under the usual umask).

``crash_point()`` marks each step of these writes: the crash-consistency test kills the process at
the N-th with ``LDM_CRASH_AT=N`` (and counts them with ``LDM_CRASH_COUNT=FILE``).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sys
import tempfile
import uuid
from collections.abc import Mapping
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ldm.errors import InputError

_SKELETON_KEY = "ldm_skeleton"
_TENSOR_TAG = "__tensor__"
EXPORT_KEY = "export_id"  # in an exported pair's JSON and in its weights' safetensors header
_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK  # what open() would give: temporary files start at 0600


# ---------------------------------------------------------------- crash points (for the crash test)
_crash = {"seen": 0}


def crash_point() -> None:
    """A step boundary inside a write. ``LDM_CRASH_AT=N`` kills the process (SIGKILL: no cleanup, as a
    power cut) at the N-th; ``LDM_CRASH_COUNT=FILE`` records how many a run passed. No-op otherwise."""
    at, count = os.environ.get("LDM_CRASH_AT"), os.environ.get("LDM_CRASH_COUNT")
    if at is None and count is None:
        return
    _crash["seen"] += 1
    if count:
        Path(count).write_text(str(_crash["seen"]))
    if at is not None and _crash["seen"] == int(at):
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------- atomic files
def fsync_dir(folder: str | Path) -> None:
    """Flush a folder's entries (a rename is durable only once its folder is)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        write(tmp)
        os.chmod(tmp, FILE_MODE)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        crash_point()
        os.replace(tmp, path)
        crash_point()
        fsync_dir(path.parent)
    except OSError as e:
        raise InputError(f"could not write {path}: {e.strerror or e}") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def save_json(obj: Any, path: str | Path, sort_keys: bool = True) -> None:
    """Write JSON atomically (temporary file in the same folder, then rename), its folder made if missing;
    ``sort_keys`` False keeps the dicts' own order (the commands' reports)."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=sort_keys)
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
def flatten_state(obj: Any, tensors: dict[str, torch.Tensor] | None = None, prefix: str = "s",
                  seen: dict | None = None):
    """Split nested dicts/lists/tuples of tensors and JSON values into (tensors, JSON skeleton).

    Tensors are replaced in the skeleton by ``{"__tensor__": key}``; dict keys become strings
    (integer keys, as in optimizer state, are tagged so they come back as integers). A tensor met twice
    (bitsandbytes' 8-bit optimizers share one quantisation map among all their parameters) is stored
    once and comes back shared; another view of a stored tensor's memory is stored as a copy.
    """
    tensors = {} if tensors is None else tensors
    seen = {} if seen is None else seen
    if isinstance(obj, torch.Tensor):
        if id(obj) in seen:
            return tensors, {_TENSOR_TAG: seen[id(obj)]}
        if obj.numel():
            if ("memory", obj.untyped_storage().data_ptr()) in seen:
                obj = obj.clone()  # safetensors refuses two entries over one memory
            seen[("memory", obj.untyped_storage().data_ptr())] = prefix
        seen[id(obj)] = prefix
        tensors[prefix] = obj
        return tensors, {_TENSOR_TAG: prefix}
    if isinstance(obj, dict):
        items = []
        for i, (k, v) in enumerate(obj.items()):
            if not isinstance(k, (str, int)):
                raise TypeError(f"cannot save a dict key of type {type(k).__name__} ({k!r})")
            _, sk = flatten_state(v, tensors, f"{prefix}.{i}", seen)
            items.append([k, sk])
        return tensors, {"__dict__": items}
    if isinstance(obj, (list, tuple)):
        out = [flatten_state(v, tensors, f"{prefix}.{i}", seen)[1] for i, v in enumerate(obj)]
        return tensors, ({"__tuple__": out} if isinstance(obj, tuple) else out)
    if isinstance(obj, np.ndarray):
        return flatten_state(torch.from_numpy(obj.copy()), tensors, prefix, seen)
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
    """Write ``folder/name.safetensors`` (state dict) and ``folder/name.json`` ({"config", **extra}), one
    export id in both (the weights first: a crash between leaves ids that differ, never a silent mix)."""
    folder = Path(folder)
    export_id = uuid.uuid4().hex
    save_tensors(model.state_dict(), folder / f"{name}.safetensors", metadata={EXPORT_KEY: export_id})
    save_json({"config": config_dict(config), **extra, EXPORT_KEY: export_id}, folder / f"{name}.json")
    return folder / f"{name}.safetensors"


def export_id(path: str | Path) -> str | None:
    """The export id in a safetensors file's header (None: written by another tool or before ids)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get(EXPORT_KEY)
    except (SafetensorError, OSError, ValueError):
        return None


def load_model_files(folder: str | Path, name: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Read ``folder/name.safetensors`` and ``folder/name.json``; errors name the missing file, and a
    pair from two different exports (a write cut short) is refused."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {folder}")
    json_path, weights_path = folder / f"{name}.json", folder / f"{name}.safetensors"
    meta = load_json(json_path, f"{name} config")
    if not isinstance(meta, dict) or "config" not in meta:
        raise ValueError(f"{json_path} has no 'config' entry")
    state = load_tensors(weights_path, f"{name} weights")
    theirs = export_id(weights_path)
    if theirs is not None and meta.get(EXPORT_KEY) is not None and theirs != meta[EXPORT_KEY]:
        raise ValueError(f"{weights_path} and {json_path} come from two different exports (a write cut short); "
                         "export again (train_unet / train_vae --resume writes the pair anew)")
    return state, meta


def few_keys(keys, n: int = 8) -> str:
    """The first ``n`` of ``keys`` (sorted), and how many there are in all when more."""
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" ... ({len(keys)} in all)" if len(keys) > n else "")


def check_state(state: Mapping[str, torch.Tensor], shapes: Mapping[str, Any], source: str, what: str) -> None:
    """A state dict against the shapes a model's config gives: every key, nothing more, each shape. A
    ValueError names ``source``, ``what`` it should fit, and every missing, unexpected or mis-shaped key."""
    missing, unexpected = set(shapes) - set(state), set(state) - set(shapes)
    mismatched = [f"{k} has shape {tuple(state[k].shape)}, the config gives {tuple(shapes[k])}"
                  for k in shapes if k in state and tuple(state[k].shape) != tuple(shapes[k])]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)} missing: {few_keys(missing)})")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)} with no place: {few_keys(unexpected)})")
    if mismatched:
        problems.append(f"shape mismatches ({'; '.join(mismatched[:8])})")
    if problems:
        raise ValueError(f"{source} does not fit {what}: " + "; ".join(problems))


def load_state_dict_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str,
                           assign: bool = False) -> None:
    """load_state_dict that names every missing, unexpected or mis-shaped key and the file (``check_state``).
    ``assign`` takes the tensors themselves as the parameters (a model built on the meta device: no copy,
    no init)."""
    check_state(state, {k: v.shape for k, v in model.state_dict().items()}, source, type(model).__name__)
    model.load_state_dict(state, assign=assign)


# ---------------------------------------------------------------- training checkpoints
class CheckpointDir:
    """``root/step_XXXXXXX/`` folders of parts plus a ``root/latest`` pointer; keeps the newest ``keep``.

    ``save`` writes a whole folder under a temporary name, renames it, then moves the pointer: a crash
    at any moment leaves the previous checkpoint whole. ``load`` reads the newest checkpoint that is
    whole, falling back past a missing or damaged one (and saying so)."""

    def __init__(self, root: str | Path, keep: int = 2):
        self.root = Path(root)
        self.keep = keep

    def save(self, step: int, parts: dict[str, Any]) -> Path:
        final = self.root / f"step_{step:07d}"
        tmp = self.root / f".step_{step:07d}.tmp"
        old = self.root / f".step_{step:07d}.old"  # a checkpoint of the same step, replaced
        try:
            for leftover in (tmp, old):
                if leftover.exists():
                    shutil.rmtree(leftover)
            tmp.mkdir(parents=True)
            for name, obj in parts.items():
                save_state(obj, tmp / f"{name}.safetensors")
            save_json({"step": step, "parts": sorted(parts)}, tmp / "checkpoint.json")
            fsync_dir(tmp)
            if final.exists():
                os.rename(final, old)
                crash_point()
            os.rename(tmp, final)
            crash_point()
            fsync_dir(self.root)
            _atomic_write(self.root / "latest", lambda p: Path(p).write_text(final.name + "\n"))
        except (OSError, InputError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise InputError(f"could not write the checkpoint {final}: {why}; the previous one is kept") from None
        shutil.rmtree(old, ignore_errors=True)
        self._prune(final.name)
        return final

    def _prune(self, newest: str) -> None:
        done = sorted(p for p in self.root.glob("step_*") if p.is_dir())
        for p in done[:-self.keep] if self.keep > 0 else []:
            if p.name != newest:
                shutil.rmtree(p, ignore_errors=True)
        for p in self.root.glob(".step_*.tmp"):  # leftovers of a run killed mid-write
            shutil.rmtree(p, ignore_errors=True)

    def candidates(self) -> list[Path]:
        """Checkpoint folders, newest first: the one ``latest`` names, then the others by step."""
        folders = sorted((p for p in self.root.glob("step_*") if p.is_dir()), reverse=True)
        pointer = self.root / "latest"
        if pointer.is_file():
            named = self.root / pointer.read_text().strip()
            folders = [named] + [p for p in folders if p != named]
        return folders

    def latest(self) -> Path | None:
        """The folder ``load`` would try first, or None when there is no checkpoint at all."""
        folders = self.candidates()
        return folders[0] if folders else None

    def _read(self, folder: Path) -> tuple[int, dict[str, Any]]:
        info = load_json(folder / "checkpoint.json", "checkpoint index")
        if not (isinstance(info, dict) and isinstance(info.get("step"), int) and isinstance(info.get("parts"), list)):
            raise ValueError(f"{folder / 'checkpoint.json'} is not a checkpoint index")
        parts = {name: load_state(folder / f"{name}.safetensors", f"checkpoint part {name}")
                 for name in info["parts"]}
        return int(info["step"]), parts

    def load(self, folder: Path | None = None) -> tuple[int, dict[str, Any]]:
        """(step, parts) of ``folder``, or of the newest whole checkpoint. InputError when none is whole."""
        if folder is not None:
            try:
                return self._read(folder)
            except (FileNotFoundError, ValueError) as e:
                raise InputError(str(e)) from None
        problems = []
        for candidate in self.candidates():
            try:
                step, parts = self._read(candidate)
            except (FileNotFoundError, ValueError) as e:
                problems.append(f"{candidate.name}: {e}")
                continue
            if problems:
                print(f"checkpoint: skipped {len(problems)} damaged or missing checkpoint(s) ({problems[0]}); "
                      f"resuming from {candidate}", file=sys.stderr)
            return step, parts
        if problems:
            raise InputError(f"no whole checkpoint in {self.root}: {'; '.join(problems)}")
        raise InputError(f"no checkpoint to resume from in {self.root}")
