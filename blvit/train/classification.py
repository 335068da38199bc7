"""ImageNet-style classification training (task ``classify``) on the shared loop.

Any timm model (``import blvit`` registers the bLViT, EViT and Vim models), optionally with
token merging applied (ToMe for ViTs, R-MeeTo for Vim), trained with the DeiT recipe: timm's
transforms, Mixup/CutMix, label smoothing, repeated augmentation under torchrun, AdamW with
warm-up + cosine. Distillation from a frozen teacher: ``cosine`` on the token features (bLViT
from its dense DeiT, lambda 2.5) or ``kd`` on the logits (R-MeeTo: soft-target CE + weight x KL).
"""
import logging
import sys
import warnings
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import timm
import torch
import torch.distributed as torch_dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

import blvit  # noqa: F401,I001  (registers this toolkit's timm models)
from blvit.data.imagenet import (ImageFolderDataset, NumberedRepeats, batch_inputs, build_transforms,
                                 collate_classification, scan_imagefolder, take_evenly)

from .loop import Task, dist_info, run, seed_everything, uses_bf16

logger = logging.getLogger("blvit.train")

FORMAT = "blvit-classifier"


def create_classifier(name: str, kwargs: Dict[str, Any], dense_checkpoint: Optional[str] = None,
                      checkpoint: Optional[str] = None) -> nn.Module:
    """``timm.create_model`` with this toolkit's extras.

    ``dense_checkpoint``: a DeiT file initialising a bLViT/EViT model's dense weights.
    ``checkpoint``: a checkpoint written by this trainer (its stored model arguments and token
    merging are used unless ``kwargs`` gives others), or any file timm's ``checkpoint_path`` reads.
    """
    return load_classifier(name, kwargs, dense_checkpoint, checkpoint)[0]


def _module_filter(model: nn.Module) -> Optional[Callable[[Dict[str, Any], nn.Module], Dict[str, Any]]]:
    """The ``checkpoint_filter_fn`` of the module defining ``model``'s class (timm's convention)."""
    return getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)


