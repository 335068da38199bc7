"""ImageNet classifiers: the bLViT classifier and the EViT and DynamicViT baselines, registered
with timm.

Importing this package (``import blvit`` does) registers ``blvit_base_tiny_patch16_224``,
``blvit_small_tiny_patch16_224``, ``evit_base_patch16_224``, ``evit_small_patch16_224``,
``evovit_base_patch16_224``, ``evovit_small_patch16_224``, ``dynamicvit_base_patch16_224`` and
``dynamicvit_small_patch16_224``.
"""
from .blvit_vit import (
    VARIANTS,
    BigLittleViT,
    BigLittleViTConfig,
    analytic_classifier_macs,
    checkpoint_filter_fn,
    classifier_macs,
    load_blvit_checkpoint,
    load_dense_checkpoint,
    load_e_blocks_from_deit,
    make_config,
    save_blvit_checkpoint,
)
from .dynamicvit import DynamicViT
from .evit import EViT, reorganize_tokens
from .evovit import EvoViT

__all__ = [
    "VARIANTS",
    "BigLittleViT",
    "BigLittleViTConfig",
    "DynamicViT",
    "EViT",
    "EvoViT",
    "analytic_classifier_macs",
    "checkpoint_filter_fn",
    "classifier_macs",
    "load_blvit_checkpoint",
    "load_dense_checkpoint",
    "load_e_blocks_from_deit",
    "make_config",
    "reorganize_tokens",
    "save_blvit_checkpoint",
]
