"""Training configs: YAML files, defaults, dotted ``key=value`` overrides, unknown keys refused."""
import copy
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

DEFAULTS: Dict[str, Any] = {
    "task": "sam_distill",  # sam_distill: bLViT student from a dense teacher; sam_finetune: mask loss only
    "output_dir": "runs/default",
    "seed": 0,
    "model": {
        "variant": "b+t",
        "keep_ratio": 0.25,
        "overrides": {},  # any BigLittleSamConfig field
        "sam_checkpoint": None,  # official SAM .pth (or a dense checkpoint of this toolkit) for the P-blocks
        "checkpoint": None,  # a bLViT-SAM checkpoint of this toolkit
    },
    "teacher": {
        "checkpoint": None,  # None: a randomly initialised teacher of the student's dense layout (logged)
    },
    "data": {
        "root": "data/synthetic/sa1b_train",
        "shards": None,
        "fraction": None,
        "count": None,
        "max_masks": 8,
        "box_noise": 0.1,
        "workers": 2,
    },
    "loss": {
        "distill_weight": 2.5,
        "distill": "cosine",  # cosine | mse
        "mask_weight": 1.0,
        "focal_weight": 20.0,
        "dice_weight": 1.0,
        "iou_weight": 1.0,
        "train_decoder": False,
    },
    "train": {
        "epochs": 1,
        "max_steps": None,
        "batch_size": 2,  # per process
        "accumulate": 1,
        "lr": 1e-4,
        "weight_decay": 0.05,
        "warmup_steps": 0,
        "min_lr_ratio": 0.01,
        "grad_clip": 1.0,
        "amp": "auto",  # auto (bf16 on CUDA), bf16, none
        "activation_checkpointing": False,
        "ema_decay": 0.0,  # 0: no EMA
        "optimizer": "adamw",  # adamw | oss (fairscale sharded optimizer + ShardedDataParallel)
        "log_every": 1,
        "save_every": 0,  # steps; 0: at the end of each epoch only
        "keep_last": 2,
    },
}


class ConfigError(ValueError):
    pass


def _merge(base: Dict[str, Any], update: Dict[str, Any], where: str, free: Sequence[str]) -> None:
    for key, value in update.items():
        path = f"{where}.{key}" if where else key
        if key not in base:
            raise ConfigError(f"unknown config key {path!r}; valid keys{' in ' + where if where else ''}: {sorted(base)}")
        if isinstance(base[key], dict) and path not in free:
            if not isinstance(value, dict):
                raise ConfigError(f"config key {path!r} must be a mapping, got {value!r}")
            _merge(base[key], value, path, free)
        else:
            base[key] = value


def parse_override(text: str) -> Dict[str, Any]:
    """'train.max_steps=20' -> {'train': {'max_steps': 20}} (the value read as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value")
    key, raw = text.split("=", 1)
    value: Any = yaml.safe_load(raw) if raw else None
    for part in reversed(key.strip().split(".")):
        value = {part: value}
    return value


def load_config(path: Optional[Path] = None, overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """Defaults, then the YAML file, then the overrides; any unknown key is a ``ConfigError``."""
    config = copy.deepcopy(DEFAULTS)
    free = ("model.overrides",)  # checked by make_config against BigLittleSamConfig
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from err
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        _merge(config, loaded, "", free)
    for text in overrides:
        _merge(config, parse_override(text), "", free)
    return config
