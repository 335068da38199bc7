"""Token routing: the predictor that scores tokens and the fixed top-k selection.

The selection is made once at a predictor layer and reused by the following big.LITTLE layers
until the next predictor. ``k`` is static (a function of the keep ratio and the grid), so every
shape is known before the forward pass: good for CUDA graphs and ``torch.compile``.
"""
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn

from .layers.windows import window_partition

ROUTER_SCORES = ("softmax", "sigmoid")


@dataclass
class TokenSelection:
    """Which tokens the P-blocks process.

    ``K`` is the number of picks per image: ``num_windows * k`` for windowed selection.

    Attributes:
        flat_index: (B, K) position of each pick in the (unpadded) token sequence.
            Picks that landed on window padding (only when k exceeds a border window's real
            tokens) point at token 0 and are switched off by ``valid``.
        gather_index: (B * K,) ``flat_index`` plus the batch offset ``b * N``, for flat
            ``index_select`` / ``index_add`` on a (B * N, C) view.
        scores: (B, K) router score of each pick, normalised so that a uniform predictor gives 1.
        probs: (B, K) the raw predictor probability (softmax within the selection group).
        valid: (B, K) bool, or None when every pick is a real token.
        local_index: (B, num_windows, k) position of each pick inside its window (windowed
            selection), else None.
        window_size: side of the selection windows, 0 for global selection.
    """

    flat_index: torch.Tensor
    gather_index: torch.Tensor
    scores: torch.Tensor
    probs: torch.Tensor
    valid: Optional[torch.Tensor]
    local_index: Optional[torch.Tensor]
    window_size: int

    @property
    def num_selected(self) -> int:
        return self.flat_index.shape[1]


class TokenPredictor(nn.Module):
    """Scores token importance: LayerNorm + Linear(C, 1).

    The LayerNorm is there because the residual stream's scale changes a lot between layers of
    a pretrained encoder (SAM ViT-H especially); the softmax is applied by the selection.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.score = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, N) float32 logits."""
        return self.score(self.norm(x)).squeeze(-1).float()


def tokens_per_window(keep_ratio: float, window_size: int) -> int:
    """Fixed number of picks in every window: round(keep_ratio * ws^2), at least 1."""
    area = window_size * window_size
    return min(area, max(1, round(keep_ratio * area)))


def tokens_kept_global(keep_ratio: float, num_tokens: int, num_prefix_tokens: int = 0) -> int:
    """Picks for global selection: every prefix (class) token plus round(ratio * patches)."""
    patches = num_tokens - num_prefix_tokens
    return num_prefix_tokens + min(patches, max(1, round(keep_ratio * patches)))


def _router_probs(logits: torch.Tensor, router_score: str) -> torch.Tensor:
    if router_score == "softmax":
        return logits.softmax(dim=-1)
    if router_score == "sigmoid":
        return logits.sigmoid()
    raise ValueError(f"unknown router_score {router_score!r}; choose one of {ROUTER_SCORES}")


def _offsets(flat_index: torch.Tensor, num_tokens: int) -> torch.Tensor:
    batch = torch.arange(flat_index.shape[0], device=flat_index.device)[:, None]
    return (flat_index + batch * num_tokens).reshape(-1)


def select_global(
    logits: torch.Tensor,
    keep_ratio: float,
    num_prefix_tokens: int = 0,
    router_score: str = "softmax",
    num_tokens: Optional[int] = None,
) -> TokenSelection:
    """Top-k over the whole sequence; the first ``num_prefix_tokens`` (class token) always kept.

    Args:
        logits: (B, N) predictor logits.
        num_tokens: N when the caller knows it statically (then k is a constant, not read from
            the tensor's shape: what ``torch.fx`` tracing needs).
    """
    b, n = logits.shape
    k = tokens_kept_global(keep_ratio, n if num_tokens is None else num_tokens, num_prefix_tokens)
    key = logits
    if num_prefix_tokens:  # prefix tokens always win (out of place: traceable)
        key = torch.cat([torch.full_like(logits[:, :num_prefix_tokens], float("inf")), logits[:, num_prefix_tokens:]], 1)
    flat_index = key.topk(k, dim=-1, sorted=False).indices
    probs = _router_probs(logits, router_score)
    group = n if router_score == "softmax" else 1
    picked = probs.gather(1, flat_index)
    return TokenSelection(
        flat_index=flat_index,
        gather_index=_offsets(flat_index, n),
        scores=picked * group,
        probs=picked,
        valid=None,
        local_index=None,
        window_size=0,
    )


