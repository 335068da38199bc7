"""Training bLViT-SAM: distillation from a dense SAM encoder plus SAM's mask loss.

One process, one GPU, or ``torchrun`` over GPUs and nodes (DDP, NCCL; gloo on CPU), optionally
with fairscale's sharded optimizer. Checkpoints are atomic; ``resume`` continues at the exact
batch of the epoch where the run stopped.
"""
import dataclasses
from functools import partial
import logging
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.distributed as torch_dist
import torch.nn as nn
from torch.utils.data import DataLoader, Subset

from blvit.data.sa1b import SA1BDataset, collate_skipping, find_samples, select_subset
from sam_adapter.build import build_sam_blvit, build_sam_from_config
from sam_adapter.checkpoint import FORMAT, FORMAT_VERSION, load_checked, load_sam_checkpoint

from blvit.train.losses import MASK_LOSS_OPTIONS, distillation_loss, mask_iou, upsample_logits
from blvit.train.sam_prompts import interactive_losses
from blvit.train.loop import Task, dist_info, run, seed_everything, uses_bf16
from blvit.train.teacher_cache import TeacherEmbeddingCache, build_cache, file_signature

logger = logging.getLogger("blvit.train")


def predict_box_masks(sam: nn.Module, embedding: torch.Tensor, image_pe: torch.Tensor, boxes: torch.Tensor):
    """Single-mask logits (M, 1, S/4, S/4) and predicted IoU (M, 1) for box prompts (M, 4) on one
    image's embedding (1, C, h, w), as SamPredictor decodes a box."""
    sparse, dense = sam.prompt_encoder(points=None, boxes=boxes, masks=None)
    return sam.mask_decoder(embedding, image_pe, sparse, dense, multimask_output=False)


