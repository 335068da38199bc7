"""R-MeeTo token merging for Vision Mamba (Shi et al., "Faster Vision Mamba is Rebuilt in Minutes
via Merged Token Re-training"), as the released code (NUS-HPC-AI-Lab/R-MeeTo) does it, for Vim
(``image_task``) and VideoMamba (``video_task``).

VideoMamba (``video_task/models/videomamba.py``, ``R_MeeTo_merge.py``) merges the same way: at
blocks 2, 4, ... (``layer_idx > 0 and layer_idx % 2 == 0``) on the incoming hidden states, cosine,
ordered ("restore"), class token (first) protected, size-weighted on hidden and residual, with
``--num_prune`` 40 (Ti) / 88 (S, M) and no ``compare`` override: VideoMamba-S at 8 x 224 goes
1569 -> 1481 -> ... -> 601 tokens (11 merges of 88). The frames' patches form one sequence, so
tokens merge across frames as well as within them.

At the input of chosen blocks (default: every second block, 0-based indices 2, 4, ..., 22 of 24:
11 merges) ``r`` tokens are merged (default 5 for Vim-Ti, 11 for Vim-S/B):

- metric: the block's incoming hidden states (``metric="residual"``: the residual stream),
  cosine similarity, the alternate A/B split and bipartite matching of ToMe;
- the class token is cut out before matching and re-inserted afterwards at the proportional
  position ``int(pos * (t - r) / t)`` (t tokens before the merge), so the middle class token stays
  near the middle;
- the same merge (same pairs, same size weights) is applied to the hidden states and to the
  float32 residual stream.

Two token schedules (``compare``):

- the released code's (``compare=11``, the default of its ``--compare`` flag, which no released
  script changes): the last merge block merges down to ``N - 11 * compare`` tokens (N = tokens
  before any merge, 11 = the number of merges in the released layout; r there capped at half the
  patch tokens, as the released code caps it). For Vim-Ti (r=5) that is 197 -> ... -> 147 -> 76 at
  block 22, which is what the released Vim-Ti checkpoints were trained and evaluated with; for
  Vim-S/B (r=11) it changes nothing (76 either way). Our default. Not applied when r is 0 at
  every merge block: the released formula (``image_task/R_MeeTo/RMeeTo_vim.py``,
  ``RMeeToBlock.forward``: ``num_prune = L - (197 - 11 * self.compare)``) would still merge 98
  tokens at block 22 then, but r=0 here is the unmerged model (the baseline of an r sweep).
- the paper's text (``compare=None``): r at every merge block, 197 -> 142 for Vim-Ti (what the
  released FLOP counter reports, since it ignores ``compare``).

Three orders (``order``):

- ``"restore"`` (R-MeeTo, ``--if_order``): the surviving tokens keep their spatial order (a merged
  token sits at its B token's place), since the bidirectional scan depends on it;
- ``"unordered"`` (no ``--if_order``, the paper's "no order" ablation): ToMe's ``[unmerged A by
  decreasing score, B]``; the class token goes to ``int(pos * (t1 - r) / t1)``, t1 = A tokens;
- ``"shuffled"`` (``--if_shuffle --shuffle_rate``, the shuffle ablation): at every merge block a
  fresh random ``shuffle_rate`` fraction of the patch tokens is permuted among itself (hidden
  states, residual and sizes alike, one permutation for the batch, never undone, the class token
  left in place), then merged in restored order. Draws from torch's global generator, in training
  and evaluation, as the released code does. The released shuffle model has no ``compare``
  override, so its default schedule is the paper's.

Token sizes are tracked across merges (size-weighted averages). ``trace_source=True`` records
which patches each token covers (``model.token_merge.source``, (B, tokens - 1, patches), class
token excluded) for :func:`blvit.tokens.viz.save_merge_map`.
"""
from collections.abc import Iterable
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .tome import _is_int, bipartite_soft_matching, merge_source, merge_wavg

