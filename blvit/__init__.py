"""blvit: big.LITTLE Vision Transformers and token merging for cheaper vision models."""
from .blocks import BigLittleBlock, DenseBlock, EBlock
from .routing import TokenPredictor, TokenSelection, select_global, select_windowed
from . import models  # noqa: F401,E402  (registers the classifiers with timm)
from . import mamba  # noqa: F401,E402  (registers the Vision Mamba models with timm)

__version__ = "0.1.0"

__all__ = [
    "BigLittleBlock",
    "DenseBlock",
    "EBlock",
    "TokenPredictor",
    "TokenSelection",
    "select_global",
    "select_windowed",
]
