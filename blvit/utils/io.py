"""File helpers: atomic writes and checked checkpoint reads."""
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, Mapping, Union

import torch

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: unreadable, wrong model, wrong shapes."""


def _atomic_write(path: PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Write through ``write`` to a temporary file in the same folder, fsync, then rename over
    ``path``: a crash mid-write leaves the previous file intact, never a truncated one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_save(obj: Any, path: PathLike) -> Path:
    """``torch.save`` atomically."""
    return _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Write a small text file (e.g. the name of the latest checkpoint) atomically."""
    return _atomic_write(path, lambda f: f.write(text.encode()))


def read_checkpoint(path: PathLike) -> Dict[str, Any]:
    """Load a checkpoint on the CPU (files saved on GPU included), with clear errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and weights-only errors all mean "not usable"
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict (state dict or training checkpoint), got {type(obj).__name__}")
    return dict(obj)


def unwrap_state_dict(obj: Mapping[str, Any], path: PathLike) -> Dict[str, torch.Tensor]:
    """The state dict inside a checkpoint: plain, under "model" / "state_dict", DDP "module." stripped."""
    for key in ("model", "state_dict"):
        if key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    state = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor: not a state dict")
        state[k[len("module."):] if k.startswith("module.") else k] = v
    return state
