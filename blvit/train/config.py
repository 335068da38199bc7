"""Training configs: YAML files, defaults, dotted ``key=value`` overrides, unknown keys refused."""
import copy
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import re

import yaml


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-3`` (no dot) as a string; learning rates are written that way, so
    accept every float notation Python accepts."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
               r"|[0-9][0-9_]*[eE][-+]?[0-9]+|\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)


def read_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)

# The optimisation settings every task shares (blvit.train.loop reads them).
TRAIN_DEFAULTS: Dict[str, Any] = {
    "epochs": 1,
    "max_steps": None,
    "batch_size": 2,  # per process
    "accumulate": 1,
    "global_batch": None,  # if set: accumulate = global_batch / (batch_size * processes), must divide
    "lr": 1e-4,
    "weight_decay": 0.05,
    "betas": [0.9, 0.999],  # AdamW's (beta1, beta2)
    "warmup_steps": 0,
    "min_lr_ratio": 0.01,
    "grad_clip": 1.0,
    "amp": "auto",  # auto (bf16 on CUDA), bf16, none
    "activation_checkpointing": False,
    "ema_decay": 0.0,  # 0: no EMA; else the average of the weights is what is validated and saved as best.pth
    # adamw | muon (Muon on the nn.Linear matrices, AdamW on the rest; blvit.train.optim; not with fsdp)
    # | oss (fairscale sharded optimizer + ShardedDataParallel)
    "optimizer": "adamw",
    "muon_lr": None,  # train.optimizer=muon: the matrices' lr on AdamW's scale (match_rms_adamw); None: train.lr
    # ddp: DistributedDataParallel (or fairscale's with optimizer=oss); fsdp: PyTorch's fully_shard
    # per transformer block (bf16 mixed precision on GPU with amp), sharded checkpoints through
    # torch.distributed.checkpoint (blvit-consolidate turns one into the single .pth eval reads)
    "strategy": "ddp",
    "tensorboard": False,  # also log to output_dir/tensorboard (needs the tensorboard package)
    "save_every": 0,  # steps; 0: at the end of each epoch only
    "keep_last": 2,
}

