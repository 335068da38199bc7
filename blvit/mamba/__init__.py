"""Vision Mamba in plain PyTorch: the selective scan (pure-PyTorch and optional CUDA backends),
a causal conv1d helper, and Vim-Ti/S/B registered with timm (``vim_tiny_patch16_224``,
``vim_small_patch16_224``, ``vim_base_patch16_224``) loading the official checkpoints."""
from .selective_scan import (
    BACKENDS,
    available_backends,
    causal_conv1d,
    count_scan_macs,
    selective_scan,
    selective_scan_macs,
    selective_scan_ref,
)
from .vim import (
    VARIANTS,
    Mamba,
    RMSNorm,
    VimBlock,
    VisionMamba,
    checkpoint_filter_fn,
    load_vim_checkpoint,
    select_state_dict,
    vim_macs,
)

__all__ = [
    "BACKENDS",
    "Mamba",
    "RMSNorm",
    "VARIANTS",
    "VimBlock",
    "VisionMamba",
    "available_backends",
    "causal_conv1d",
    "checkpoint_filter_fn",
    "count_scan_macs",
    "load_vim_checkpoint",
    "select_state_dict",
    "selective_scan",
    "selective_scan_macs",
    "selective_scan_ref",
    "vim_macs",
]
