"""Token Merging (ToMe, Bolya et al., ICLR 2023) for timm Vision Transformers / DeiT.

Between the attention and the MLP of every block, :func:`bipartite_soft_matching` merges ``r``
tokens: tokens are split alternately into A (even positions) and B (odd), every A token picks its
most similar B token (cosine similarity of the attention keys, averaged over heads), and the r
A tokens with the best edges are folded into their B tokens (size-weighted average). Protected
prefix tokens (the class token, register / distillation tokens) never merge. Each token carries
its size (how many patches it stands for); proportional attention adds ``log(size)`` to the
attention logits; optional source tracking records which patches each token covers.

:func:`apply_tome` patches a timm ``VisionTransformer`` in place by swapping each block's class for
a subclass whose ``forward`` adds the merge step (as ToMe's own ``tome.patch.timm`` does). timm's
attention module is reused unchanged: the log-size bias goes in through its ``attn_mask`` argument
(so its fused SDPA path is kept), and the keys are read from its ``qkv`` output through a forward
hook. Blocks with nothing to merge and no sizes yet run timm's own ``forward``, so ``r=0``
computes exactly what the unpatched model computes.

The matching core (:class:`MergePlan`, :func:`merge_wavg`, :func:`merge_source`) is shared with
the R-MeeTo merging for Vision Mamba (:mod:`blvit.tokens.rmeeto`), which needs the original token
order restored (``order="restore"``) instead of ToMe's ``[unmerged A, B]`` order.
"""
import numbers
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

__all__ = [
    "MergePlan",
    "RSchedule",
    "apply_tome",
    "bipartite_soft_matching",
    "linear_schedule",
    "merge_source",
    "merge_wavg",
    "r_schedule",
    "remove_tome",
    "set_tome_r",
]

RSchedule = Union[int, Sequence[int], Tuple[int, float]]


# ----------------------------------------------------------------------------------------------
# r schedules
# ----------------------------------------------------------------------------------------------


def r_schedule(num_layers: int, r: RSchedule) -> List[int]:
    """Tokens to merge per layer.

    - ``int``: the same r in every layer;
    - ``(r, inflect)`` with a float ``inflect`` (ToMe's convention): a linear schedule of mean r,
      ``inflect = -1`` decreasing from 2r to 0, ``0`` constant, ``+1`` increasing from 0 to 2r
      (e.g. ``(16, -0.5)``: from 24 down to 8);
    - a list / tuple of ints: r per layer (shorter lists are padded with zeros).

    Anything else (a string, a float, a negative r, an inflect outside [-1, 1], non-integer list
    entries) raises ``TypeError`` / ``ValueError`` naming the accepted forms.
    """
    forms = "an int >= 0, a per-layer list of ints >= 0, or ToMe's (r, inflect) with a float inflect in [-1, 1]"
    if _is_int(r):
        if r < 0:
            raise ValueError(f"r must be >= 0, got {r}; r is {forms}")
        return [int(r)] * num_layers
    if isinstance(r, tuple) and len(r) == 2 and isinstance(r[1], float):
        base, inflect = r
        if not _is_int(base) or base < 0 or not -1.0 <= inflect <= 1.0:
            raise ValueError(f"unknown r schedule {r!r}; r is {forms}")
        lo = int(base * (1.0 - inflect))
        hi = 2 * base - lo
        step = (hi - lo) / max(num_layers - 1, 1)
        return [max(0, int(lo + step * i)) for i in range(num_layers)]
    if isinstance(r, (str, bytes, dict)) or not isinstance(r, Iterable):
        raise TypeError(f"unknown r schedule {r!r} ({type(r).__name__}); r is {forms}")
    values = list(r)
    bad = [v for v in values if not _is_int(v)]
    if bad:
        raise ValueError(f"unknown r schedule {r!r}: per-layer entries must be ints, got {bad}; r is {forms}")
    values = [int(v) for v in values]
    if len(values) > num_layers:
        raise ValueError(f"r lists {len(values)} layers but the model has {num_layers}")
    if any(v < 0 for v in values):
        raise ValueError(f"r must be non-negative, got {values}")
    return values + [0] * (num_layers - len(values))


