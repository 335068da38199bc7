"""PyTorch-free inference of exported SAM models (``blvit-export``): numpy, OpenCV and ONNX Runtime
only, what an annotation tool embeds, plus image reading (PIL) and the overlay pictures
(``blvit_deploy.viz``, matplotlib). Importing this package imports neither torch nor
segment-anything, and a whole ``blvit-demo --backend onnx`` run loads neither (tested)."""
from typing import Any

from .images import read_image, resize_longest_side

__all__ = ["OnnxSamPredictor", "read_image", "resize_longest_side"]


def __getattr__(name: str) -> Any:
    """``OnnxSamPredictor`` is imported on first use: ONNX Runtime is an optional extra
    (``pip install .[onnx]``), and the image reading that the evaluation and the demo share must
    not need it."""
    if name == "OnnxSamPredictor":
        from .predictor import OnnxSamPredictor

        return OnnxSamPredictor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
