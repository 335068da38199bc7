"""R-MeeTo token merging for Vision Mamba (Shi et al., "Faster Vision Mamba is Rebuilt in Minutes
via Merged Token Re-training").

At the input of chosen blocks (default: every second block, 0-based indices 2, 4, ..., 22 of 24:
11 merges) ``r`` tokens are merged (default 5 for Vim-Ti: 197 -> 142 tokens; 11 for Vim-S/B:
197 -> 76):

- metric: the block's incoming hidden states (``metric="residual"``: the residual stream),
  cosine similarity, the alternate A/B split and bipartite matching of ToMe;
- the class token is cut out before matching and re-inserted afterwards at the proportional
  position ``int(pos * (t - r) / t)`` (t tokens before the merge), so the middle class token stays
  in the middle;
- the same merge (same pairs, same size weights) is applied to the hidden states and to the
  float32 residual stream;
- ``order="restore"`` (R-MeeTo): the surviving tokens keep their spatial order (a merged token
  sits at its B token's place), since the bidirectional scan depends on it;
  ``order="shuffled"``: ToMe's ``[unmerged A, B]`` order (the paper's odd-even shuffle ablation).

Token sizes are tracked across merges (size-weighted averages). ``trace_source=True`` records
which patches each token covers (``model.token_merge.source``, (B, tokens - 1, patches), class
token excluded) for :func:`blvit.tokens.viz.save_merge_map`.
"""
from collections.abc import Iterable
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .tome import _is_int, bipartite_soft_matching, merge_source, merge_wavg

__all__ = ["DEFAULT_LAYERS", "RMeeToMerge", "apply_rmeeto", "default_r", "remove_rmeeto"]

DEFAULT_LAYERS: Tuple[int, ...] = tuple(range(2, 23, 2))  # 0-based: blocks 2, 4, ..., 22 (11 merges)
_DEFAULT_R = {192: 5, 384: 11, 768: 11}


def default_r(model: nn.Module) -> int:
    """The paper's r: 5 for Vim-Ti (embed 192), 11 for Vim-S / Vim-B (and other widths)."""
    return _DEFAULT_R.get(int(getattr(model, "embed_dim", 0)), 11)


_R_FORMS = "an int >= 0 (the same r at every merge layer) or one int >= 0 per merge layer"


def _per_layer_r(r: Union[int, Sequence[int]], num_layers: int) -> List[int]:
    """R-MeeTo's r as one value per merge layer; any other form (ToMe's (r, inflect) schedule, a
    float, a string, negative values) is refused with a message naming the accepted forms."""
    if _is_int(r):
        if r < 0:
            raise ValueError(f"R-MeeTo r must be >= 0, got {r}; r is {_R_FORMS}")
        return [int(r)] * num_layers
    if isinstance(r, tuple) and len(r) == 2 and isinstance(r[1], float):
        raise ValueError(f"unknown R-MeeTo r schedule {r!r}: ToMe's (r, inflect) form is not used by R-MeeTo; "
                         f"r is {_R_FORMS}")
    if isinstance(r, (str, bytes, dict)) or not isinstance(r, Iterable):
        raise TypeError(f"unknown R-MeeTo r schedule {r!r} ({type(r).__name__}); r is {_R_FORMS}")
    values = list(r)
    if not all(_is_int(v) and v >= 0 for v in values):
        raise ValueError(f"unknown R-MeeTo r schedule {r!r}; r is {_R_FORMS}")
    if len(values) != num_layers:
        raise ValueError(f"{len(values)} r values for {num_layers} merge layers")
    return [int(v) for v in values]


def _check_budget(r_per_layer: Dict[int, int], num_patches: int) -> None:
    """Refuse an r larger than allowed: at most half of the patch tokens entering a block merge there."""
    tokens = num_patches
    for layer in sorted(r_per_layer):
        r = r_per_layer[layer]
        if r > tokens // 2:
            raise ValueError(f"R-MeeTo r={r} at block {layer} is larger than allowed: {tokens} patch tokens enter "
                             f"that block ({num_patches} before any merge), so at most {tokens // 2} can merge there")
        tokens -= r


def _cut(x: torch.Tensor, pos: int) -> Tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([x[:, :pos], x[:, pos + 1:]], dim=1), x[:, pos:pos + 1]


def _insert(x: torch.Tensor, token: torch.Tensor, pos: int) -> torch.Tensor:
    return torch.cat([x[:, :pos], token.to(x.dtype), x[:, pos:]], dim=1)


