"""PyTorch-free inference of exported SAM models (``blvit-export``): numpy, OpenCV and ONNX Runtime
only, what an annotation tool embeds. Importing this package imports neither torch nor
segment-anything (tested)."""
from .predictor import OnnxSamPredictor, resize_longest_side

__all__ = ["OnnxSamPredictor", "resize_longest_side"]