@torch.no_grad()
def evaluate_box_miou(sam: nn.Module, dataset: SA1BDataset, device: torch.device, amp: bool,
                      rank: int = 0, world: int = 1, batch_size: int = 4) -> Dict[str, float]:
    """Mean IoU of box-prompted masks (ground-truth boxes, no noise) on a validation set.

    Computed at the dataset's target resolution (``data.mask_size``; the logits are upsampled to
    it where it is finer than the decoder's); the evaluation CLI measures full-resolution mIoU.
    Ranks take strides of the set and the sums are all-reduced, so every rank returns the same
    figure.
    """
    was_training = sam.training
    sam.eval()
    image_pe = sam.prompt_encoder.get_dense_pe()
    total = torch.zeros(2, dtype=torch.float64)
    # Every rank runs the encoder equally often (under FSDP each block's forward is a collective):
    # a shorter stride is padded with repeats that are not counted, and a batch whose samples were
    # all bad still runs the encoder, on a blank image.
    mine = list(range(rank, len(dataset), world))
    padded = mine + (mine[:1] or [0]) * (-(-len(dataset) // world) - len(mine))
    loader = DataLoader(Subset(dataset, padded), batch_size=batch_size, collate_fn=collate_skipping)
    counted = set(mine)
    for batch in loader:
        if "image" not in batch:
            with torch.autocast(device.type, torch.bfloat16, enabled=amp):
                sam.image_encoder(torch.zeros(1, 3, dataset.img_size, dataset.img_size, device=device))
            continue
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            embeddings = sam.image_encoder(batch["image"])
            for i in range(embeddings.shape[0]):
                if int(batch["index"][i]) not in counted:  # a padding repeat
                    continue
                counted.discard(int(batch["index"][i]))
                pick = batch["valid"][i]
                logits, _ = predict_box_masks(sam, embeddings[i : i + 1], image_pe, batch["boxes"][i][pick])
                target = batch["masks"][i][pick]
                logits = upsample_logits(logits[:, 0].float(), target.shape[-1])
                total += torch.tensor([float(mask_iou(logits, target).sum()),
                                       float(pick.sum())], dtype=torch.float64)
    if world > 1:
        torch_dist.all_reduce(total)
    sam.train(was_training)
    return {"val_box_miou": float(total[0] / total[1].clamp(min=1)), "val_masks": int(total[1])}


class SamTrainingModule(nn.Module):
    """Wraps a ``Sam`` so that one ``forward(batch)`` returns the losses (what DDP needs)."""

    def __init__(self, sam: nn.Module, loss_cfg: Dict[str, Any]) -> None:
        super().__init__()
        self.sam, self.loss_cfg = sam, loss_cfg

    def prompt_losses(self, embeddings: torch.Tensor, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """SAM's interactive prompting (``blvit.train.sam_prompts``): every mask starts from its box
        or a point, then ``loss.click_rounds`` corrective clicks and ``loss.refine_rounds`` mask-only
        rounds, each fed the previous round's mask logits and each supervised. The masks of all
        images that start from the same kind of prompt are decoded together."""
        sam, cfg = self.sam, self.loss_cfg
        weights = {k: cfg[k] for k in MASK_LOSS_OPTIONS}
        valid = batch["valid"]
        # Mean over each image's masks, then over images: the same objective whatever the
        # split of a global batch across processes.
        per_mask = 1.0 / (valid.sum(1, keepdim=True).clamp(min=1) * embeddings.shape[0])
        per_mask = per_mask.expand_as(valid)
        image_index = torch.arange(embeddings.shape[0], device=valid.device)[:, None].expand_as(valid)
        image_pe = sam.prompt_encoder.get_dense_pe()
        total: Dict[str, torch.Tensor] = {}
        rounds = []
        for is_box in (True, False):
            pick = valid & (batch["use_box"] == is_box)
            if not bool(pick.any()):
                continue
            images = image_index[pick]
            out = interactive_losses(sam, embeddings[images], image_pe, batch["masks"][pick], batch["input_hw"][images],
                                     batch["boxes"][pick] if is_box else None, None if is_box else batch["points"][pick],
                                     int(cfg["click_rounds"]), int(cfg["refine_rounds"]), weights,
                                     bool(cfg["multimask_points"]))
            w = per_mask[pick]
            for k in ("mask", "iou", "mask_iou"):
                total[k] = total.get(k, 0) + (out[k] * w).sum()
            rounds.append((out["mask_iou_rounds"] * w).sum(1))
        rounds_total = torch.stack(rounds).sum(0)
        total["mask_iou_first"], total["mask_iou_last"] = rounds_total[0], rounds_total[-1]
        return total

    def forward(self, batch: Dict[str, torch.Tensor], teacher_embeddings: Optional[torch.Tensor] = None,
                teacher_layers: Sequence[torch.Tensor] = ()):
        """Losses of one batch. teacher_embeddings: (B, C, h, w) encoder outputs (or the batch's
        cached ``teacher_embedding``); teacher_layers: (B, h, w, D) token maps after the blocks
        in ``loss.distill_layers``, in that order."""
        cfg = self.loss_cfg
        layers = list(cfg["distill_layers"])
        if layers and teacher_layers:
            embeddings, student_layers = self.sam.image_encoder.forward_intermediates(batch["image"], layers)
        else:
            embeddings, student_layers = self.sam.image_encoder(batch["image"]), []
        if teacher_embeddings is None:
            teacher_embeddings = batch.get("teacher_embedding")
        total = embeddings.new_zeros(())
        out: Dict[str, torch.Tensor] = {}
        if teacher_embeddings is not None and cfg["distill_weight"] > 0:
            out["distill"] = distillation_loss(embeddings, teacher_embeddings, cfg["distill"])
            total = total + cfg["distill_weight"] * out["distill"]
        if student_layers:
            out["distill_layers"] = torch.stack([distillation_loss(s, t, cfg["distill"], channel_dim=-1)
                                                 for s, t in zip(student_layers, teacher_layers)]).mean()
            total = total + cfg["distill_layers_weight"] * out["distill_layers"]
        if cfg["mask_weight"] > 0:
            out.update(self.prompt_losses(embeddings, batch))
            total = total + cfg["mask_weight"] * (out["mask"] + out["iou"])
            # Which prompt embeddings a batch uses depends on the prompts it drew (no box-started
            # mask: no box-corner embeddings). DDP, fairscale's ShardedDDP and FSDP all need every
            # rank to produce a gradient for every trainable parameter: a zero term makes the
            # unused ones take part (gradient 0, as their share of the global batch).
            total = total + 0.0 * sum(p.sum() for p in self.sam.prompt_encoder.parameters() if p.requires_grad)
        out["loss"] = total
        return out


def student_options(cfg: Dict[str, Any]) -> Tuple[Optional[float], Dict[str, Any]]:
    """(keep ratio, config overrides) of ``cfg['model']``: ``model.keep_ratio``, else
    ``model.overrides.keep_ratio``, else None (the variant's default)."""
    m = cfg["model"]
    overrides = dict(m["overrides"])
    if m["keep_ratio"] is not None and "keep_ratio" in overrides:
        raise ValueError("model.keep_ratio and model.overrides.keep_ratio both set: give one")
    keep_ratio = m["keep_ratio"] if m["keep_ratio"] is not None else overrides.pop("keep_ratio", None)
    return keep_ratio, overrides


def dense_teacher_config(student_config):
    """The dense encoder of the student's layout: what it is distilled from."""
    # the routing and reduction settings go back to their defaults: a dense layout never reads them
    unread = ("fusion", "router_score", "e_num_heads", "e_mlp_ratio", "merge_r", "score_momentum")
    defaults = {f.name: f.default for f in dataclasses.fields(student_config) if f.name in unread}
    return dataclasses.replace(student_config, name="dense", blvit_layers=(), predictor_layers=(), e_block_layers=(),
                               e_embed_dim=0, reduction="", reduction_layers=(), **defaults)


def build_models(cfg: Dict[str, Any]):
    """The student Sam and (for distillation) the frozen dense teacher encoder."""
    m = cfg["model"]
    keep_ratio, overrides = student_options(cfg)
    student = build_sam_blvit(m["variant"], checkpoint=m["checkpoint"], sam_checkpoint=m["sam_checkpoint"],
                              keep_ratio=keep_ratio, e_checkpoint=m["e_checkpoint"],
                              prompt_pe_scale=float(m["prompt_pe_scale"]), **overrides)
    teacher = None
    if cfg["task"] == "sam_distill":
        dense_cfg = dense_teacher_config(student.image_encoder.config)
        teacher_sam = build_sam_from_config(dense_cfg)
        if cfg["teacher"]["checkpoint"]:
            load_sam_checkpoint(teacher_sam, cfg["teacher"]["checkpoint"])
        else:
            logger.warning("no teacher checkpoint configured: distilling from a RANDOMLY INITIALISED dense teacher "
                           "of the student's size (embed_dim %d, depth %d)", dense_cfg.embed_dim, dense_cfg.depth)
        teacher = teacher_sam.image_encoder.eval().requires_grad_(False)
    elif cfg["task"] != "sam_finetune":
        raise ValueError(f"unknown task {cfg['task']!r}; choose sam_distill or sam_finetune")
    set_trainable_parts(student, cfg)
    return student, teacher


def prompt_parts_never_used(cfg: Dict[str, Any]) -> Tuple[str, ...]:
    """Names of the prompt encoder's modules that the recipe never feeds: the mask-prompt path
    without click or mask-only rounds, the box-corner embeddings without box prompts
    (``data.box_fraction`` 0), the point embeddings without any point (boxes only, no clicks)."""
    loss, box_fraction = cfg["loss"], float(cfg["data"]["box_fraction"])
    rounds = int(loss["click_rounds"]) + int(loss["refine_rounds"])
    unused = [] if rounds else ["mask_downscaling"]
    if box_fraction <= 0:
        unused += ["point_embeddings.2", "point_embeddings.3"]
    if box_fraction >= 1 and not int(loss["click_rounds"]):
        unused += ["point_embeddings.0", "point_embeddings.1", "not_a_point_embed"]
    return tuple(unused)


def set_trainable_parts(sam: nn.Module, cfg: Dict[str, Any]) -> None:
    """``loss.train_prompt_encoder`` / ``loss.train_decoder``, less the prompt encoder's parts the
    recipe never uses: they keep their loaded weights (no weight decay of parameters that never see a
    gradient) and take no part in the gradient synchronisation."""
    loss = cfg["loss"]
    if (loss["train_prompt_encoder"] or loss["train_decoder"]) and not loss["mask_weight"] > 0:
        raise ValueError("loss.train_prompt_encoder / loss.train_decoder need loss.mask_weight > 0: without the mask "
                         "loss no gradient reaches the prompt encoder or the mask decoder")
    sam.prompt_encoder.requires_grad_(bool(loss["train_prompt_encoder"]))
    sam.mask_decoder.requires_grad_(bool(loss["train_decoder"]))
    if loss["train_prompt_encoder"]:
        for name in prompt_parts_never_used(cfg):
            sam.prompt_encoder.get_submodule(name).requires_grad_(False)


def _teacher_meta(cfg: Dict[str, Any], teacher: nn.Module, img_size: int, amp: bool) -> Dict[str, Any]:
    """What the teacher cache's embeddings depend on: the teacher file (size and a hash of its
    ends: a retrained teacher written over the same path is another teacher, a copy on another
    node the same), or the seed of a random one; its architecture; the input size; the precision."""
    checkpoint = cfg["teacher"]["checkpoint"]
    return {"teacher_checkpoint": file_signature(checkpoint) if checkpoint else f"random(seed={cfg['seed']})",
            "teacher": teacher.config.architecture(), "img_size": img_size, "bf16": bool(amp)}


def target_size(option: Any, encoder: nn.Module) -> int:
    """The resolution of the mask targets from ``data.mask_size``: None -> the mask decoder's output
    (4 x the encoder's grid: S/4 for 16-pixel patches), "input" -> the input size S, or a size in
    pixels from the decoder's to the input's that divides the input size."""
    img_size = encoder.img_size
    decoder_size = 4 * img_size // getattr(encoder, "patch_size", 16)
    if option is None:
        return decoder_size
    if option == "input":
        return img_size
    if isinstance(option, bool) or not isinstance(option, int) or not decoder_size <= option <= img_size \
            or img_size % option:
        raise ValueError(f"data.mask_size {option!r}: use null (the decoder's {decoder_size}), \"input\" ({img_size}) "
                         f"or a size from {decoder_size} to {img_size} that divides {img_size}")
    return option


def _validation_set(cfg: Dict[str, Any], img_size: int, mask_size: int, strict: bool) -> SA1BDataset:
    """Every mask (up to 32 per image), box prompts without noise: the same figure in every epoch and run."""
    d = cfg["data"]
    refs = select_subset(find_samples(Path(d["val_root"]), None, strict), None, d["val_count"], cfg["seed"])
    return SA1BDataset(refs, img_size, max(d["max_masks"], 32), 0.0, cfg["seed"], strict, box_fraction=1.0,
                       mask_size=mask_size)


def train(cfg: Dict[str, Any], resume: bool = False, strict: bool = False) -> Dict[str, Any]:
    """Run a SAM training job described by a config from ``blvit.train.config.load_config``."""
    world, rank, device = dist_info()
    seed_everything(cfg["seed"])
    t, d = cfg["train"], cfg["data"]
    amp = uses_bf16(t, device)

    student, teacher = build_models(cfg)
    student.image_encoder.grad_checkpointing = bool(t["activation_checkpointing"])
    student.train()
    img_size = student.image_encoder.img_size
    refs = select_subset(find_samples(Path(d["root"]), d["shards"], strict), d["fraction"], d["count"], cfg["seed"])
    mask_size = target_size(d["mask_size"], student.image_encoder)
    dataset = SA1BDataset(refs, img_size, d["max_masks"], d["box_noise"], cfg["seed"], strict, d["box_fraction"],
                          mask_size=mask_size, mask_targets=d["mask_targets"])
    layers = cfg["loss"]["distill_layers"] or []
    layers = cfg["loss"]["distill_layers"] = [layers] if isinstance(layers, int) else list(layers)
    if layers and teacher is None:
        raise ValueError("loss.distill_layers needs a teacher: set task: sam_distill")
    depth = len(student.image_encoder.blocks)
    if any(not isinstance(i, int) or not 0 <= i < depth for i in layers):
        raise ValueError(f"loss.distill_layers {layers}: block indices must be integers in 0..{depth - 1} "
                         f"(the student has {depth} blocks)")
    if layers and cfg["teacher"]["cache_dir"]:
        raise ValueError("loss.distill_layers cannot be combined with teacher.cache_dir: the cache holds only the "
                         "teacher's final embeddings (each intermediate map is larger than they are); unset one")
    if teacher is not None:
        teacher.to(device)
        if cfg["teacher"]["cache_dir"]:
            build_cache(teacher, dataset, Path(cfg["teacher"]["cache_dir"]), _teacher_meta(cfg, teacher, img_size, amp),
                        device, amp, t["batch_size"], rank, world)
            dataset = TeacherEmbeddingCache(dataset, Path(cfg["teacher"]["cache_dir"]))
            teacher = None  # the embeddings now come with each batch
    validate: Optional[Callable[[], Dict[str, float]]] = None
    if d["val_root"] and not Path(d["val_root"]).is_dir():
        # e.g. configs/sam/quickstart.yaml pointed at another data.root: train anyway, and say so
        logger.warning("data.val_root %s is not a folder: training WITHOUT validation (best.pth by training loss); "
                       "set data.val_root to an SA-1B-format folder, or data.val_root=null to silence this",
                       d["val_root"])
    elif d["val_root"]:
        validate = partial(evaluate_box_miou, student, _validation_set(cfg, img_size, mask_size, strict), device, amp, rank, world)

    def losses(model: nn.Module, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        teacher_embed, teacher_layers = None, []
        if teacher is not None:
            with torch.no_grad():
                if layers:
                    teacher_embed, teacher_layers = teacher.forward_intermediates(batch["image"], layers)
                else:
                    teacher_embed = teacher(batch["image"])
        return model(batch, teacher_embed, teacher_layers)

    def payload() -> Dict[str, Any]:
        return {"format": FORMAT, "version": FORMAT_VERSION, "config": student.image_encoder.config.to_dict(),
                "model": student.state_dict()}

    task = Task(module=SamTrainingModule(student, cfg["loss"]), dataset=dataset, collate=collate_skipping,
                losses=losses, payload=payload, load=lambda saved, path: load_checked(student, saved["model"], path, "student model"),
                validate=validate, score_key="val_box_miou" if validate else None, ema_module=student,
                set_epoch=dataset.set_epoch, loss_keys=("loss", "distill", "distill_layers", "mask", "iou"))
    return run(task, cfg, world, rank, device, resume)
