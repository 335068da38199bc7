"""bLViT image encoders for Segment Anything."""
from .build import build_sam_blvit, build_sam_from_config, build_sam_stock, sam_from_encoder, sam_model_registry
from .checkpoint import load_sam_checkpoint, save_blvit_sam_checkpoint
from .config import VARIANTS, BigLittleSamConfig, make_config
from .image_encoder import BigLittleImageEncoder

__all__ = [
    "VARIANTS",
    "BigLittleImageEncoder",
    "BigLittleSamConfig",
    "build_sam_blvit",
    "build_sam_from_config",
    "build_sam_stock",
    "load_sam_checkpoint",
    "make_config",
    "sam_from_encoder",
    "sam_model_registry",
    "save_blvit_sam_checkpoint",
]
