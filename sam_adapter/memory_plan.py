"""Per-GPU memory of a SAM training run, planned without allocating it (``tools/train.py --plan``).

The student (and the teacher) are built on the meta device from the config. Parameters,
gradients and AdamW's two moments follow from the parameter counts; the activations kept for
backward are measured by running one sample's training forward (encoder, then SAM's interactive
decoder rounds with the config's prompts per image) on the meta device under
``torch.autograd.graph.saved_tensors_hooks``, which sees every tensor autograd saves. With
activation checkpointing a block keeps only its input, and one block's own activations exist at
a time (during its recomputation).

What the plan leaves out (hence the margins in docs/training.md): the allocator's fragmentation
and cache, the CUDA context (about 0.5-1 GiB, counted as ``CONTEXT_GIB``), communication buffers
(NCCL, DDP's gradient buckets are counted), temporaries that are not saved for backward (peaks
inside one op), and the data loader's pinned memory.
"""
import math
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple
from unittest import mock

import torch
import torch.nn as nn

from .build import build_sam_blvit, build_sam_from_config

CONTEXT_GIB = 1.0  # CUDA context + cuDNN/cuBLAS workspaces, per GPU
USABLE = 0.92  # of the card's memory (the allocator's fragmentation and cache)
GIB = 1024**3
STRATEGIES = ("ddp", "oss", "fsdp")


def _models_on_meta(cfg: Dict[str, Any]) -> Tuple[nn.Module, Optional[nn.Module]]:
    """Student Sam and teacher encoder as the trainer builds them (no files read)."""
    from .trainer import dense_teacher_config, set_trainable_parts, student_options

    keep, overrides = student_options(cfg)
    with torch.device("meta"):
        student = build_sam_blvit(cfg["model"]["variant"], keep_ratio=keep, **overrides)
        teacher = None
        if cfg["task"] == "sam_distill" and not cfg["teacher"]["cache_dir"]:
            teacher = build_sam_from_config(dense_teacher_config(student.image_encoder.config)).image_encoder
            teacher.requires_grad_(False)
    set_trainable_parts(student, cfg)
    return student, teacher


@contextmanager
def _counting_saved_tensors(totals: Dict[str, int]) -> Iterator[None]:
    seen = set()
    alive = []  # meta tensors (no memory): held so that no counted storage's address is reused

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        key = storage._cdata  # one count per storage: views and re-saves of a tensor share it
        if key not in seen and not isinstance(t, nn.Parameter):  # parameters are counted once, elsewhere
            seen.add(key)
            alive.append(t)
            totals["saved"] += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


def _shape_only_clicks(logits, target, input_hw, generator=None, stride=4):
    """sample_error_clicks' shapes on the meta device (where nothing can be sampled)."""
    m = target.shape[0]
    return logits.new_zeros(m, 1, 2), torch.ones(m, 1, dtype=torch.int, device=logits.device)


def activation_bytes(student: nn.Module, cfg: Dict[str, Any], amp: bool) -> Dict[str, Any]:
    """Bytes autograd keeps for one training image (encoder + the decoder rounds of its masks),
    and per encoder block (for the activation-checkpointing estimate)."""
    from blvit.train import sam_prompts
    from blvit.train.losses import MASK_LOSS_OPTIONS
    from sam_adapter.trainer import target_size

    encoder = student.image_encoder
    s = encoder.img_size
    masks = int(cfg["data"]["max_masks"])
    loss = cfg["loss"]
    grid = s // getattr(encoder, "patch_size", 16)
    totals = {"saved": 0}
    per_block: List[int] = []
    hooks = []
    for block in encoder.blocks:
        hooks.append(block.register_forward_pre_hook(lambda mod, args: per_block.append(-totals["saved"])))
        hooks.append(block.register_forward_hook(lambda mod, args, out: per_block.__setitem__(-1, per_block[-1] + totals["saved"])))
    image = torch.empty(1, 3, s, s, device="meta")
    torch.manual_seed(0)  # which rounds are mask-only is drawn at random; the same plan every time
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if amp else torch.autocast("cpu", enabled=False)
    try:
        from torch.fx.experimental import _config as fx_config

        # the prompt encoder's boolean indexing (labels == -1) has no shape on meta: assume all true
        # (a few prompt-sized tensors)
        with _counting_saved_tensors(totals), autocast, \
                mock.patch.object(sam_prompts, "sample_error_clicks", _shape_only_clicks), \
                mock.patch.object(fx_config, "meta_nonzero_assume_all_nonzero", True):
            embeddings = encoder(image)
            encoder_bytes = totals["saved"]
            if loss["mask_weight"] > 0:
                size = target_size(cfg["data"]["mask_size"], encoder)
                targets = torch.empty(masks, size, size, device="meta")
                boxes = torch.empty(masks, 4, device="meta")
                weights = {k: loss[k] for k in MASK_LOSS_OPTIONS}
                sam_prompts.interactive_losses(student, embeddings, student.prompt_encoder.get_dense_pe(), targets,
                                               torch.tensor([s, s], device="meta"), boxes, None,
                                               int(loss["click_rounds"]), int(loss["refine_rounds"]), weights)
    finally:
        for h in hooks:
            h.remove()
    width = encoder.blocks[0].norm1.normalized_shape[0]
    block_input = grid * grid * width * (2 if amp else 4)
    return {"total": totals["saved"], "encoder": encoder_bytes, "decoder": totals["saved"] - encoder_bytes,
            "per_block_max": max(per_block) if per_block else 0, "block_input": block_input, "blocks": len(per_block)}