def _is_int(value: Any) -> bool:
    """An integer that is not a bool (numpy integer scalars count)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def linear_schedule(num_layers: int, r_start: int, r_end: int) -> List[int]:
    """r going linearly from ``r_start`` (first layer) to ``r_end`` (last), rounded down."""
    step = (r_end - r_start) / max(num_layers - 1, 1)
    return [max(0, int(r_start + step * i)) for i in range(num_layers)]



# ----------------------------------------------------------------------------------------------
# Bipartite soft matching
# ----------------------------------------------------------------------------------------------


@dataclass
class MergePlan:
    """One merge step, applicable to any tensor with the matched token axis (dim 1).

    ``unm_idx`` (B, nA - r, 1): A tokens that stay; ``src_idx`` (B, r, 1): A tokens merged away;
    ``dst_idx`` (B, r, 1): their B targets; ``perm`` (B, T - r) or None: reordering of
    ``[unmerged A, B]``; ``positions`` (B, T - r): the surviving tokens' input positions, in output
    order (for a merged B token, its own position).
    """

    unm_idx: torch.Tensor
    src_idx: torch.Tensor
    dst_idx: torch.Tensor
    perm: Optional[torch.Tensor]
    positions: torch.Tensor
    r: int
    num_tokens: int

    def merge(self, x: torch.Tensor, mode: str = "sum") -> torch.Tensor:
        """(B, T, C) -> (B, T - r, C); ``mode`` reduces the merged tokens into their targets
        ("sum", "mean", "amax", ...: ``scatter_reduce``'s, with the target itself included)."""
        src, dst = x[:, ::2], x[:, 1::2]
        n, t1, c = src.shape
        unm = src.gather(1, self.unm_idx.expand(n, t1 - self.r, c))
        src = src.gather(1, self.src_idx.expand(n, self.r, c))
        dst = dst.scatter_reduce(1, self.dst_idx.expand(n, self.r, c), src, reduce=mode)
        out = torch.cat([unm, dst], dim=1)
        if self.perm is not None:
            out = out.gather(1, self.perm[..., None].expand(n, out.shape[1], c))
        return out


def bipartite_soft_matching(metric: torch.Tensor, r: int, protected: int = 0,
                            order: str = "tome") -> Optional[MergePlan]:
    """Plan the merge of ``r`` of the ``T`` tokens of ``metric`` (B, T, C).

    Args:
        metric: per-token features compared by cosine similarity (ToMe: keys averaged over heads).
        r: tokens to remove; capped at half the unprotected tokens. ``r <= 0`` -> None.
        protected: the first ``protected`` tokens (class / distillation / register tokens) are
            never merged and nothing merges into them.
        order: ``"tome"``: ToMe's output order ``[unmerged A (in position order), B]``, with the
            protected tokens moved to the front; ``"restore"``: surviving tokens in their input
            order; ``"unordered"``: ``[unmerged A in order of decreasing best score, B]`` (ToMe's
            order without a class token; R-MeeTo's merge without ``--if_order``, the README's
            "odd-even shuffle"). With ``protected == 0``, "tome" and "unordered" are the same.
    """
    if order not in ("tome", "restore", "unordered"):
        raise ValueError(f"order must be 'tome', 'restore' or 'unordered', got {order!r}")
    t = metric.shape[1]
    r = min(int(r), (t - protected) // 2)
    if r <= 0:
        return None
    with torch.no_grad():
        m = metric.float()
        m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        a, b = m[:, ::2], m[:, 1::2]
        scores = a @ b.transpose(-1, -2)
        if protected:
            scores[:, : (protected + 1) // 2, :] = -torch.inf  # protected tokens in A stay
            scores[:, :, : protected // 2] = -torch.inf  # nothing merges into protected B tokens
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx = edge_idx[:, r:]
        src_idx = edge_idx[:, :r]
        dst_idx = node_idx[..., None].gather(1, src_idx)
        if order == "restore" or (order == "tome" and protected > 0):
            unm_idx = unm_idx.sort(dim=1).values  # ToMe sorts when there is a class token
        n, nb = metric.shape[0], b.shape[1]
        positions = torch.cat([2 * unm_idx[..., 0],
                               (2 * torch.arange(nb, device=metric.device) + 1).expand(n, nb)], dim=1)
        perm = None
        if order == "restore":
            perm = positions.argsort(dim=1)
        elif order == "tome" and protected > 1:
            perm = (positions >= protected).to(torch.int8).argsort(dim=1, stable=True)
        if perm is not None:
            positions = positions.gather(1, perm)
    return MergePlan(unm_idx, src_idx, dst_idx, perm, positions, r, t)


def merge_wavg(plan: MergePlan, x: torch.Tensor, size: Optional[torch.Tensor] = None
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average merge. ``size`` (B, T, 1) float32 (None: all ones). Returns the merged
    tokens (in ``x``'s dtype) and their sizes."""
    if size is None:
        size = torch.ones(x.shape[0], x.shape[1], 1, dtype=torch.float32, device=x.device)
    merged = plan.merge(x.float() * size, mode="sum")
    size = plan.merge(size, mode="sum")
    return (merged / size).to(x.dtype), size


def merge_source(plan: MergePlan, x: torch.Tensor, source: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Track sources: (B, T, N0) 0/1 maps of which original tokens each token covers (identity at
    the first merge)."""
    if source is None:
        n, t = x.shape[:2]
        source = torch.eye(t, device=x.device, dtype=torch.float32)[None].expand(n, t, t)
    return plan.merge(source, mode="amax")


# ----------------------------------------------------------------------------------------------
# timm patch
# ----------------------------------------------------------------------------------------------


def _autocast_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype attention logits have under the current autocast state (x's dtype without)."""
    try:
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
    except RuntimeError:  # device types without autocast (meta)
        pass
    return x.dtype


def _qkv_hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
    if getattr(module, "_tome_capture", False):
        module._tome_output = output


class ToMeBlockMixin:
    """Forward of a timm ``Block`` with ToMe between attention and MLP. ``_tome_info`` (shared by
    all blocks of a model) and ``_tome_layer`` are set by :func:`apply_tome`."""

    _tome_info: Dict[str, Any]
    _tome_layer: int

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                **kwargs: Any) -> torch.Tensor:
        info = self._tome_info
        if self._tome_layer == 0:
            info["schedule"] = r_schedule(info["depth"], info["r"])
            info["size"] = None
            info["source"] = None
            info["token_counts"] = []
        r = info["schedule"][self._tome_layer]
        size = info["size"]
        if r <= 0 and (size is None or not info["prop_attn"]):
            x = super().forward(x, attn_mask=attn_mask, is_causal=is_causal, **kwargs)  # timm's own
            info["token_counts"].append(x.shape[1])
            return x
        if (attn_mask is not None or is_causal) and (r > 0 or size is not None):
            raise ValueError("ToMe cannot merge tokens of a model called with an attention mask")
        bias = None
        if size is not None and info["prop_attn"]:
            dtype = _autocast_dtype(x)
            bias = size.log()[:, None, None, :, 0].to(dtype)  # (B, 1, 1, T): proportional attention
        attn = self.attn
        qkv = attn.qkv
        qkv._tome_capture = r > 0
        try:
            x_attn = attn(self.norm1(x), attn_mask=bias)
        finally:
            qkv._tome_capture = False
            out = qkv.__dict__.pop("_tome_output", None)
        x = x + self.drop_path1(self.ls1(x_attn))
        if r > 0:
            n, t = x.shape[:2]
            k = out.reshape(n, t, 3, attn.num_heads, -1)[:, :, 1].transpose(1, 2)  # (B, H, T, hd)
            metric = attn.k_norm(k).mean(1)  # keys averaged over heads, (B, T, hd)
            plan = bipartite_soft_matching(metric, r, protected=info["protected"], order="tome")
            if plan is not None:
                if info["trace_source"]:
                    info["source"] = merge_source(plan, x, info["source"])
                x, info["size"] = merge_wavg(plan, x, info["size"])
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        info["token_counts"].append(x.shape[1])
        return x


_CLASS_CACHE: Dict[type, type] = {}


def _tome_class(cls: type) -> type:
    if cls not in _CLASS_CACHE:
        _CLASS_CACHE[cls] = type(f"ToMe{cls.__name__}", (ToMeBlockMixin, cls), {"_tome_base": cls})
    return _CLASS_CACHE[cls]


def apply_tome(model: nn.Module, r: RSchedule = 0, trace_source: bool = False, prop_attn: bool = True) -> nn.Module:
    """Patch a timm ``VisionTransformer`` (DeiT, ViT, ... with timm ``Block`` / ``Attention``) in
    place for ToMe and return it. ``r``: see :func:`r_schedule` (a form it does not know raises at
    once); as in ToMe, a layer's r is capped at half of its unprotected tokens. After each forward,
    ``model._tome_info`` holds ``"size"`` (B, T, 1), ``"source"`` (B, T, N0) when
    ``trace_source``, and ``"token_counts"`` (tokens after each block). Change r later with
    :func:`set_tome_r`; undo with :func:`remove_tome`.
    """
    from timm.models.vision_transformer import Block

    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise TypeError(f"{type(model).__name__} has no .blocks: apply_tome patches timm VisionTransformer models")
    blocks = list(blocks)
    for i, block in enumerate(blocks):
        attn = getattr(block, "attn", None)
        if not isinstance(block, Block) or attn is None or not hasattr(attn, "qkv") or not hasattr(attn, "num_heads"):
            raise TypeError(f"block {i} ({type(block).__name__}) is not a timm ViT Block with a fused qkv attention")
    if hasattr(model, "_tome_info"):
        remove_tome(model)
    info = {
        "r": r, "depth": len(blocks), "schedule": r_schedule(len(blocks), r), "size": None, "source": None,
        "trace_source": trace_source, "prop_attn": prop_attn, "token_counts": [],
        "protected": int(getattr(model, "num_prefix_tokens", 1 if getattr(model, "cls_token", None) is not None else 0)),
        "hooks": [],
    }
    for i, block in enumerate(blocks):
        block.__class__ = _tome_class(type(block))
        block._tome_info = info
        block._tome_layer = i
        info["hooks"].append(block.attn.qkv.register_forward_hook(_qkv_hook))
    model._tome_info = info
    return model


def set_tome_r(model: nn.Module, r: RSchedule) -> None:
    """Change r of a ToMe-patched model (takes effect at the next forward)."""
    model._tome_info["r"] = r
    model._tome_info["schedule"] = r_schedule(model._tome_info["depth"], r)


def remove_tome(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_tome`: the blocks get their classes back, the hooks are removed."""
    info = getattr(model, "_tome_info", None)
    if info is None:
        return model
    for handle in info["hooks"]:
        handle.remove()
    for block in model.blocks:
        base = getattr(type(block), "_tome_base", None)
        if base is not None:
            block.__class__ = base
        for name in ("_tome_info", "_tome_layer"):
            block.__dict__.pop(name, None)
    del model._tome_info
    return model