__all__ = ["DEFAULT_LAYERS", "ORDERS", "RELEASED_COMPARE", "RMeeToMerge", "apply_rmeeto", "default_r", "remove_rmeeto"]

DEFAULT_LAYERS: Tuple[int, ...] = tuple(range(2, 23, 2))  # 0-based: blocks 2, 4, ..., 22 (11 merges)
_DEFAULT_R = {192: 5, 384: 11, 768: 11}
ORDERS = ("restore", "unordered", "shuffled")
RELEASED_COMPARE = 11  # the released main.py's --compare default
_RELEASED_MERGES = 11  # the "11" of the released compare formula: L - (197 - 11 * compare)


# The released video_task scripts (exp_sh/tab13): --num_prune 40 (VideoMamba-Ti), 88 (-S, -M)
_DEFAULT_VIDEO_R = {192: 40, 384: 88, 576: 88}


def is_video_model(model: nn.Module) -> bool:
    """A VideoMamba (frames x patches, class token first), not an image Vim."""
    return hasattr(model, "temporal_pos_embedding")


def default_r(model: nn.Module) -> int:
    """The released r: 5 for Vim-Ti (embed 192), 11 for Vim-S / Vim-B (and other widths); for
    VideoMamba 40 (Ti), 88 (S, M), per the video_task scripts."""
    width = int(getattr(model, "embed_dim", 0))
    if is_video_model(model):
        return _DEFAULT_VIDEO_R.get(width, 88)
    return _DEFAULT_R.get(width, 11)