def _numel(params) -> int:
    return sum(p.numel() for p in params)


def plan_memory(cfg: Dict[str, Any], world: int = 8, gpu_gib: Sequence[float] = (40, 80),
                amp: Optional[bool] = None) -> Dict[str, Any]:
    """The plan for ``world`` GPUs (rows: strategy x activation checkpointing). ``amp``: bf16
    autocast (default: the config's train.amp, "auto" meaning a GPU run, so True)."""
    t = cfg["train"]
    amp = (t["amp"] in ("auto", "bf16")) if amp is None else amp
    student, teacher = _models_on_meta(cfg)
    trainable = _numel(p for p in student.parameters() if p.requires_grad)
    frozen = _numel(p for p in student.parameters() if not p.requires_grad)
    teacher_params = _numel(teacher.parameters()) if teacher is not None else 0
    act = activation_bytes(student, cfg, amp)
    per_sample = {False: act["total"],
                  True: act["decoder"] + act["blocks"] * act["block_input"] + act["per_block_max"]}
    # the teacher runs under no_grad: its largest block's working set, plus the embedding it returns
    batch = int(t["batch_size"])
    largest_block = max(_numel(b.parameters()) for b in student.image_encoder.blocks)
    rows = []
    for strategy in STRATEGIES:
        params, grads, adam = 4 * (trainable + frozen), 4 * trainable, 8 * trainable
        extra = 0
        if strategy == "ddp":
            extra = 4 * trainable if world > 1 else 0  # DDP's gradient buckets (copies of the gradients)
        elif strategy == "oss":
            adam = adam / world
        else:  # fsdp: everything sharded; two blocks gathered at once (prefetch), in the compute dtype
            params, grads, adam = params / world, grads / world, adam / world
            extra = 2 * largest_block * (2 if amp else 4)
        fixed = params + grads + adam + extra + 4 * teacher_params
        for checkpointing in (False, True):
            sample = per_sample[checkpointing]
            total = fixed + batch * sample + CONTEXT_GIB * GIB
            fits = {f"{g:g}": max(0, math.floor((USABLE * g * GIB - fixed - CONTEXT_GIB * GIB) / sample)) for g in gpu_gib}
            rows.append({"strategy": strategy, "activation_checkpointing": checkpointing,
                         "params_gib": params / GIB, "grads_gib": grads / GIB, "optimizer_gib": adam / GIB,
                         "buffers_gib": extra / GIB, "teacher_gib": 4 * teacher_params / GIB,
                         "activations_per_sample_gib": sample / GIB, "total_gib": total / GIB,
                         "max_batch_per_gpu": fits})
    return {"variant": cfg["model"]["variant"], "img_size": student.image_encoder.img_size, "world": world,
            "batch_per_gpu": batch, "amp_bf16": amp, "trainable_params": trainable, "frozen_params": frozen,
            "teacher_params": teacher_params, "activations": act, "rows": rows,
            "assumes": f"{CONTEXT_GIB:g} GiB CUDA context per GPU; {USABLE:.0%} of the card usable"}


def markdown(plan: Dict[str, Any]) -> str:
    sizes = list(plan["rows"][0]["max_batch_per_gpu"])
    head = (["strategy", "act. ckpt", "params", "grads", "AdamW", "buffers", "teacher", "act./sample",
             f"total at batch {plan['batch_per_gpu']}"] + [f"max batch, {g} GB" for g in sizes])
    lines = [f"{plan['variant']} at {plan['img_size']} px, {plan['world']} GPUs, "
             f"{'bf16 autocast' if plan['amp_bf16'] else 'fp32'} (GiB per GPU; {plan['assumes']})",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in plan["rows"]:
        cells = [r["strategy"], "yes" if r["activation_checkpointing"] else "no"]
        cells += [f"{r[k]:.2f}" for k in ("params_gib", "grads_gib", "optimizer_gib", "buffers_gib", "teacher_gib",
                                          "activations_per_sample_gib", "total_gib")]
        cells += [str(r["max_batch_per_gpu"][g]) for g in sizes]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
