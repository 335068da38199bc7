"""VideoMamba (Li et al. 2024; OpenGVLab/VideoMamba, ``videomamba/video_sm/models/videomamba.py``)
in plain PyTorch, on this toolkit's Vim mixer and selective-scan backends.

The official layout, key for key:

- ``patch_embed.proj``: ``Conv3d(3, C, (k, 16, 16), stride (k, 16, 16))`` with tubelet ``k`` = 1:
  every frame is cut into 16 x 16 patches on its own;
- ``cls_token`` (1, 1, C) and ``pos_embed`` (1, 1 + h w, C), the spatial embedding shared by all
  frames (its first entry is the class token's); ``temporal_pos_embedding`` (1, T / k, C) added to
  every patch of a frame;
- the sequence is ``[cls, frame 0 patches, frame 1 patches, ...]`` (class token first, frames in
  order, patches row-major inside a frame): ``b (t n) c``;
- ``layers.{i}``: RMSNorm + bidirectional Mamba with separate backward parameters (``A_b_log``,
  ``conv1d_b``, ``x_proj_b``, ``dt_proj_b``, ``D_b``), residual stream in float32, exactly Vim's
  block (:class:`blvit.mamba.vim.VimBlock`) except that the two directions are **summed**, not
  averaged (VideoMamba's ``mamba_simple.Mamba(bimamba=True)``: ``out_proj(out + out_b.flip)``);
- ``norm_f`` (RMSNorm) on ``residual + hidden``, ``head`` on the class token.

timm names (after ``import blvit``): ``videomamba_tiny`` (192 wide, 24 layers),
``videomamba_small`` (384, 24), ``videomamba_middle`` (576, 32), ``num_frames`` 8 by default
(16 for the ``f16`` checkpoints)::

    model = timm.create_model("videomamba_small", num_frames=8, num_classes=400,
                              checkpoint_path="videomamba_s16_k400_f8_res224.pth")

A checkpoint of the image model (ImageNet pretraining, ``videomamba_s16_in1k_res224.pth``: a
2-D patch embedding and no temporal embedding) loads too: the patch kernel is inflated over the
tubelet (centre frame, as the official ``inflate_weight(center=True)``), the temporal embedding
keeps its zero initialisation and the head is dropped (a log line says what). A temporal
embedding for another frame count is interpolated linearly (8 -> 16 frames).
"""
import logging
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from ..flops import module_macs_on_meta, timm_model_on_meta
from ..utils.io import CheckpointError, PathLike
from ..utils.tracing import fx_tracing
from .selective_scan import count_scan_macs
from .vim import VisionMamba, _check_state, _read, _timm_checkpoint_path, rescale_out_proj_, select_state_dict

logger = logging.getLogger(__name__)

__all__ = ["PatchEmbed3D", "VideoMamba", "VIDEO_VARIANTS", "load_videomamba_checkpoint", "videomamba_filter_fn",
           "videomamba_macs"]

VIDEO_VARIANTS: Dict[str, Dict[str, Any]] = {
    "videomamba_tiny": dict(embed_dim=192, depth=24),
    "videomamba_small": dict(embed_dim=384, depth=24),
    "videomamba_middle": dict(embed_dim=576, depth=32),
}


