"""Losses for SAM training: feature distillation and SAM's mask loss."""
from typing import Dict

import torch
import torch.nn.functional as F


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "cosine",
                      channel_dim: int = 1) -> torch.Tensor:
    """(B, C, H, W) embeddings (or (B, H, W, C) token maps with ``channel_dim=-1``) -> scalar.
    cosine: mean over positions of 1 - cos(s, t) across channels; mse: mean squared error."""
    if student.shape != teacher.shape:
        raise ValueError(f"distillation: student features {tuple(student.shape)} and teacher features "
                         f"{tuple(teacher.shape)} differ in shape")
    student, teacher = student.float(), teacher.float()
    if kind == "cosine":
        return (1 - F.cosine_similarity(student, teacher, dim=channel_dim)).mean()
    if kind == "mse":
        return F.mse_loss(student, teacher)
    raise ValueError(f"unknown distillation loss {kind!r}; choose cosine or mse")


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """(..., H, W) -> (...): sigmoid focal loss averaged over pixels."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    loss = ce * (1 - p_t) ** gamma
    loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return loss.flatten(-2).mean(-1)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """(..., H, W) -> (...)."""
    p = logits.sigmoid().flatten(-2)
    t = target.flatten(-2)
    return 1 - (2 * (p * t).sum(-1) + eps) / (p.sum(-1) + t.sum(-1) + eps)


def mask_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(..., H, W) -> (...): IoU of the thresholded prediction against the target thresholded at
    0.5 (soft area targets count where the object covers at least half of a cell)."""
    pred = (logits > 0).flatten(-2).float()
    t = (target >= 0.5).flatten(-2).float()
    inter = (pred * t).sum(-1)
    return inter / (pred.sum(-1) + t.sum(-1) - inter).clamp(min=1)


def upsample_logits(logits: torch.Tensor, size: int) -> torch.Tensor:
    """(..., h, w) mask logits -> (..., size, size), bilinear as ``Sam.postprocess_masks`` upsamples
    them to the input frame (and SAM 2's training its high-resolution masks); unchanged at h = size."""
    if logits.shape[-1] == size and logits.shape[-2] == size:
        return logits
    lead = logits.shape[:-2]
    up = F.interpolate(logits.reshape(-1, 1, *logits.shape[-2:]), size=(size, size), mode="bilinear", align_corners=False)
    return up.reshape(*lead, size, size)


# The keyword options of sam_mask_loss that come from a config's ``loss`` section.
MASK_LOSS_OPTIONS = ("focal_weight", "focal_alpha", "dice_weight", "iou_weight", "supervise_all_iou")


def sam_mask_loss(logits: torch.Tensor, iou_pred: torch.Tensor, target: torch.Tensor,
                  focal_weight: float = 20.0, dice_weight: float = 1.0, iou_weight: float = 1.0,
                  focal_alpha: float = 0.25, supervise_all_iou: bool = False,
                  reduce: bool = True) -> Dict[str, torch.Tensor]:
    """SAM's loss on multimask output: the best of the K masks by focal:dice, plus MSE of the
    predicted IoU for that mask.

    Args:
        logits: (M, K, h, w) low-resolution mask logits; iou_pred: (M, K); target: (M, h, w),
            float or bool.
        focal_alpha: the focal loss's weight of object pixels (background: 1 - alpha); RetinaNet's
            0.25 weighs background pixels 3x.
        supervise_all_iou: the IoU term on every one of the K masks (SAM 2's released training
            config) instead of only the supervised one (SAM; SAM 2's default): the predicted IoU
            is what picks the mask of a single click at inference.
        reduce: False keeps one value per mask (M,) for "mask", "iou" and "mask_iou".
    Returns:
        {"mask": mean focal/dice term, "iou": IoU-prediction term, "mask_iou": mean IoU (no grad),
        "best": (M,) index of the supervised mask among the K}.
    """
    logits = logits.float()
    target = target.float()[:, None].expand_as(logits)
    per_mask = focal_weight * focal_loss(logits, target, alpha=focal_alpha) + dice_weight * dice_loss(logits, target)  # (M, K)
    best = per_mask.argmin(dim=1, keepdim=True)
    mask_term = per_mask.gather(1, best).squeeze(1)
    with torch.no_grad():
        all_iou = mask_iou(logits, target)  # (M, K)
        actual_iou = all_iou.gather(1, best).squeeze(1)
    if supervise_all_iou:
        iou_term = iou_weight * F.mse_loss(iou_pred.float(), all_iou, reduction="none").mean(1)
    else:
        iou_term = iou_weight * F.mse_loss(iou_pred.float().gather(1, best).squeeze(1), actual_iou, reduction="none")
    out = {"mask": mask_term, "iou": iou_term, "mask_iou": actual_iou}
    if reduce:
        out = {k: v.mean() for k, v in out.items()}
    out["best"] = best.squeeze(1)
    return out