SAM_DEFAULTS: Dict[str, Any] = {
    "task": "sam_distill",  # sam_distill: bLViT student from a dense teacher; sam_finetune: mask loss only
    "output_dir": "runs/default",
    "seed": 0,
    "model": {
        "variant": "b+t",
        "keep_ratio": None,  # None: the variant's default (b+t / h+b 0.25; evit-b 0.6, ... see sam_adapter/config.py)
        "overrides": {},  # any BigLittleSamConfig field
        "sam_checkpoint": None,  # official SAM .pth (or a dense checkpoint of this toolkit) for the P-blocks
        "checkpoint": None,  # a bLViT-SAM checkpoint of this toolkit
        "e_checkpoint": None,  # a SAM file of the E-block width (ViT-B for h+b) to initialise E-blocks
        # std of the prompt encoder's random Fourier frequencies for a prompt encoder trained from
        # scratch (SAM: 1); checkpoints bring their own
        "prompt_pe_scale": 1.0,
    },
    "teacher": {
        "checkpoint": None,  # None: a randomly initialised teacher of the student's dense layout (logged)
        "cache_dir": None,  # precompute the teacher's embeddings here once and train from them
    },
    "data": {
        "root": "data/synthetic/sa1b_train",
        "shards": None,
        "fraction": None,
        "count": None,
        "max_masks": 8,
        "box_noise": 0.1,
        "box_fraction": 0.5,  # share of masks whose first prompt is their box (the rest: one point)
        # the low-resolution training targets: binary (a cell is the object where half of it is)
        # or area (each cell's share of object pixels: the logits learn where the edge crosses a cell)
        "mask_targets": "binary",
        # resolution of the training and validation targets: null = the mask decoder's output (4 x
        # the encoder's grid, S/4 for 16-pixel patches); "input" = the input size S, the loss then
        # on the logits upsampled bilinearly to S as SamPredictor upsamples them (SAM 2's released
        # training: focal, dice and IoU on its high-resolution masks); or a size in pixels from the
        # decoder's output to S that divides S
        "mask_size": None,
        "workers": 2,
        "val_root": None,  # SA-1B-format folder: box-prompt mIoU after every epoch, picks best.pth
        "val_count": 64,  # at most this many validation images
    },
    "loss": {
        "distill_weight": 2.5,
        "distill": "cosine",  # cosine | mse
        # Also distil the token maps after these blocks (0-based; the teacher has the student's
        # dense layout, so block i matches block i); the term is weight * mean over the layers.
        "distill_layers": [],
        "distill_layers_weight": 1.0,
        "mask_weight": 1.0,
        "focal_weight": 20.0,
        # focal loss's weight of object pixels (background 1 - alpha): RetinaNet's 0.25, as SAM
        # reimplementations use; 0.5 weighs both alike (with 0.25, SAM's 20:1 focal:dice collapsed
        # the quick start's small decoder to empty masks; with 0.5 it trains)
        "focal_alpha": 0.25,
        "dice_weight": 1.0,
        "iou_weight": 1.0,
        # the IoU head's loss on all three masks of a click (SAM 2's released training config)
        # instead of the supervised one only (SAM; the predicted IoU picks a single click's mask)
        "supervise_all_iou": False,
        # SAM's interactive training: after the first prompt, this many rounds each add a click
        # sampled from the error region, then mask-only rounds; all take the previous mask logits
        "click_rounds": 8,
        "refine_rounds": 2,
        # SAM: a single first point is ambiguous and trains the best of the three multimask outputs
        "multimask_points": True,
        "train_decoder": False,
        # SAM trains its prompt encoder's learned embeddings too; a distilled student keeps the teacher's
        "train_prompt_encoder": False,
    },
    "train": TRAIN_DEFAULTS,
}

CLASSIFY_DEFAULTS: Dict[str, Any] = {
    "task": "classify",  # ImageNet-style classification: bLViT, EViT, DeiT, Vim (+ token merging)
    "output_dir": "runs/classify",
    "seed": 0,
    "model": {
        "name": "blvit_base_tiny_patch16_224",  # any timm model name (import blvit registers ours)
        "kwargs": {},  # passed to timm.create_model (keep_ratio, img_size, num_classes, ...)
        "dense_checkpoint": None,  # DeiT file initialising a bLViT / EViT model's dense weights
        "checkpoint": None,  # timm's checkpoint_path: a checkpoint of this toolkit or the model's own file
        # none | tome | rmeeto; r: int or per-layer list; rmeeto: order restore | unordered | shuffled (+ shuffle_rate),
        # compare: "released" (11 for restore / unordered: Vim-Ti 197 -> 76 at block 22), an int, or null (the paper's
        # 197 -> 142); see blvit.tokens.rmeeto
        "merge": {"method": "none", "r": 0, "layers": None, "order": "restore", "compare": "released",
                  "shuffle_rate": 0.0},
    },
    "teacher": {
        "name": None,  # None: no distillation; e.g. deit_base_patch16_224
        "kwargs": {},
        "checkpoint": None,  # None with a teacher name: randomly initialised (logged)
    },
    "loss": {
        "smoothing": 0.1,
        "distill": "none",  # none | cosine (features, bLViT) | kd (logits, R-MeeTo)
        "distill_weight": 2.5,  # cosine: lambda * (1 - cos); kd: weight of the KL term
        "kd_temperature": 1.0,
        "ratio_weight": 2.0,  # DynamicViT: weight of the kept-fraction ratio loss (models with pruning_loss())
    },
    "data": {
        "root": "data/synthetic/imagefolder",  # train/<class>/*.JPEG and val/<class>/*.JPEG
        "train_split": "train",
        "val_split": "val",
        "workers": 4,
        "auto_augment": "rand-m9-mstd0.5-inc1",  # DeiT: RandAugment m9
        "reprob": 0.25,  # random erasing
        "color_jitter": 0.3,
        "mixup": 0.8,
        "cutmix": 1.0,
        "mixup_prob": 1.0,
        "repeated_aug": True,
        "val_count": None,  # evaluate on at most this many validation images
        # video classification (Kinetics lists): format "video_list" reads <root>/<train_list> and
        # <root>/<val_list> ("<path> <label>" lines, paths relative to root); clips of num_frames
        # frames sampling_rate apart; validation during training: one centre clip (blvit-eval
        # video runs the multi-view test); hflip false for motion-direction labels
        "format": "imagefolder",  # imagefolder | video_list
        "train_list": "train.csv",
        "val_list": "val.csv",
        "num_frames": 8,
        "sampling": "sparse",  # sparse (the released VideoMamba K400 runs) | dense (+ sampling_rate)
        "sampling_rate": 8,
        "hflip": True,
        "crop_scale": [0.08, 1.0],  # video training: random resized crop area range (VideoMAE's spatial_sampling)
    },
    "train": TRAIN_DEFAULTS,
}

