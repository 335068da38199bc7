"""Pictures: mask overlays and where the router sent tokens."""
from pathlib import Path
from typing import Optional, Sequence

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def selection_map(flat_index: np.ndarray, valid: Optional[np.ndarray], grid: int) -> np.ndarray:
    """(K,) selected positions of one image -> (grid, grid) 0/1 map."""
    out = np.zeros(grid * grid, np.float32)
    keep = flat_index if valid is None else flat_index[valid.astype(bool)]
    out[keep] = 1.0
    return out.reshape(grid, grid)


def _label(ax, text: str, fontsize: float = 9.0) -> None:
    """A panel's title drawn inside its picture (top edge, on a light box), wrapped to the
    picture's width, so no layout cuts it off whatever the image's aspect ratio. Call after the
    figure's layout is final."""
    import textwrap

    ax.apply_aspect()
    width_px = ax.get_window_extent().width
    char_px = 0.62 * fontsize * ax.figure.dpi / 72  # a generous average glyph width
    wrapped = textwrap.fill(text, width=max(8, int(width_px / char_px) - 2))
    ax.text(0.5, 0.985, wrapped, transform=ax.transAxes, ha="center", va="top", fontsize=fontsize,
            bbox={"facecolor": "white", "alpha": 0.75, "edgecolor": "none", "pad": 2})


MASK_ALPHA = 0.45


def blend_masks(image: np.ndarray, masks: Sequence[np.ndarray], colours: np.ndarray,
                alpha: float = MASK_ALPHA) -> np.ndarray:
    """(H, W, 3) uint8: ``masks`` (each (H, W)) painted over ``image`` in order, each in its colour
    ((K, 3) in [0, 1]) at ``alpha``, as stacked alpha layers composite."""
    shown = image[..., :3].astype(np.float32)
    for mask, colour in zip(masks, colours):
        inside = np.asarray(mask).astype(bool)
        shown[inside] = shown[inside] * (1 - alpha) + 255 * alpha * np.asarray(colour, np.float32)
    return np.clip(shown + 0.5, 0, 255).astype(np.uint8)


def save_overlay(
    path: Path,
    image: np.ndarray,
    masks: Sequence[np.ndarray],
    scores: Sequence[float] = (),
    points: Optional[np.ndarray] = None,
    labels: Optional[np.ndarray] = None,
    box: Optional[np.ndarray] = None,
    routing: Sequence[np.ndarray] = (),
    routing_titles: Sequence[str] = (),
    input_size: Optional[tuple] = None,
) -> Path:
    """One PNG: the image with masks, prompts and scores, then one panel per routing map.

    ``routing`` maps are (g, g) over the padded model input; ``input_size`` (h, w) is the
    resized image inside it, used to crop the map to the image.
    """
    plt = _plt()
    panels = 1 + len(routing)
    height, width = image.shape[:2]
    panel_w = 5.0 * min(1.6, max(0.6, width / height))  # each panel keeps the image's aspect ratio
    fig, axes = plt.subplots(1, panels, figsize=(panel_w * panels, 5), squeeze=False)
    ax = axes[0, 0]
    colours = plt.cm.tab10(np.arange(max(1, len(masks))) % 10)
    # the masks blended into one copy of the image, in order (what one imshow layer per mask at alpha
    # 0.45 draws, without a float64 H x W x 4 layer per mask: --everything on a 12-MP photo ran out of memory)
    ax.imshow(blend_masks(image, masks, colours[:, :3]))
    if points is not None and len(points):
        labels = np.ones(len(points)) if labels is None else labels
        for (x, y), lab in zip(points, labels):
            ax.scatter([x], [y], c="lime" if lab > 0 else "red", marker="*", s=250, edgecolors="white")
    if box is not None:
        x0, y0, x1, y1 = box
        ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="yellow", lw=2))
    labels_ = [(ax, "masks " + ", ".join(f"{s:.2f}" for s in scores) if len(scores) else "masks")]
    ax.axis("off")
    for j, (m, title) in enumerate(zip(routing, list(routing_titles) + [""] * len(routing))):
        ax = axes[0, 1 + j]
        ax.imshow(image)
        if input_size is not None:
            g = m.shape[0]
            scale = g / max(input_size)
            m = m[: int(np.ceil(input_size[0] * scale)), : int(np.ceil(input_size[1] * scale))]
        ax.imshow(m, cmap="magma", alpha=0.6, extent=(0, image.shape[1], image.shape[0], 0), vmin=0, vmax=1)
        if title:
            labels_.append((ax, title))
        ax.axis("off")
    fig.tight_layout()
    for ax, text in labels_:
        _label(ax, text)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
