"""File helpers: atomic writes and checked checkpoint reads."""
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, Iterable, List, Mapping, Union

import torch
import torch.nn as nn

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: unreadable, wrong model, wrong shapes."""


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def _atomic_write(path: PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Write through ``write`` to a temporary file in the same folder, fsync, then rename over
    ``path``: a crash mid-write leaves the previous file intact, never a truncated one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the file gets what open() would give it
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


_MAX_LISTED = 12


def listing(items: Iterable[str]) -> str:
    """The first dozen items, comma-separated, and how many more there are."""
    items = list(items)
    more = f" ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return ", ".join(items[:_MAX_LISTED]) + more


def check_state_dict(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], path: PathLike, what: str,
                     may_be_missing: Callable[[str], bool] = lambda key: False, hint: str = "") -> None:
    """Raise a ``CheckpointError`` naming the file and the keys unless ``state`` fits ``own``:
    no unexpected key, no shape mismatch, no missing key that ``may_be_missing`` does not excuse."""
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    unexpected = [k for k in state if k not in own]
    missing = [k for k in own if k not in state and not may_be_missing(k)]
    if mismatched or unexpected or missing:
        lines = [f"{path}: does not fit the {what}{hint}"]
        if mismatched:
            lines.append(f"  shape mismatches ({len(mismatched)}): {listing(mismatched)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {listing(unexpected)}")
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {listing(missing)}")
        raise CheckpointError("\n".join(lines))


def load_checked(module: nn.Module, state: Mapping[str, torch.Tensor], path: PathLike, what: str,
                 may_be_missing: Callable[[str], bool] = lambda key: False, hint: str = "") -> List[str]:
    """Load ``state`` into ``module`` after :func:`check_state_dict`; returns the keys left at
    their initialisation. (``nn.Module.load_state_dict`` itself: models that override it to
    filter foreign weights must not filter twice.)"""
    own = module.state_dict()
    check_state_dict(own, state, path, what, may_be_missing, hint)
    nn.Module.load_state_dict(module, state, strict=False)
    return [k for k in own if k not in state]