TASK_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "sam_distill": SAM_DEFAULTS,  # bLViT-SAM student from a dense teacher
    "sam_finetune": SAM_DEFAULTS,  # mask loss only (e.g. the quick start's dense teacher)
    "classify": CLASSIFY_DEFAULTS,
}
DEFAULTS = SAM_DEFAULTS


class ConfigError(ValueError):
    pass


def _merge(base: Dict[str, Any], update: Dict[str, Any], where: str, free: Sequence[str],
           defaults: Optional[Dict[str, Any]] = None) -> None:
    """``update`` into ``base`` (checked: known keys, values of the kind the key's default in
    ``defaults``, the task's own defaults, holds; a key whose default is null takes any value)."""
    defaults = base if defaults is None else defaults
    for key, value in update.items():
        path = f"{where}.{key}" if where else key
        if key not in base:
            raise ConfigError(f"unknown config key {path!r}; valid keys{' in ' + where if where else ''}: {sorted(base)}")
        if isinstance(base[key], dict) and path not in free:
            if not isinstance(value, dict):
                raise ConfigError(f"config key {path!r} must be a mapping, got {value!r}")
            _merge(base[key], value, path, free, defaults.get(key) if isinstance(defaults.get(key), dict) else base[key])
        elif path in free and isinstance(base[key], dict) and isinstance(value, DottedPath):
            # a dotted override into a free-form mapping (model.overrides.embed_dim=96) changes that
            # one key and keeps the YAML file's others; a whole mapping (model.kwargs={...}) replaces it
            base[key] = _merge_free(base[key], value)
        else:
            problem = None if path in TWO_KINDS else _type_problem(defaults.get(key, base[key]), value)
            if problem:
                raise ConfigError(f"config key {path!r} {problem}, got {value!r}")
            base[key] = value


# keys that take values of two kinds: R-MeeTo's compare ("released", or the count itself), the
# distilled layers (one block index, or a list of them), the merged tokens (one r, one per layer,
# or ToMe's (r, inflect))
TWO_KINDS = ("model.merge.compare", "loss.distill_layers", "model.merge.r")


def _type_problem(default: Any, value: Any) -> Optional[str]:
    """Why ``value`` cannot replace ``default`` (the kind of value the key holds), or None.
    A key whose default is null takes any single value; null is taken everywhere (a setting off,
    unset or unbounded); what null cannot mean is refused where the setting is used."""
    if isinstance(value, dict) != isinstance(default, dict):
        return "must be a mapping" if isinstance(default, dict) else "is a single value, not a mapping"
    if isinstance(value, dict):
        return None  # a free-form mapping replaced whole
    if default is None:
        return None
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "must be true or false"
    if value is None:
        return None  # null: off / unset / all (train.grad_clip, train.epochs with max_steps, data.val_count)
    if isinstance(default, (int, float)):
        # a typo, "1e-3" read as a string by an older YAML, or a switch (true) where a number is meant
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "must be a number"
    if isinstance(default, str):
        return None if isinstance(value, str) else "must be a string"
    if isinstance(default, (list, tuple)):
        return None if isinstance(value, (list, tuple)) else "must be a list"
    return None


