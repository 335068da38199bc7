"""Decomposed relative-position bias (MViTv2 / SAM) for queries at arbitrary grid positions.

SAM adds ``q . R_h[qh - kh]  +  q . R_w[qw - kw]`` to every attention logit. The stock code
computes it for a full query grid; bLViT's P-block needs it for a subset of the queries
(the selected tokens), so here the query positions are explicit index tensors.
"""
from typing import Tuple

import torch
import torch.nn.functional as F


def resize_rel_pos(rel_pos: torch.Tensor, length: int) -> torch.Tensor:
    """Linearly resample a (L, C) relative-position table to (length, C), as SAM does."""
    if rel_pos.shape[0] == length:
        return rel_pos
    resized = F.interpolate(rel_pos.t().unsqueeze(0), size=length, mode="linear")
    return resized.squeeze(0).t()


def _axis_bias(q: torch.Tensor, q_coord: torch.Tensor, table: torch.Tensor, k_len: int) -> torch.Tensor:
    """(B, heads, Lq, hd) x (B' or 1, Lq) -> (B, heads, Lq, k_len): q . table[q_coord - k + k_len - 1]."""
    table = resize_rel_pos(table, 2 * k_len - 1).to(q.dtype)
    logits = q @ table.t()  # (B, heads, Lq, 2 k_len - 1): one dot product per relative offset
    k_coord = torch.arange(k_len, device=q.device)
    index = (q_coord[:, None, :, None] - k_coord + (k_len - 1)).expand(
        q.shape[0], q.shape[1], q.shape[2], k_len
    )
    return torch.gather(logits, -1, index)


def axis_rel_pos_biases(
    q: torch.Tensor,
    q_h: torch.Tensor,
    q_w: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    k_size: Tuple[int, int],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The two factors of the decomposed bias: (B, heads, Lq, k_h) and (B, heads, Lq, k_w);
    the bias of key (kh, kw) is ``bias_h[..., kh] + bias_w[..., kw]``. Arguments as
    ``decomposed_rel_pos_bias``."""
    return _axis_bias(q, q_h, rel_pos_h, k_size[0]), _axis_bias(q, q_w, rel_pos_w, k_size[1])


def decomposed_rel_pos_bias(
    q: torch.Tensor,
    q_h: torch.Tensor,
    q_w: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    k_size: Tuple[int, int],
) -> torch.Tensor:
    """Additive attention bias for queries at given positions of the key grid.

    Args:
        q: (B, heads, Lq, head_dim) queries (unscaled, as in SAM).
        q_h, q_w: (B or 1, Lq) integer row / column of each query in the key grid.
        rel_pos_h, rel_pos_w: (2*k_h - 1, head_dim) and (2*k_w - 1, head_dim) tables
            (resampled linearly if their length differs).
        k_size: (k_h, k_w), the key grid; keys are in row-major order.
    Returns:
        (B, heads, Lq, k_h * k_w) bias.
    """
    bias_h, bias_w = axis_rel_pos_biases(q, q_h, q_w, rel_pos_h, rel_pos_w, k_size)
    return (bias_h[..., :, None] + bias_w[..., None, :]).flatten(-2)
