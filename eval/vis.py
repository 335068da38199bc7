"""Pictures of an evaluation: prompts, ground truth and predictions side by side."""
from pathlib import Path
from typing import Any, Dict, List

import numpy as np


def _colour_masks(image: np.ndarray, masks: List[np.ndarray], alpha: float = 0.5) -> np.ndarray:
    out = image.astype(np.float32).copy()
    rng = np.random.default_rng(0)
    for mask in masks:
        if mask is None:
            continue
        colour = rng.uniform(40, 255, 3)
        out[mask] = (1 - alpha) * out[mask] + alpha * colour
    return out.astype(np.uint8)


def draw_prompted(path: Path, image: np.ndarray, drawn: Dict[str, Any], records: List[Dict[str, Any]]) -> Path:
    """Three panels: the image with its prompts (green positive, red negative clicks; yellow
    boxes), the ground-truth masks, the predicted masks with their final IoU."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(15, 5))
    axes[0].imshow(image)
    for points in drawn.get("points") or []:
        for x, y, label in points or []:
            axes[0].scatter([x], [y], c="lime" if label else "red", marker="*", s=120, edgecolors="white")
    if drawn.get("boxes") is not None:
        for x0, y0, x1, y1 in drawn["boxes"]:
            axes[0].add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="yellow", lw=1.5))
    axes[0].set_title("prompts")
    axes[1].imshow(_colour_masks(image, drawn["gt"]))
    axes[1].set_title(f"ground truth ({len(drawn['gt'])} objects)")
    axes[2].imshow(_colour_masks(image, drawn["pred"]))
    ious = [r["iou"][-1] for r in records]
    axes[2].set_title(f"predicted (mean IoU {np.mean(ious):.3f})" if ious else "predicted")
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