def _merge_free(base: Dict[str, Any], update: Dict[str, Any]) -> Dict[str, Any]:
    """``base`` updated by ``update``, nested mappings merged (no key checks: free-form)."""
    merged = dict(base)
    for key, value in update.items():
        merged[key] = (_merge_free(merged[key], value) if isinstance(merged.get(key), dict) and isinstance(value, DottedPath)
                       else value)
    return merged


class DottedPath(dict):
    """The nesting an override's dotted key builds (``a.b.c=v`` -> {a: {b: {c: v}}}), as opposed to
    a mapping written as the value: inside a free-form mapping the first merges, the second replaces."""


def parse_override(text: str) -> Dict[str, Any]:
    """'train.max_steps=20' -> {'train': {'max_steps': 20}} (the value read as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value")
    key, raw = text.split("=", 1)
    try:
        value: Any = read_yaml(raw) if raw else None
    except yaml.YAMLError as err:
        problem = str(err).splitlines()[0]
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({problem}); quote it, e.g. "
                          f"{key}='\"{raw}\"', or fix the brackets") from None
    for part in reversed(key.strip().split(".")):
        value = DottedPath({part: value})
    return value


def load_config(path: Optional[Path] = None, overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """The task's defaults, then the YAML file, then the overrides; any unknown key is a
    ``ConfigError`` that lists the valid ones."""
    loaded: Dict[str, Any] = {}
    if path is not None:
        try:
            loaded = read_yaml(Path(path).read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from err
        except OSError as err:
            raise ConfigError(f"{path}: cannot read the config ({err})") from err
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    updates = [parse_override(text) for text in overrides]
    task = next((u["task"] for u in reversed(updates) if "task" in u), loaded.get("task", "sam_distill"))
    if task not in TASK_DEFAULTS:
        raise ConfigError(f"unknown task {task!r}; valid tasks: {sorted(TASK_DEFAULTS)}")
    config = copy.deepcopy(TASK_DEFAULTS[task])
    config["task"] = task
    # free-form mappings, checked later by the model builders
    free = ("model.overrides", "model.kwargs", "teacher.kwargs")
    _merge(config, loaded, "", free, TASK_DEFAULTS[task])
    for update in updates:
        _merge(config, update, "", free, TASK_DEFAULTS[task])
    check_train(config["train"])
    return config


AMP_CHOICES = ("auto", "bf16", "none")


def check_train(t: Dict[str, Any]) -> None:
    """The optimisation settings every task needs to be meaningful (ConfigError otherwise)."""
    if isinstance(t["lr"], bool) or not isinstance(t["lr"], (int, float)) or t["lr"] < 0:
        # 0 is allowed: a frozen run (validation and checkpointing of an unchanged model)
        raise ConfigError(f"train.lr must be a number >= 0, got {t['lr']!r}")
    if t["amp"] not in AMP_CHOICES:  # anything else used to mean float32, silently
        raise ConfigError(f"train.amp must be one of {AMP_CHOICES} (auto: bf16 autocast on CUDA), got {t['amp']!r}")
    positive = {"batch_size": t["batch_size"], "accumulate": t["accumulate"]}
    if t["max_steps"] is not None:
        positive["max_steps"] = t["max_steps"]
    if t["max_steps"] is None or t["epochs"] is not None:
        positive["epochs"] = t["epochs"]
    for key, value in positive.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"train.{key} must be a whole number of at least 1, got {value!r}")
    if t["global_batch"] is not None and (not isinstance(t["global_batch"], int) or t["global_batch"] < 1):
        raise ConfigError(f"train.global_batch must be a whole number of at least 1 (or null), got {t['global_batch']!r}")
