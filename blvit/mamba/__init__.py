"""Vision Mamba in plain PyTorch: the selective scan (pure-PyTorch and optional CUDA backends),
a causal conv1d helper, Vim-Ti/S/B registered with timm (``vim_tiny_patch16_224``,
``vim_small_patch16_224``, ``vim_base_patch16_224``) and VideoMamba-Ti/S/M (``videomamba_tiny``,
``videomamba_small``, ``videomamba_middle``), loading the official checkpoints."""
from .selective_scan import (
    BACKENDS,
    available_backends,
    causal_conv1d,
    count_scan_macs,
    selective_scan,
    selective_scan_macs,
    selective_scan_ref,
)
from .videomamba import VIDEO_VARIANTS, VideoMamba, load_videomamba_checkpoint, videomamba_macs
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
    "VIDEO_VARIANTS",
    "VideoMamba",
    "load_videomamba_checkpoint",
    "videomamba_macs",
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
