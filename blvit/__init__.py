"""blvit: big.LITTLE Vision Transformers and token merging for cheaper vision models."""
from .blocks import BigLittleBlock, DenseBlock, EBlock
from .routing import TokenPredictor, TokenSelection, select_global, select_windowed

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