def patch_tokens(model: nn.Module) -> Optional[int]:
    """Tokens other than the class token entering the first block: patches x frames for video."""
    patch_embed = getattr(model, "patch_embed", None)
    num_patches = getattr(patch_embed, "num_patches", None)
    if num_patches is None:
        return None
    frames = getattr(patch_embed, "num_frames", 1) // getattr(patch_embed, "tubelet_size", 1)
    return int(num_patches) * frames


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
                 metric: str = "hidden", trace_source: bool = False, compare: Optional[int] = None,
                 shuffle_rate: float = 0.0) -> None:
        if order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(map(repr, ORDERS))}, got {order!r}")
        if metric not in ("hidden", "residual"):
            raise ValueError(f"metric must be 'hidden' or 'residual', got {metric!r}")
        if compare is not None and (not _is_int(compare) or compare < 0):
            raise ValueError(f"compare must be None (the paper's schedule) or an int >= 0, got {compare!r}")
        if not 0.0 <= float(shuffle_rate) <= 1.0:
            raise ValueError(f"shuffle_rate must be in [0, 1], got {shuffle_rate}")
        if shuffle_rate and order != "shuffled":
            raise ValueError(f"shuffle_rate={shuffle_rate} needs order='shuffled' (got {order!r})")
        self.layers = [int(i) for i in layers]
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"merge layers must be distinct, got {self.layers}")
        self.r_per_layer: Dict[int, int] = dict(zip(self.layers, _per_layer_r(r, len(self.layers))))
        self.r = r
        self.order = order
        self.metric = metric
        self.trace_source = trace_source
        # r = 0 everywhere is the unmerged baseline of an r sweep: no compare override either, or the
        # released formula alone would still merge at the last merge block (Vim: 197 -> 99 at block 22)
        no_merge = not any(self.r_per_layer.values())
        self.compare = None if compare is None or no_merge else int(compare)
        self.shuffle_rate = float(shuffle_rate)
        self.reset()

    def reset(self) -> None:
        self.size: Optional[torch.Tensor] = None
        self.source: Optional[torch.Tensor] = None
        self.token_counts: List[int] = []
        self.cls_positions: List[int] = []
        self.input_tokens: Optional[int] = None

    def final_tokens(self, input_tokens: int) -> Optional[int]:
        """Tokens after the last merge block under ``compare`` (None: the paper's schedule)."""
        if self.compare is None or not self.layers:
            return None
        return input_tokens - _RELEASED_MERGES * self.compare

    def __call__(self, layer: int, hidden: torch.Tensor, residual: Optional[torch.Tensor], pos: int):
        if layer == 0:
            self.reset()
        if self.input_tokens is None:
            self.input_tokens = hidden.shape[1]
        r = self.r_per_layer.get(layer, 0)
        t = hidden.shape[1]
        if layer in self.r_per_layer and layer == max(self.layers) and self.compare is not None:
            # the released override at the last merge block: merge down to N - 11 * compare tokens,
            # r capped at half the patch tokens as its merge caps it (never below 0)
            r = max(0, min(t - self.final_tokens(self.input_tokens), (t - 1) // 2))
        elif r > (t - 1) // 2:  # r is 0 off the merge layers
            raise ValueError(f"R-MeeTo r={r} at block {layer} is larger than allowed: {t - 1} patch tokens enter that "
                             f"block, so at most {(t - 1) // 2} can merge there")
        if layer in self.r_per_layer and (r > 0 or self.order == "shuffled"):
            hidden, residual, pos = self._merge(hidden, residual, pos, r)
        self.token_counts.append(hidden.shape[1])
        self.cls_positions.append(pos)
        return hidden, residual, pos

    def _shuffle(self, patches: torch.Tensor, residual: Optional[torch.Tensor]):
        """The released ablation's partial shuffle of the patch tokens (class token cut out)."""
        n = patches.shape[1]
        chosen = torch.randperm(n)[: int(n * self.shuffle_rate)]
        moved = chosen[torch.randperm(chosen.shape[0])]
        chosen, moved = chosen.to(patches.device), moved.to(patches.device)

        def apply(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            if x is None:
                return None
            x = x.clone()
            x[:, chosen] = x[:, moved]
            return x

        self.size, self.source = apply(self.size), apply(self.source)
        return apply(patches), apply(residual)

    def _merge(self, hidden: torch.Tensor, residual: Optional[torch.Tensor], pos: int,
               r: int) -> Tuple[torch.Tensor, Optional[torch.Tensor], int]:
        """Merge ``r`` of the patch tokens of ``hidden`` / ``residual`` (B, t, C), class token at ``pos``
        cut out and re-inserted; returns them (B, t - r, C) and the class token's new index."""
        t = hidden.shape[1]
        patches, cls = _cut(hidden, pos)
        res_patches, res_cls = _cut(residual, pos) if residual is not None else (None, None)
        if self.trace_source and self.source is None:
            # identity (B, patches, patches) before the first shuffle, so that the shuffle is recorded
            # too (merge_source would start it only after, attributing shuffled tokens to wrong patches)
            n, p = patches.shape[:2]
            self.source = torch.eye(p, device=patches.device, dtype=torch.float32)[None].expand(n, p, p).contiguous()
        if self.order == "shuffled" and self.shuffle_rate > 0:
            patches, res_patches = self._shuffle(patches, res_patches)
        metric = res_patches if (self.metric == "residual" and res_patches is not None) else patches
        plan = bipartite_soft_matching(metric, r, protected=0, order="unordered" if self.order == "unordered" else "restore")
        if plan is None:  # nothing merges (r = 0): the shuffle, if any, still stands
            hidden = _insert(patches, cls, pos)
            residual = _insert(res_patches, res_cls, pos) if residual is not None else None
            return hidden, residual, pos
        if self.order == "unordered":
            t1 = t // 2  # A tokens (every second one) of the t - 1 patch tokens
            new_pos = pos * (t1 - plan.r) // t1
        else:
            new_pos = pos * (t - plan.r) // t  # = int(pos * (t - r) / t)
        if self.trace_source:
            self.source = merge_source(plan, patches, self.source)
        merged, size = merge_wavg(plan, patches, self.size)
        hidden = _insert(merged, cls, new_pos)
        if residual is not None:
            res_merged, _ = merge_wavg(plan, res_patches, self.size)
            residual = _insert(res_merged, res_cls, new_pos)
        self.size = size
        return hidden, residual, new_pos


_RELEASED = "released"


def apply_rmeeto(model: nn.Module, r: Optional[Union[int, Sequence[int]]] = None,
                 layers: Optional[Sequence[int]] = None, order: str = "restore", metric: str = "hidden",
                 trace_source: bool = False, compare: Union[int, None, str] = _RELEASED,
                 shuffle_rate: float = 0.0) -> nn.Module:
    """Install R-MeeTo merging on a :class:`blvit.mamba.VisionMamba` (in place; returns it).

    Args:
        r: tokens merged per merge layer (int, or one value per entry of ``layers``); default
            :func:`default_r` (5 for Vim-Ti, 11 for Vim-S/B). ``r=0`` (at every merge layer) leaves
            the model's function unchanged (with ``order="shuffled"`` and ``shuffle_rate > 0`` the
            shuffle still runs): no ``compare`` override is applied then, whatever ``compare`` says,
            although the released formula alone would merge at the last merge block. At most half
            of the patch tokens entering a block can merge there; a larger r raises ``ValueError``
            (here, from the model's patch count, and at run time) instead of being silently capped,
            as does any other form of r (ToMe's ``(r, inflect)``, floats).
        layers: 0-based indices of the blocks at whose input tokens are merged; default every
            second block from 2 (2, 4, ..., 22 for depth 24).
        order: "restore" (R-MeeTo), "unordered" (the no-order ablation) or "shuffled" (the shuffle
            ablation, with ``shuffle_rate``); see the module's docstring.
        metric: "hidden" (the block's incoming hidden states) or "residual"; anything else raises.
        trace_source: record patch sources for visualisation.
        compare: the released ``--compare``: the last merge block merges down to
            ``N - 11 * compare`` tokens; None: the paper's schedule (r at every merge block).
            Default "released": 11 (the released scripts' value) for "restore" / "unordered" on
            the released layout (24 blocks, merges at 2, 4, ..., 22); None for "shuffled" (the
            released shuffle model has no such override) and for other layouts (the released
            formula hard-codes that layout's 197 tokens and 11 merges). Ignored (None) when r is 0
            at every merge layer, so that r=0 is the unmerged model.
        shuffle_rate: fraction of the patch tokens permuted at each merge block ("shuffled" only).
    """
    if not hasattr(model, "token_merge") or not hasattr(model, "layers"):
        raise TypeError(f"{type(model).__name__} is not a blvit VisionMamba (no token_merge hook)")
    if layers is None:
        layers = tuple(range(2, len(model.layers) - 1, 2))
    if compare == _RELEASED:
        # the released override hard-codes Vim's 11 merges (blocks 2, ..., 22 of 24): elsewhere it is
        # undefined, and the released video code has none
        released_layout = (len(model.layers) == 24 and tuple(int(i) for i in layers) == DEFAULT_LAYERS
                           and not is_video_model(model))
        compare = RELEASED_COMPARE if released_layout and order != "shuffled" else None
    elif isinstance(compare, str):
        raise ValueError(f"compare must be an int >= 0, None or 'released', got {compare!r}")
    bad = [i for i in layers if not 0 <= int(i) < len(model.layers)]
    if bad:
        raise ValueError(f"merge layers {bad} out of range for a depth-{len(model.layers)} model")
    merge = RMeeToMerge(default_r(model) if r is None else r, layers, order, metric, trace_source, compare, shuffle_rate)
    num_patches = patch_tokens(model)
    if num_patches is not None:
        _check_budget(merge.r_per_layer, num_patches)
    model.token_merge = merge
    return model


def remove_rmeeto(model: nn.Module) -> nn.Module:
    """Uninstall the merging (the model computes the plain Vim again)."""
    model.token_merge = None
    return model