class PatchEmbed3D(nn.Module):
    """(B, 3, T, H, W) -> (B, C, T / k, H / p, W / p): tubelets of k frames x p x p pixels."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, tubelet_size: int = 1, num_frames: int = 8,
                 in_chans: int = 3, embed_dim: int = 192) -> None:
        super().__init__()
        if img_size % patch_size or num_frames % tubelet_size:
            raise ValueError(f"img_size {img_size} / num_frames {num_frames} must be multiples of patch_size "
                             f"{patch_size} / tubelet_size {tubelet_size}")
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.tubelet_size, self.num_frames, self.in_chans = tubelet_size, num_frames, in_chans
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]  # per frame (what pos_embed covers)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=(tubelet_size, patch_size, patch_size),
                              stride=(tubelet_size, patch_size, patch_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not fx_tracing() and (x.dim() != 5 or x.shape[1] != self.in_chans or x.shape[2] != self.num_frames
                                 or tuple(x.shape[-2:]) != self.img_size):
            raise ValueError(f"expected clips of shape (B, {self.in_chans}, {self.num_frames}, {self.img_size[0]}, "
                             f"{self.img_size[1]}), got {tuple(x.shape)}")
        return self.proj(x)


class VideoMamba(VisionMamba):
    """VideoMamba (module docstring): Vim's blocks on ``[cls, frame 0 patches, frame 1 patches, ...]``.

    (B, 3, T, H, W) clips (each frame normalised as an ImageNet image) -> (B, num_classes).
    ``forward_features``: (B, 1 + T h w, C) normalised tokens, the class token first.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, num_frames: int = 8, tubelet_size: int = 1,
                 depth: int = 24, embed_dim: int = 192, in_chans: int = 3, num_classes: int = 1000, d_state: int = 16,
                 expand: int = 2, d_conv: int = 4, drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 norm_epsilon: float = 1e-5, residual_in_fp32: bool = True, scan_backend: Optional[str] = None,
                 global_pool: str = "token") -> None:
        if isinstance(img_size, (tuple, list)):  # timm passes input_size[-2:]
            img_size = int(img_size[-1])
        super().__init__(img_size, patch_size, None, depth, embed_dim, in_chans, num_classes, d_state, expand, d_conv,
                         "auto", 0.0, drop_path_rate, norm_epsilon, residual_in_fp32, "v2", if_divide_out=False,
                         scan_backend=scan_backend, global_pool=global_pool)
        self.num_frames, self.tubelet_size = num_frames, tubelet_size
        self.patch_embed = PatchEmbed3D(img_size, patch_size, tubelet_size, num_frames, in_chans, embed_dim)
        self.temporal_pos_embedding = nn.Parameter(torch.zeros(1, num_frames // tubelet_size, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        self.token_position = 0
        self.init_weights()

    def init_weights(self) -> None:
        """The official init: timm's ViT init of every Linear, ``pos_embed`` truncated normal
        (std 0.02), class token and temporal embedding zero, Mamba's dt / out_proj rules."""
        if not hasattr(self, "temporal_pos_embedding") or self.pos_embed.device.type == "meta":
            return  # VisionMamba.__init__ calls this before the video parts exist
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None and not getattr(module.bias, "_no_reinit", False):
                    nn.init.zeros_(module.bias)
        trunc_normal_(self.pos_embed, std=0.02)
        nn.init.zeros_(self.cls_token)
        nn.init.zeros_(self.temporal_pos_embedding)
        rescale_out_proj_(self, self.depth)

    @torch.jit.ignore
    def no_weight_decay(self):
        return super().no_weight_decay() | {"temporal_pos_embedding"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r"^cls_token|^pos_embed|^temporal_pos_embedding|^patch_embed",
                    blocks=[(r"^layers\.(\d+)", None), (r"^norm_f", (99999,))])

    def embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, int]:
        """(B, 3, T, H, W) -> ((B, 1 + T' h w, C) tokens, class index 0): each patch gets the spatial
        embedding of its place and the temporal embedding of its frame."""
        x = self.patch_embed(x)  # (B, C, T', h, w)
        b, c = x.shape[:2]
        x = x.flatten(3).permute(0, 2, 3, 1)  # (B, T', h w, C)
        x = x + self.pos_embed[:, None, 1:] + self.temporal_pos_embedding[:, :, None]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(b, -1, -1).to(x.dtype)
        return self.pos_drop(torch.cat([cls, x.reshape(b, -1, c)], dim=1)), 0

    def _intermediate_run(self, x: torch.Tensor, take: Sequence[int], stop: int, norm: bool):
        raise NotImplementedError("VideoMamba's intermediates are spatio-temporal tokens; use forward_features "
                                  "(B, 1 + T h w, C) or forward_tokens")

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Official state dicts, checked (a file of another model raises ``CheckpointError``
        naming it); image checkpoints are inflated (see :func:`videomamba_filter_fn`)."""
        where = "state dict"
        path = _timm_checkpoint_path()
        if path is not None:
            state_dict = select_state_dict(_read(path), path, use_ema=False)
            where = str(path)
        state = videomamba_filter_fn(state_dict, self, where)
        if strict:
            _check_state(self, state, where)
        return nn.Module.load_state_dict(self, state, strict=strict, assign=assign)


def videomamba_filter_fn(state_dict: Mapping[str, Any], model: VideoMamba, where: str = "checkpoint") -> Dict[str, torch.Tensor]:
    """An official VideoMamba state dict (``"model"`` / ``"module"`` unwrapped, DDP prefix dropped)
    -> this model's: a 2-D patch kernel (image checkpoint) is inflated to the tubelet at its centre
    frame and the missing temporal embedding is taken from the model (zeros); a temporal embedding
    of another length is interpolated linearly; ``head.*`` is dropped when the class count differs."""
    state = select_state_dict(state_dict, where)
    own = nn.Module.state_dict(model)
    kernel = state.get("patch_embed.proj.weight")
    if isinstance(kernel, torch.Tensor) and kernel.dim() == 4 and own["patch_embed.proj.weight"].dim() == 5:
        inflated = kernel.new_zeros(own["patch_embed.proj.weight"].shape)
        inflated[:, :, model.tubelet_size // 2] = kernel
        state["patch_embed.proj.weight"] = inflated
        logger.info("%s: image checkpoint: patch kernel inflated to %d frame(s) (centre)", where, model.tubelet_size)
        if "temporal_pos_embedding" not in state:
            state["temporal_pos_embedding"] = own["temporal_pos_embedding"].clone()
            logger.info("%s: no temporal_pos_embedding: kept at its initialisation", where)
    temporal = state.get("temporal_pos_embedding")
    wanted = own["temporal_pos_embedding"]
    if isinstance(temporal, torch.Tensor) and temporal.dim() == 3 and temporal.shape[-1] == wanted.shape[-1] \
            and temporal.shape[1] != wanted.shape[1]:
        logger.info("%s: temporal_pos_embedding of %d frames interpolated to %d", where, temporal.shape[1], wanted.shape[1])
        state["temporal_pos_embedding"] = F.interpolate(temporal.transpose(1, 2).float(), size=wanted.shape[1],
                                                        mode="linear", align_corners=False).transpose(1, 2).to(temporal.dtype)
    head = state.get("head.weight")
    if isinstance(head, torch.Tensor) and head.shape[0] != model.num_classes:
        logger.info("%s: head for %d classes, model %d: head left at its initialisation", where, head.shape[0], model.num_classes)
        state.pop("head.weight")
        state.pop("head.bias", None)
    return state


def load_videomamba_checkpoint(model: VideoMamba, path: PathLike) -> List[str]:
    """Load an official VideoMamba file (video or image checkpoint) into ``model``, checked.
    Returns the keys left at initialisation."""
    state = videomamba_filter_fn(select_state_dict(_read(path), path), model, str(path))
    _check_state(model, state, str(path))
    nn.Module.load_state_dict(model, state, strict=False)
    return [k for k in nn.Module.state_dict(model) if k not in state]


def videomamba_macs(model: Union[nn.Module, str], batch: int = 1, **create_kwargs: Any) -> Dict[str, int]:
    """Multiply-adds of one clip: ``FlopCounterMode`` on meta tensors plus the selective scans
    counted analytically. Returns {"total", "counted", "scan"}."""
    if isinstance(model, str):
        model = timm_model_on_meta(model, **create_kwargs)
    pe = model.patch_embed
    with count_scan_macs() as scans:
        counted = module_macs_on_meta(model, (batch, pe.in_chans, pe.num_frames, *pe.img_size))
    return {"total": counted + scans.macs, "counted": counted, "scan": scans.macs}


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    """VideoMamba's test transform per frame: 224 x 224, ImageNet mean/std."""
    return {"url": "", "num_classes": 400, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 1.0,
            "interpolation": "bilinear", "fixed_input_size": True, "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD, "first_conv": "patch_embed.proj", "classifier": "head",
            "license": "apache-2.0", **kwargs}


default_cfgs = generate_default_cfgs({name: _cfg() for name in VIDEO_VARIANTS})


def _create(name: str, pretrained: bool = False, **kwargs: Any) -> VideoMamba:
    if pretrained:
        raise ValueError(f"{name}: no download is configured; pass the official file with checkpoint_path=")
    kwargs.pop("out_indices", None)
    kwargs.setdefault("num_classes", 400)
    return build_model_with_cfg(VideoMamba, name, pretrained=False, pretrained_filter_fn=videomamba_filter_fn,
                                **dict(VIDEO_VARIANTS[name], **kwargs))


@register_model
def videomamba_tiny(pretrained: bool = False, **kwargs: Any) -> VideoMamba:
    """VideoMamba-Ti: 192 wide, 24 layers (Kinetics-400: 8 frames by default, ``num_frames=16``)."""
    return _create("videomamba_tiny", pretrained, **kwargs)


@register_model
def videomamba_small(pretrained: bool = False, **kwargs: Any) -> VideoMamba:
    """VideoMamba-S: 384 wide, 24 layers."""
    return _create("videomamba_small", pretrained, **kwargs)


@register_model
def videomamba_middle(pretrained: bool = False, **kwargs: Any) -> VideoMamba:
    """VideoMamba-M: 576 wide, 32 layers."""
    return _create("videomamba_middle", pretrained, **kwargs)