class RMeeToMerge:
    """The per-block merge callback installed as ``VisionMamba.token_merge``.

    Called as ``(layer_index, hidden, residual, cls_index) -> (hidden, residual, cls_index)``
    before every block; state (sizes, sources, counts) is reset at block 0 of each forward.
    After a forward: ``size`` (B, tokens - 1, 1) patch-token sizes, ``source``,
    ``token_counts`` (tokens entering each block), ``cls_positions`` (class index per block).
    """

    def __init__(self, r: Union[int, Sequence[int]], layers: Sequence[int] = DEFAULT_LAYERS, order: str = "restore",
                 metric: str = "hidden", trace_source: bool = False) -> None:
        if order not in ("restore", "shuffled"):
            raise ValueError(f"order must be 'restore' or 'shuffled', got {order!r}")
        if metric not in ("hidden", "residual"):
            raise ValueError(f"metric must be 'hidden' or 'residual', got {metric!r}")
        self.layers = [int(i) for i in layers]
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"merge layers must be distinct, got {self.layers}")
        self.r_per_layer: Dict[int, int] = dict(zip(self.layers, _per_layer_r(r, len(self.layers))))
        self.r = r
        self.order = order
        self.metric = metric
        self.trace_source = trace_source
        self.reset()

    def reset(self) -> None:
        self.size: Optional[torch.Tensor] = None
        self.source: Optional[torch.Tensor] = None
        self.token_counts: List[int] = []
        self.cls_positions: List[int] = []

    def __call__(self, layer: int, hidden: torch.Tensor, residual: Optional[torch.Tensor], pos: int):
        if layer == 0:
            self.reset()
        r = self.r_per_layer.get(layer, 0)
        if r > 0:
            hidden, residual, pos = self._merge(hidden, residual, pos, r, layer)
        self.token_counts.append(hidden.shape[1])
        self.cls_positions.append(pos)
        return hidden, residual, pos

    def _merge(self, hidden, residual, pos, r, layer):
        t = hidden.shape[1]
        if r > (t - 1) // 2:
            raise ValueError(f"R-MeeTo r={r} at block {layer} is larger than allowed: {t - 1} patch tokens enter that "
                             f"block, so at most {(t - 1) // 2} can merge there")
        source_tensor = residual if (self.metric == "residual" and residual is not None) else hidden
        metric, _ = _cut(source_tensor, pos)
        plan = bipartite_soft_matching(metric, r, protected=0, order=self.order)
        if plan is None:
            return hidden, residual, pos
        new_pos = pos * (t - plan.r) // t  # = int(pos * (t - r) / t)
        patches, cls = _cut(hidden, pos)
        if self.trace_source:
            self.source = merge_source(plan, patches, self.source)
        merged, size = merge_wavg(plan, patches, self.size)
        hidden = _insert(merged, cls, new_pos)
        if residual is not None:
            res_patches, res_cls = _cut(residual, pos)
            res_merged, _ = merge_wavg(plan, res_patches, self.size)
            residual = _insert(res_merged, res_cls, new_pos)
        self.size = size
        return hidden, residual, new_pos


def apply_rmeeto(model: nn.Module, r: Optional[Union[int, Sequence[int]]] = None,
                 layers: Optional[Sequence[int]] = None, order: str = "restore", metric: str = "hidden",
                 trace_source: bool = False) -> nn.Module:
    """Install R-MeeTo merging on a :class:`blvit.mamba.VisionMamba` (in place; returns it).

    Args:
        r: tokens merged per merge layer (int, or one value per entry of ``layers``); default
            :func:`default_r` (5 for Vim-Ti, 11 for Vim-S/B). ``r=0`` leaves the model's function
            unchanged. At most half of the patch tokens entering a block can merge there; a larger
            r raises ``ValueError`` (here, from the model's patch count, and at run time) instead
            of being silently capped, as does any other form of r (ToMe's ``(r, inflect)``, floats).
        layers: 0-based indices of the blocks at whose input tokens are merged; default every
            second block from 2 (2, 4, ..., 22 for depth 24).
        order: "restore" (R-MeeTo) or "shuffled" (ToMe's order; the ablation).
        metric: "hidden" (the block's incoming hidden states) or "residual"; anything else raises.
        trace_source: record patch sources for visualisation.
    """
    if not hasattr(model, "token_merge") or not hasattr(model, "layers"):
        raise TypeError(f"{type(model).__name__} is not a blvit VisionMamba (no token_merge hook)")
    if layers is None:
        layers = tuple(range(2, len(model.layers) - 1, 2))
    bad = [i for i in layers if not 0 <= int(i) < len(model.layers)]
    if bad:
        raise ValueError(f"merge layers {bad} out of range for a depth-{len(model.layers)} model")
    merge = RMeeToMerge(default_r(model) if r is None else r, layers, order, metric, trace_source)
    num_patches = getattr(getattr(model, "patch_embed", None), "num_patches", None)
    if num_patches is not None:
        _check_budget(merge.r_per_layer, int(num_patches))
    model.token_merge = merge
    return model


def remove_rmeeto(model: nn.Module) -> nn.Module:
    """Uninstall the merging (the model computes the plain Vim again)."""
    model.token_merge = None
    return model
