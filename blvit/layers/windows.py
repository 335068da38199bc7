"""Non-overlapping window partitioning on a token grid (SAM / ViTDet layout)."""
from typing import Tuple

import torch
import torch.nn.functional as F


def padded_grid(grid: Tuple[int, int], window_size: int) -> Tuple[int, int]:
    """(H, W) -> (Hp, Wp), both rounded up to a multiple of ``window_size``."""
    h, w = grid
    return h + (-h) % window_size, w + (-w) % window_size


def window_partition(x: torch.Tensor, grid: Tuple[int, int], window_size: int) -> torch.Tensor:
    """Split tokens into zero-padded windows.

    Args:
        x: (B, H*W, C) tokens in row-major grid order.
        grid: (H, W).
        window_size: side of a square window.
    Returns:
        (B * nW, window_size**2, C), windows in row-major order, tokens row-major inside.
    """
    b, _, c = x.shape
    h, w = grid
    hp, wp = padded_grid(grid, window_size)
    x = x.view(b, h, w, c)
    if hp > h or wp > w:
        x = F.pad(x, (0, 0, 0, wp - w, 0, hp - h))
    x = x.view(b, hp // window_size, window_size, wp // window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size * window_size, c)


def window_unpartition(
    windows: torch.Tensor, grid: Tuple[int, int], window_size: int
) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B * nW, ws*ws, C) -> (B, H*W, C), padding dropped."""
    h, w = grid
    hp, wp = padded_grid(grid, window_size)
    nh, nw = hp // window_size, wp // window_size
    c = windows.shape[-1]
    x = windows.view(-1, nh, nw, window_size, window_size, c).permute(0, 1, 3, 2, 4, 5)
    x = x.reshape(-1, hp, wp, c)
    if hp > h or wp > w:
        x = x[:, :h, :w]
    return x.reshape(-1, h * w, c)
