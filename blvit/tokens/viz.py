"""Merge maps: which patches ended up in which token, drawn over the image (PNG, matplotlib Agg).

    source = model._tome_info["source"][0, 1:, 1:]        # ToMe: drop the class token
    source = vim.token_merge.source[0]                    # R-MeeTo: patches only already
    save_merge_map("merge.png", image, source, grid=(14, 14))
    save_video_merge_map("merge.png", frames, videomamba.token_merge.source[0], grid=(14, 14))  # VideoMamba
"""
import os
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch

__all__ = ["assignment_from_source", "save_merge_map", "save_video_merge_map"]


def assignment_from_source(source: Union[torch.Tensor, np.ndarray]) -> np.ndarray:
    """(tokens, patches) 0/1 source map -> (patches,) index of the token covering each patch.
    Raises if a patch is covered by no token or by several (the map must partition the patches)."""
    src = source.detach().float().cpu().numpy() if isinstance(source, torch.Tensor) else np.asarray(source, float)
    if src.ndim != 2:
        raise ValueError(f"source must be (tokens, patches), got shape {src.shape}")
    cover = (src > 0.5).sum(0)
    if not np.all(cover == 1):
        bad = np.flatnonzero(cover != 1)
        raise ValueError(f"source does not partition the patches: patches {bad[:10].tolist()} are covered "
                         f"{cover[bad[:10]].tolist()} times")
    return src.argmax(0).astype(np.int64)


def _palette(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    hues = (np.arange(n) * 0.61803398875 + rng.random()) % 1.0  # golden-ratio hues: neighbours differ
    from matplotlib.colors import hsv_to_rgb

    hsv = np.stack([hues, 0.55 + 0.4 * rng.random(n), 0.75 + 0.25 * rng.random(n)], axis=1)
    return hsv_to_rgb(hsv)


def save_merge_map(path: Union[str, os.PathLike], image: np.ndarray,
                   source: Union[torch.Tensor, np.ndarray, Sequence[int]], grid: Tuple[int, int],
                   alpha: float = 0.55, title: Optional[str] = None, seed: int = 0) -> np.ndarray:
    """Draw the merge groups over ``image`` and save a PNG.

    Args:
        image: (H, W, 3) uint8.
        source: (tokens, patches) 0/1 map, or an assignment (patches,) of a token index per patch.
        grid: (rows, cols) of the patch grid; patches are in row-major order.
        alpha: opacity of the group colours; groups of one patch are left uncoloured.

    Each merged group gets one colour; borders between different groups are drawn. Returns the
    (patches,) assignment used.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.collections import LineCollection
    from matplotlib.figure import Figure

    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3), got {image.shape}")
    src = source.detach().cpu().numpy() if isinstance(source, torch.Tensor) else np.asarray(source)
    assignment = assignment_from_source(src) if src.ndim == 2 else src.astype(np.int64).reshape(-1)
    rows, cols = int(grid[0]), int(grid[1])
    if assignment.shape[0] != rows * cols:
        raise ValueError(f"{assignment.shape[0]} patches do not fill a {rows} x {cols} grid")
    labels = assignment.reshape(rows, cols)
    _, inverse, counts = np.unique(assignment, return_inverse=True, return_counts=True)
    colours = _palette(len(counts), seed)
    overlay = np.zeros((rows, cols, 4), dtype=float)
    overlay[..., :3] = colours[inverse].reshape(rows, cols, 3)
    overlay[..., 3] = np.where(counts[inverse].reshape(rows, cols) > 1, alpha, 0.0)

    h, w = image.shape[:2]
    ph, pw = h / rows, w / cols
    segments = []
    for i in range(rows):
        for j in range(cols):
            if j + 1 < cols and labels[i, j] != labels[i, j + 1]:
                x = (j + 1) * pw
                segments.append([(x, i * ph), (x, (i + 1) * ph)])
            if i + 1 < rows and labels[i, j] != labels[i + 1, j]:
                y = (i + 1) * ph
                segments.append([(j * pw, y), ((j + 1) * pw, y)])

    grow = max(1.0, 3.0 / (min(w, h) / 80))  # at least 3 inches on the short side, aspect kept
    fig = Figure(figsize=(w / 80 * grow, h / 80 * grow), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes([0, 0, 1, 1] if title is None else [0, 0, 1, 0.92])
    ax.imshow(image, extent=(0, w, h, 0), interpolation="nearest")
    ax.imshow(overlay, extent=(0, w, h, 0), interpolation="nearest")
    ax.add_collection(LineCollection(segments, colors="white", linewidths=1.2))
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.axis("off")
    if title is not None:
        fig.suptitle(title, fontsize=9)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, format="png")
    return assignment


def save_video_merge_map(path: Union[str, os.PathLike], frames: np.ndarray,
                         source: Union[torch.Tensor, np.ndarray, Sequence[int]], grid: Tuple[int, int],
                         **kwargs) -> np.ndarray:
    """The merge groups of a video model (VideoMamba + R-MeeTo) over its frames, side by side.

    Args:
        frames: (T, H, W, 3) uint8, the clip's frames as the model saw them (one per tubelet).
        source: (tokens, T * h * w) 0/1 map (patches frame-major, row-major inside a frame), or
            an assignment (T * h * w,).
        grid: (h, w) patch grid of one frame.

    A token that merged patches of several frames has the same colour in each of them. Returns
    the assignment in the model's patch order.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be (T, H, W, 3), got {frames.shape}")
    t, (rows, cols) = frames.shape[0], (int(grid[0]), int(grid[1]))
    src = source.detach().cpu().numpy() if isinstance(source, torch.Tensor) else np.asarray(source)
    assignment = assignment_from_source(src) if src.ndim == 2 else src.astype(np.int64).reshape(-1)
    if assignment.shape[0] != t * rows * cols:
        raise ValueError(f"{assignment.shape[0]} patches are not {t} frames of a {rows} x {cols} grid")
    tiled = assignment.reshape(t, rows, cols).transpose(1, 0, 2).reshape(rows, t * cols)  # frames side by side
    save_merge_map(path, np.concatenate(list(frames), axis=1), tiled.reshape(-1), (rows, t * cols), **kwargs)
    return assignment