def load_classifier(name: str, kwargs: Dict[str, Any], dense_checkpoint: Optional[str] = None,
                    checkpoint: Optional[str] = None) -> Tuple[nn.Module, Optional[List[str]]]:
    """:func:`create_classifier`, plus the class names (folder names, in output order) that a
    checkpoint of this trainer was trained on; None for any other checkpoint or none."""
    from blvit.utils.io import CheckpointError, read_checkpoint

    obj = read_checkpoint(checkpoint) if checkpoint else {}
    ours = obj.get("format") == FORMAT
    if ours and obj.get("arch") != name:
        raise CheckpointError(f"{checkpoint}: a checkpoint of {obj.get('arch')!r}, not of {name!r}")
    extra = dict(obj.get("kwargs", {}), **kwargs) if ours else dict(kwargs)
    if dense_checkpoint:
        extra["dense_checkpoint"] = dense_checkpoint
    if checkpoint and not ours:
        model = timm.create_model(name, **extra)
        # the model module's own filter: timm's EfficientViT resizes attention biases for another
        # input size, Evo-ViT maps its released key names, DeiT files get this toolkit's MLP names
        try:
            timm.models.load_checkpoint(model, str(checkpoint), filter_fn=_module_filter(model))
            return model, None
        except (CheckpointError, RuntimeError, KeyError) as err:
            if str(checkpoint) in str(err):
                raise
            raise CheckpointError(f"{checkpoint}: cannot be loaded into {name!r}: {err}") from err
    model = timm.create_model(name, **extra)
    if not ours:
        return model, None
    # looked up before merging: ToMe swaps the model's class for one of blvit.tokens.tome
    filter_fn = _module_filter(model)
    merge = dict(obj.get("merge") or {})
    merge.setdefault("compare", None)  # written before the released R-MeeTo schedule existed: the paper's
    apply_merging(model, merge)
    try:
        # the same filter as any other file: another img_size resamples pos_embed (bicubic)
        state = filter_fn(obj["model"], model) if filter_fn is not None else obj["model"]
        missing, unexpected = model.load_state_dict(state, strict=False)
    except (RuntimeError, KeyError, ValueError) as err:
        raise CheckpointError(f"{checkpoint}: cannot be loaded into {name!r} with {extra}: {err}") from err
    if missing or unexpected:
        raise CheckpointError(f"{checkpoint}: does not fit {name!r}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    classes = obj.get("classes")
    return model, (list(classes) if classes else None)


def apply_merging(model: nn.Module, merge: Dict[str, Any]) -> nn.Module:
    """ToMe (timm ViTs) or R-MeeTo (Vim) as configured by ``model.merge``."""
    method = merge.get("method", "none")
    if method == "none" or getattr(model, "_merging_applied", False):
        return model
    model._merging_applied = True
    if method == "tome":
        from blvit.tokens.tome import apply_tome

        apply_tome(model, r=merge["r"])
    elif method == "rmeeto":
        from blvit.tokens.rmeeto import apply_rmeeto

        kwargs = {"r": merge["r"], "order": merge.get("order", "restore"), "compare": merge.get("compare", "released"),
                  "shuffle_rate": merge.get("shuffle_rate", 0.0)}
        if merge.get("layers") is not None:
            kwargs["layers"] = merge["layers"]
        apply_rmeeto(model, **kwargs)
    else:
        raise ValueError(f"unknown model.merge.method {method!r}; choose none, tome or rmeeto")
    return model


def _features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.forward_features(x)


class ClassifierTrainingModule(nn.Module):
    """Student (+ frozen teacher): ``forward(images, targets)`` returns the loss terms."""

    def __init__(self, student: nn.Module, teacher: Optional[nn.Module], loss_cfg: Dict[str, Any], mixup) -> None:
        super().__init__()
        self.student, self.loss_cfg, self.mixup = student, loss_cfg, mixup
        self.teacher = [teacher] if teacher is not None else []  # a list: not a sub-module, not in DDP or the optimiser

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        cfg = self.loss_cfg
        if self.mixup is not None and images.dim() == 5:  # clips: one box / blend for all frames of a clip
            b, c, t, h, w = images.shape
            images, soft = self.mixup(images.reshape(b, c * t, h, w), targets)
            images = images.reshape(b, c, t, h, w)
        elif self.mixup is not None:
            images, soft = self.mixup(images, targets)
        else:
            soft = None
        features = self.student.forward_features(images)
        logits = self.student.forward_head(features)

        def supervised_loss(out_logits: torch.Tensor) -> torch.Tensor:
            if soft is not None:
                return torch.sum(-soft * F.log_softmax(out_logits.float(), dim=-1), dim=-1).mean()
            return F.cross_entropy(out_logits.float(), targets, label_smoothing=cfg["smoothing"])

        supervised = supervised_loss(logits)
        auxiliary = getattr(self.student, "auxiliary_logits", None)  # Evo-ViT's released class-token head
        aux_logits = auxiliary(features) if auxiliary is not None else None
        if aux_logits is not None:
            supervised = 0.5 * supervised + 0.5 * supervised_loss(aux_logits)
        out = {"supervised": supervised}
        total = supervised
        pruning_loss = getattr(self.student, "pruning_loss", None)  # DynamicViT's kept-fraction ratio loss
        if pruning_loss is not None and self.training:
            out["ratio"] = pruning_loss()
            total = total + cfg["ratio_weight"] * out["ratio"]
        if self.teacher and cfg["distill"] != "none":
            teacher = self.teacher[0]
            with torch.no_grad():
                t_features = teacher.forward_features(images)
                t_logits = teacher.forward_head(t_features)
            if cfg["distill"] == "cosine":
                if t_features.shape != features.shape:
                    raise ValueError(f"cosine distillation needs equal feature shapes: student {tuple(features.shape)}, "
                                     f"teacher {tuple(t_features.shape)}")
                out["distill"] = (1 - F.cosine_similarity(features.float(), t_features.float(), dim=-1)).mean()
            elif cfg["distill"] == "kd":
                temp = cfg["kd_temperature"]
                out["distill"] = F.kl_div(F.log_softmax(logits.float() / temp, -1), F.log_softmax(t_logits.float() / temp, -1),
                                          reduction="batchmean", log_target=True) * temp * temp
            else:
                raise ValueError(f"unknown loss.distill {cfg['distill']!r}; choose none, cosine or kd")
            total = total + cfg["distill_weight"] * out["distill"]
        out["loss"] = total
        return out


def even_batch_for_mixup(inputs: torch.Tensor, targets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """An even batch for timm's Mixup (which pairs sample i with sample B - 1 - i) from an odd one
    (B, ...), (B,): odd only because unreadable samples were dropped from an even configured batch
    (``train()`` refuses an odd ``train.batch_size``). The last sample is left out; a lone sample
    is paired with itself, which mixing leaves unchanged (image and target)."""
    b = inputs.shape[0]
    if b == 1:
        return inputs.expand(2, *inputs.shape[1:]).contiguous(), targets.expand(2).contiguous()
    warnings.warn(f"Mixup/CutMix: {b} usable samples in this batch (some were skipped as unreadable); "
                  f"training on the first {b - 1}")
    return inputs[: b - 1], targets[: b - 1]


def view_averaged_logits(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Class scores (B, K) of images (B, 3, H, W) or clips (B, 3, T, H, W): the model's logits.

    Several views of each clip (B, V, 3, T, H, W): the log of the views' mean softmax
    probabilities, the Kinetics test protocol of the released VideoMamba / R-MeeTo code
    (OpenGVLab/VideoMamba videomamba/video_sm/engines/engine_for_finetuning.py ``merge``: softmax
    per view, then the mean over views). A log, so that top-k picks the same classes as the
    averaged probabilities; averaging raw logits lets one over-confident view outvote the rest.
    """
    if inputs.dim() == 6:
        b, v = inputs.shape[:2]
        probs = model(inputs.flatten(0, 1)).float().softmax(-1).view(b, v, -1).mean(1)
        return probs.log()
    return model(inputs).float()


@torch.no_grad()
def evaluate_topk(model: nn.Module, dataset, device: torch.device, amp: bool, batch_size: int = 64, rank: int = 0,
                  world: int = 1, workers: int = 0, desc: Optional[str] = None) -> Dict[str, float]:
    """Top-1 / top-5 accuracy (%) over a dataset; ranks take strides and sums are all-reduced."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64)
    loader = DataLoader(Subset(dataset, list(range(rank, len(dataset), world))), batch_size=batch_size,
                        num_workers=workers, collate_fn=collate_classification)
    for batch in loader:
        if "target" not in batch:
            continue
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            logits = view_averaged_logits(model, batch_inputs(batch).to(device))
        target = batch["target"].to(device)
        top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        totals += torch.tensor([float((top5[:, 0] == target).sum()), float((top5 == target[:, None]).any(-1).sum()),
                                len(target)], dtype=torch.float64)
    if world > 1:
        totals = totals.to(device)
        torch_dist.all_reduce(totals)
        totals = totals.cpu()
    model.train(was_training)
    n = max(1.0, float(totals[2]))
    return {"val_top1": 100 * float(totals[0]) / n, "val_top5": 100 * float(totals[1]) / n, "val_images": int(totals[2])}


def _video_datasets(cfg: Dict[str, Any], img_size: int, strict: bool, num_classes: int):
    """Kinetics-style list files -> (training clips, validation: one centre clip per video);
    a label outside 0..num_classes - 1 is an error naming the list file and line."""
    from blvit.data.video import VideoClipDataset

    d = cfg["data"]
    if d["auto_augment"] or d["reprob"]:
        logger.info("video clips: RandAugment and random erasing are image transforms, not applied")
    root = Path(d["root"])
    common = dict(num_frames=d["num_frames"], sampling_rate=d["sampling_rate"], sampling=d["sampling"],
                  img_size=img_size, num_classes=num_classes)
    train_set = VideoClipDataset.from_list(root / d["train_list"], root, strict=strict, training=True, seed=cfg["seed"],
                                           flip=d["hflip"], crop_scale=tuple(d["crop_scale"]), **common)
    val_set = None
    if d["val_list"]:
        val_set = VideoClipDataset.from_list(root / d["val_list"], root, strict=strict, training=False, test_clips=1,
                                             test_crops=1, **common)
        val_set.samples = take_evenly(val_set.samples, d["val_count"])
    return train_set, val_set


def _datasets(cfg: Dict[str, Any], img_size: int, strict: bool, student: nn.Module
              ) -> Tuple[ImageFolderDataset, Optional[ImageFolderDataset]]:
    d = cfg["data"]
    if d["format"] == "video_list":
        return _video_datasets(cfg, img_size, strict, student.num_classes)
    if d["format"] != "imagefolder":
        raise ValueError(f"unknown data.format {d['format']!r}; choose imagefolder or video_list")
    from timm.data import resolve_data_config

    # the model's own normalisation (timm's vit_base: 0.5 / 0.5, MobileViT: 0 / 1; DeiT: ImageNet's)
    data_cfg = resolve_data_config({}, model=student)
    mean, std = tuple(data_cfg["mean"]), tuple(data_cfg["std"])
    root = Path(d["root"])
    train_set = ImageFolderDataset.from_folder(root / d["train_split"], build_transforms(img_size, True, d, mean, std),
                                               seed=cfg["seed"], strict=strict)
    val_set = None
    if d["val_split"]:
        samples, classes = scan_imagefolder(root / d["val_split"], train_set.classes)
        samples = take_evenly(samples, d["val_count"])
        val_transform = build_transforms(img_size, False, d, mean, std)
        val_set = ImageFolderDataset(samples, classes, val_transform, cfg["seed"], strict)
    return train_set, val_set


def build_student_and_teacher(cfg: Dict[str, Any]) -> Tuple[nn.Module, Optional[nn.Module]]:
    m, t = cfg["model"], cfg["teacher"]
    student = create_classifier(m["name"], m["kwargs"], m["dense_checkpoint"], m["checkpoint"])
    apply_merging(student, m["merge"])  # no-op if the checkpoint already brought it
    teacher = None
    if t["name"]:
        teacher = create_classifier(t["name"], t["kwargs"], None, t["checkpoint"])
        if not t["checkpoint"]:
            logger.warning("no teacher checkpoint configured: distilling from a RANDOMLY INITIALISED %s", t["name"])
        teacher.eval().requires_grad_(False)
    elif cfg["loss"]["distill"] != "none":
        raise ValueError(f"loss.distill={cfg['loss']['distill']!r} needs teacher.name")
    return student, teacher


def train(cfg: Dict[str, Any], resume: bool = False, strict: bool = False) -> Dict[str, Any]:
    """Run a ``classify`` job described by a config from ``blvit.train.config.load_config``."""
    from timm.data import Mixup
    from timm.data.distributed_sampler import RepeatAugSampler

    world, rank, device = dist_info()
    seed_everything(cfg["seed"])
    t, d = cfg["train"], cfg["data"]
    amp = uses_bf16(t, device)
    mixing = d["mixup"] > 0 or d["cutmix"] > 0
    if mixing and t["batch_size"] % 2:
        # timm's Mixup blends each sample with its mirror in the batch (x.flip(0))
        raise ValueError(f"train.batch_size={t['batch_size']}: Mixup/CutMix (data.mixup={d['mixup']}, "
                         f"data.cutmix={d['cutmix']}) needs an even per-process batch size")
    student, teacher = build_student_and_teacher(cfg)
    img_size = student.pretrained_cfg.get("input_size", (3, 224, 224))[-1] if hasattr(student, "pretrained_cfg") else 224
    img_size = int(cfg["model"]["kwargs"].get("img_size", img_size))
    train_set, val_set = _datasets(cfg, img_size, strict, student)
    train_set.rank = rank  # repeated augmentation: each process sees its own augmentation of a sample
    num_classes = student.num_classes
    if len(train_set.classes) > num_classes:
        raise ValueError(f"{d['root']}: {len(train_set.classes)} classes but the model has {num_classes} outputs "
                         f"(set model.kwargs.num_classes)")
    mixup = None
    if mixing:
        mixup = Mixup(mixup_alpha=d["mixup"], cutmix_alpha=d["cutmix"], prob=d["mixup_prob"],
                      label_smoothing=cfg["loss"]["smoothing"], num_classes=num_classes)
    if teacher is not None:
        teacher.to(device)
    module = ClassifierTrainingModule(student, teacher, cfg["loss"], mixup)

    def make_sampler(dataset, world_, rank_, seed):
        if d["repeated_aug"] and world_ > 1:
            repeats = RepeatAugSampler(dataset, num_replicas=world_, rank=rank_, shuffle=True)
            # numbered copies: a rank's two copies of a sample get two augmentations (ImageFolderDataset decodes them)
            return NumberedRepeats(repeats, len(dataset)) if isinstance(dataset, ImageFolderDataset) else repeats
        from torch.utils.data import DistributedSampler

        return DistributedSampler(dataset, num_replicas=world_, rank=rank_, shuffle=True, seed=seed, drop_last=True)

    def losses(model: nn.Module, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        inputs, targets = batch_inputs(batch), batch["target"]
        if mixup is not None and inputs.shape[0] % 2:
            inputs, targets = even_batch_for_mixup(inputs, targets)
        return model(inputs, targets)

    def payload() -> Dict[str, Any]:
        return {"format": FORMAT, "arch": cfg["model"]["name"], "kwargs": cfg["model"]["kwargs"],
                "merge": cfg["model"]["merge"], "classes": train_set.classes, "model": student.state_dict()}

    def load(saved: Dict[str, Any], path: Path) -> None:
        student.load_state_dict(saved["model"])

    def set_epoch(epoch: int) -> None:
        train_set.set_epoch(epoch)
        if hasattr(student, "set_epoch") and t["epochs"]:  # an epoch schedule (Evo-ViT: layer-wise, then stage-wise)
            student.set_epoch(epoch, t["epochs"])

    validate = None
    if val_set is not None:
        validate = partial(evaluate_topk, student, val_set, device, amp, t["batch_size"], rank, world)

    task = Task(module=module, dataset=train_set, collate=collate_classification, losses=losses, payload=payload,
                load=load, validate=validate, score_key="val_top1" if validate else None, ema_module=student,
                set_epoch=set_epoch, make_sampler=make_sampler, loss_keys=("loss", "supervised", "distill", "ratio"))
    return run(task, cfg, world, rank, device, resume)
