"""PyTorch-free inference of exported SAM models (``blvit-export``): numpy, OpenCV and ONNX Runtime
only, what an annotation tool embeds, plus image reading (PIL) and the overlay pictures
(``blvit_deploy.viz``, matplotlib). Importing this package imports neither torch nor
segment-anything, and a whole ``blvit-demo --backend onnx`` run loads neither (tested)."""
from .images import read_image
from .predictor import OnnxSamPredictor, resize_longest_side

__all__ = ["OnnxSamPredictor", "read_image", "resize_longest_side"]