def select_windowed(
    logits: torch.Tensor,
    grid: Tuple[int, int],
    window_size: int,
    keep_ratio: float,
    router_score: str = "softmax",
) -> TokenSelection:
    """The same top-k in every window of the (padded) grid; padding is never a real pick.

    Args:
        logits: (B, H*W) predictor logits in row-major grid order.
        grid: (H, W).
    """
    b, n = logits.shape
    k = tokens_per_window(keep_ratio, window_size)
    device = logits.device
    # Window layout of token positions; padding gets position -1.
    position = window_partition(
        torch.arange(1, n + 1, device=device).view(1, n, 1), grid, window_size
    ).squeeze(-1) - 1  # (nW, S)
    is_real = position >= 0
    window_logits = window_partition(logits.unsqueeze(-1), grid, window_size).view(b, -1, position.shape[-1])
    window_logits = window_logits.masked_fill(~is_real, float("-inf"))
    local_index = window_logits.topk(k, dim=-1, sorted=False).indices  # (B, nW, k)

    probs = _router_probs(window_logits, router_score).masked_fill(~is_real, 0.0)
    scores = probs * is_real.sum(-1, keepdim=True) if router_score == "softmax" else probs
    picked_position = position.expand(b, -1, -1).gather(-1, local_index)
    valid = picked_position >= 0
    flat_index = picked_position.clamp(min=0).reshape(b, -1)
    return TokenSelection(
        flat_index=flat_index,
        gather_index=_offsets(flat_index, n),
        scores=scores.gather(-1, local_index).reshape(b, -1),
        probs=probs.gather(-1, local_index).reshape(b, -1),
        valid=valid.reshape(b, -1),
        local_index=local_index,
        window_size=window_size,
    )


def gather_tokens(x: torch.Tensor, selection: TokenSelection) -> torch.Tensor:
    """(B, N, C) -> (B, K, C): the selected tokens, one flat ``index_select``."""
    b, n, c = x.shape
    return x.reshape(b * n, c).index_select(0, selection.gather_index).view(b, -1, c)


class _RowScatterAdd(torch.autograd.Function):
    """``data.index_add(0, index, updates)`` on a (N, C) table that exports as one ONNX
    ``ScatterND(reduction="add")`` with (K, 1) row indices: whole rows added, exact with repeated
    indices. (``scatter_add`` exports as ``ScatterElements`` with a (K, C) index tensor, element
    by element: 6 % of the b+t encoder's time under ONNX Runtime at 1024 px, against about 1 %.)
    Export only: the eager path is ``index_add``."""

    @staticmethod
    def forward(ctx, data: torch.Tensor, index: torch.Tensor, updates: torch.Tensor) -> torch.Tensor:
        return data.index_add(0, index, updates)

    @staticmethod
    def symbolic(g, data, index, updates):
        rows = g.op("Unsqueeze", index, g.op("Constant", value_t=torch.tensor([1])))
        return g.op("ScatterND", data, rows, updates, reduction_s="add")


def add_to_tokens(
    x: torch.Tensor, selection: TokenSelection, update: torch.Tensor, inplace: bool = False
) -> torch.Tensor:
    """Add ``update`` (B, K, C) to the selected positions of ``x`` (B, N, C).

    Use ``inplace=True`` only on a tensor that no autograd node needs unchanged (e.g. the
    fresh result of a residual add).
    """
    b, n, c = x.shape
    src = update.reshape(-1, c).to(x.dtype)
    flat = x.view(b * n, c) if inplace else x.reshape(b * n, c)
    if torch.onnx.is_in_onnx_export():
        # index_add's own export overwrites repeated indices (padding picks all point at token 0)
        return _RowScatterAdd.apply(flat, selection.gather_index, src).view(b, n, c)
    if inplace:  # the result (x itself) is returned from the op, so a traced graph keeps the op
        return flat.index_add_(0, selection.gather_index, src).view(b, n, c)
    return flat.index_add(0, selection.gather_index, src).view(b, n, c)
