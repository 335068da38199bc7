"""Vision Mamba (Vim, Zhu et al. 2024; hustvl/Vim) in plain PyTorch, loading the official weights.

The model is the released ``vim_{tiny,small,base}_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_
with_midclstok_div2``: 16 x 16 patches, a class token inserted in the middle of the patch
sequence (index M // 2 of M patches: 98 of 197 tokens), a learned absolute position embedding,
24 blocks of RMSNorm + bidirectional ("bimamba v2") Mamba mixer with the residual stream kept in
float32, the final RMSNorm ``norm_f`` and a linear ``head`` on the class token.

Forward order (the fused add + norm of the reference, ``fused_add_norm=True``)::

    hidden, residual = tokens, None
    for block in layers:
        residual = hidden if residual is None else residual + drop_path(hidden)   # float32
        hidden = block.mixer(RMSNorm(residual))          # norm output in the incoming dtype
    features = norm_f(residual + drop_path(hidden))
    logits = head(features[:, cls_index])

Mixer (in_proj -> x, z; each direction: causal depthwise conv1d + SiLU, x_proj -> (dt, B, C),
dt_proj, selective scan with A = -exp(A_log), skip D, gate silu(z)); the backward direction runs
on ``xz.flip(-1)`` (x and z flipped) with its own ``conv1d_b``, ``x_proj_b``, ``dt_proj_b``,
``A_b_log``, ``D_b``; ``out_proj((y_fwd + y_bwd.flip(-1)) / 2)`` ("if_divide_out").

Parameter names are the official checkpoint's (``layers.{i}.mixer.in_proj.weight``, ...,
``norm_f.weight``, ``head.*``, ``patch_embed.proj.*``, ``pos_embed``, ``cls_token``), so
``vim_t_midclstok_76p1acc.pth`` (weights under ``"model"``, often ``"model_ema"`` too) loads as is.

timm names (after ``import blvit``): ``vim_tiny_patch16_224``, ``vim_small_patch16_224``,
``vim_base_patch16_224``::

    model = timm.create_model("vim_tiny_patch16_224", checkpoint_path="vim_t_midclstok_76p1acc.pth")

timm's loader prefers a checkpoint's ``"model_ema"`` entry; the published accuracies are those
of ``"model"``, so when timm loads a file this model re-reads it and takes ``"model"`` (falling back
to ``"model_ema"``); :func:`load_vim_checkpoint` has a ``use_ema`` switch.

``scan_backend`` ("torch", "reference", "cuda" or None = fastest available) picks the selective
scan implementation (see :mod:`blvit.mamba.selective_scan`); no CUDA package is needed.
"""
import argparse
import logging
import math
import os
import sys
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple, Union

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, lecun_normal_, resample_abs_pos_embed, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch.utils.checkpoint import checkpoint

from ..flops import module_macs_on_meta, timm_model_on_meta
from ..utils.io import CheckpointError, PathLike, check_state_dict, listing, read_checkpoint
from ..models.features import TakenTokens, TokenFeatures, feature_info, refuse_script, take_indices
from ..utils.tracing import fx_tracing
from .selective_scan import BACKENDS, causal_conv1d, count_scan_macs, selective_scan

# torch.fx keeps the scan and the causal convolution as single opaque calls: they pick a kernel
# by device and loop over the sequence, which symbolic tracing cannot follow (nor need to)
torch.fx.wrap("selective_scan")
torch.fx.wrap("causal_conv1d")

logger = logging.getLogger(__name__)

__all__ = [
    "Mamba",
    "RMSNorm",
    "VARIANTS",
    "VimBlock",
    "VisionMamba",
    "checkpoint_filter_fn",
    "load_vim_checkpoint",
    "select_state_dict",
    "vim_macs",
]

VARIANTS: Dict[str, Dict[str, Any]] = {
    "vim_tiny_patch16_224": dict(embed_dim=192, depth=24),
    "vim_small_patch16_224": dict(embed_dim=384, depth=24),
    "vim_base_patch16_224": dict(embed_dim=768, depth=24),
}


# ----------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """mamba_ssm's RMSNorm with its fused residual add (``rms_norm_fn``): computed in float32,
    output in the dtype of the incoming ``x``; with ``prenorm`` also returns the new residual
    ``x + residual`` (float32 when ``residual_in_fp32`` or when the residual already is)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None, prenorm: bool = False,
                residual_in_fp32: bool = False):
        dtype = x.dtype
        total = x.float() if residual is None else x.float() + residual.float()
        out = total * torch.rsqrt(total.square().mean(-1, keepdim=True) + self.eps) * self.weight.float()
        out = out.to(dtype)
        if not prenorm:
            return out
        if residual is not None:
            res_dtype = residual.dtype
        else:
            res_dtype = torch.float32 if residual_in_fp32 else dtype
        return out, total.to(res_dtype)


class Mamba(nn.Module):
    """Vim's Mamba mixer (``bimamba_type="v2"``: forward and backward SSMs; ``"none"``: forward
    only). Parameter names and shapes are the official ones."""

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: Union[int, str] = "auto", dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init: str = "random", dt_scale: float = 1.0, dt_init_floor: float = 1e-4,
                 conv_bias: bool = True, bias: bool = False, bimamba_type: str = "v2",
                 if_divide_out: bool = True, scan_backend: Optional[str] = None) -> None:
        super().__init__()
        if bimamba_type not in ("v2", "none"):
            raise ValueError(f"bimamba_type must be 'v2' or 'none', got {bimamba_type!r}")
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.bimamba_type = bimamba_type
        self.if_divide_out = if_divide_out
        self.scan_backend = scan_backend
        di = self.d_inner
        self.in_proj = nn.Linear(d_model, 2 * di, bias=bias)
        directions = [""] + (["_b"] if bimamba_type == "v2" else [])
        for sfx in directions:
            setattr(self, f"conv1d{sfx}", nn.Conv1d(di, di, d_conv, groups=di, padding=d_conv - 1, bias=conv_bias))
            setattr(self, f"x_proj{sfx}", nn.Linear(di, self.dt_rank + 2 * d_state, bias=False))
            dt_proj = nn.Linear(self.dt_rank, di, bias=True)
            self._init_dt_proj(dt_proj, dt_init, dt_scale, dt_min, dt_max, dt_init_floor)
            setattr(self, f"dt_proj{sfx}", dt_proj)
            # S4D real initialisation: A = -(1, 2, ..., N) for every channel
            a_log = torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(di, 1)
            name = "A_log" if sfx == "" else "A_b_log"
            setattr(self, name, nn.Parameter(a_log))
            getattr(self, name)._no_weight_decay = True
            setattr(self, f"D{sfx}", nn.Parameter(torch.ones(di)))
            getattr(self, f"D{sfx}")._no_weight_decay = True
        self.out_proj = nn.Linear(di, d_model, bias=bias)

    @staticmethod
    def _init_dt_proj(dt_proj: nn.Linear, dt_init: str, dt_scale: float, dt_min: float, dt_max: float,
                      floor: float) -> None:
        std = dt_proj.in_features ** -0.5 * dt_scale
        with torch.no_grad():
            if dt_init == "constant":
                dt_proj.weight.fill_(std)
            else:
                dt_proj.weight.uniform_(-std, std)
            if dt_proj.bias.device.type == "meta":
                return
            dt = torch.exp(torch.rand(dt_proj.out_features) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            dt = dt.clamp(min=floor)
            dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
        dt_proj.bias._no_reinit = True

    def _direction(self, xz: torch.Tensor, sfx: str) -> torch.Tensor:
        conv, x_proj, dt_proj = getattr(self, f"conv1d{sfx}"), getattr(self, f"x_proj{sfx}"), getattr(self, f"dt_proj{sfx}")
        a_log = self.A_log if sfx == "" else self.A_b_log
        skip = getattr(self, f"D{sfx}")
        x, z = xz.chunk(2, dim=1)
        x = causal_conv1d(x, conv.weight, conv.bias, activation="silu")
        x_dbl = F.linear(x.transpose(1, 2), x_proj.weight)  # (B, L, dt_rank + 2N)
        dt, b, c = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.linear(dt, dt_proj.weight).transpose(1, 2)  # bias goes in as delta_bias
        a = -torch.exp(a_log.float())
        return selective_scan(x, delta, a, b.transpose(1, 2), c.transpose(1, 2), skip.float(), z=z,
                              delta_bias=dt_proj.bias.float(), delta_softplus=True, backend=self.scan_backend)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        xz = self.in_proj(hidden).transpose(1, 2)  # (B, 2 d_inner, L)
        y = self._direction(xz, "")
        if self.bimamba_type == "v2":
            y = y + self._direction(xz.flip(-1), "_b").flip(-1)
            if self.if_divide_out:
                y = y / 2
        return self.out_proj(y.transpose(1, 2))


def rescale_out_proj_(model: nn.Module, depth: int) -> None:
    """Mamba's ``_init_weights`` for the residual branches (GPT-2 style): every mixer's
    ``out_proj.weight`` re-drawn Kaiming-uniform and divided by sqrt(depth)."""
    for name, p in model.named_parameters():
        if name.endswith("out_proj.weight"):
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))
            with torch.no_grad():
                p /= math.sqrt(depth)


class VimBlock(nn.Module):
    """``residual = residual + drop_path(hidden)`` (or the input, first block);
    ``hidden = mixer(norm(residual))``. Returns (hidden, residual)."""

    def __init__(self, dim: int, mixer: Mamba, drop_path: float = 0.0, eps: float = 1e-5,
                 residual_in_fp32: bool = True) -> None:
        super().__init__()
        self.residual_in_fp32 = residual_in_fp32
        self.mixer = mixer
        self.norm = RMSNorm(dim, eps=eps)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, hidden: torch.Tensor, residual: Optional[torch.Tensor] = None):
        if residual is not None:
            hidden = self.drop_path(hidden)
        hidden, residual = self.norm(hidden, residual, prenorm=True, residual_in_fp32=self.residual_in_fp32)
        return self.mixer(hidden), residual


class PatchEmbed(nn.Module):
    def __init__(self, img_size: Union[int, Tuple[int, int]] = 224, patch_size: int = 16,
                 stride: Optional[int] = None, in_chans: int = 3, embed_dim: int = 192) -> None:
        super().__init__()
        stride = stride or patch_size
        self.img_size = tuple(img_size) if isinstance(img_size, (tuple, list)) else (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.in_chans = in_chans
        self.grid_size = tuple((s - patch_size) // stride + 1 for s in self.img_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not fx_tracing() and tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"input size {tuple(x.shape[-2:])} does not match the model's {self.img_size}")
        return self.proj(x).flatten(2).transpose(1, 2)


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


class VisionMamba(TokenFeatures, nn.Module):
    """Vim with a middle class token (the released configuration; module docstring).

    ``token_merge``: optional callable ``(layer_index, hidden, residual, cls_index) -> (hidden,
    residual, cls_index)`` run before every block (:func:`blvit.tokens.apply_rmeeto` sets it);
    it is a plain attribute, not a module: it adds nothing to the state dict.

    ``resample_pos_embed``: loading a checkpoint whose position embedding was trained for another
    patch grid (another ``img_size``) raises a ``CheckpointError`` naming both grids unless this is
    True; then the embedding is resampled (bicubic, class-token entry kept in the middle) and a log
    line says so. ``load_vim_checkpoint`` has the same switch.
    """

    def __init__(self, img_size: Union[int, Tuple[int, int]] = 224, patch_size: int = 16, stride: Optional[int] = None,
                 depth: int = 24, embed_dim: int = 192, in_chans: int = 3, num_classes: int = 1000, d_state: int = 16,
                 expand: int = 2, d_conv: int = 4, dt_rank: Union[int, str] = "auto", drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, norm_epsilon: float = 1e-5, residual_in_fp32: bool = True,
                 bimamba_type: str = "v2", if_divide_out: bool = True, scan_backend: Optional[str] = None,
                 global_pool: str = "token", resample_pos_embed: bool = False) -> None:
        super().__init__()
        if global_pool != "token":
            raise ValueError("VisionMamba classifies from its middle class token: global_pool must be 'token'")
        if scan_backend is not None and scan_backend not in BACKENDS:
            raise ValueError(f"scan_backend must be one of {BACKENDS} or None, got {scan_backend!r}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.embed_dim = self.num_features = self.head_hidden_size = embed_dim
        self.depth = depth
        self.residual_in_fp32 = residual_in_fp32
        self.num_prefix_tokens = 1  # one class token (in the middle, not first)
        self.grad_checkpointing = False
        self.token_merge: Optional[Callable] = None
        # a checkpoint whose position embedding has another grid is an error unless this is set
        self.resample_pos_embed = bool(resample_pos_embed)

        self.patch_embed = PatchEmbed(img_size, patch_size, stride, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.token_position = num_patches // 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        # The reference gives block i the rate dpr[i - 1] (block 0: none), and the final add the full rate.
        dpr = [0.0] + [drop_path_rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]
        self.layers = nn.ModuleList([
            VimBlock(embed_dim, Mamba(embed_dim, d_state=d_state, d_conv=d_conv, expand=expand, dt_rank=dt_rank,
                                      bimamba_type=bimamba_type, if_divide_out=if_divide_out,
                                      scan_backend=scan_backend),
                     drop_path=dpr[i], eps=norm_epsilon, residual_in_fp32=residual_in_fp32)
            for i in range(depth)
        ])
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0.0 else nn.Identity()
        self.norm_f = RMSNorm(embed_dim, eps=norm_epsilon)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = feature_info(depth, embed_dim, stride or patch_size, "layers")
        self.init_weights()

    # -- initialisation (the reference's segm_init_weights + mamba's _init_weights) -------------
    def init_weights(self) -> None:
        if self.pos_embed.device.type == "meta":
            return
        proj = self.patch_embed.proj
        lecun_normal_(proj.weight)
        nn.init.zeros_(proj.bias)
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=0.02)
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.bias is not None and not getattr(module.bias, "_no_reinit", False):
                nn.init.zeros_(module.bias)
        rescale_out_proj_(self, self.depth)

    # -- timm API ----------------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return {"pos_embed", "cls_token"} | {n for n, p in self.named_parameters() if getattr(p, "_no_weight_decay", False)}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r"^cls_token|^pos_embed|^patch_embed", blocks=[(r"^layers\.(\d+)", None), (r"^norm_f", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def __prepare_scriptable__(self):
        refuse_script(self)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None and global_pool != "token":
            raise ValueError("VisionMamba supports only global_pool='token'")
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def set_scan_backend(self, backend: Optional[str]) -> None:
        """Selective-scan backend of every mixer: "torch", "reference", "cuda" or None."""
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"scan_backend must be one of {BACKENDS} or None, got {backend!r}")
        for layer in self.layers:
            layer.mixer.scan_backend = backend

    # -- forward -------------------------------------------------------------------------------------
    def embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, int]:
        """Patch tokens with the class token inserted at index M // 2 and the position embedding."""
        x = self.patch_embed(x)
        pos = x.shape[1] // 2
        cls = self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([x[:, :pos], cls, x[:, pos:]], dim=1)
        return self.pos_drop(x + self.pos_embed), pos

    def _layers_taking(self, x: torch.Tensor, take: Sequence[int] = (), stop: int = -1, norm: bool = False):
        """Layers 0..``stop`` (-1: all): (hidden, residual, class index after the last, the taken
        layers' tokens (B, T, C): the residual stream ``residual + hidden``, through ``norm_f`` if
        ``norm``, with the class index, and the first layer whose tokens are merged or None)."""
        hidden, pos = self.embed(x)
        residual = None
        merge = self.token_merge
        if merge is not None and fx_tracing():
            raise NotImplementedError(
                "torch.fx cannot trace Vision Mamba with token merging installed (the merge reads token counts "
                "from tensor shapes); trace the model without it (blvit.tokens.remove_rmeeto) or use torch.compile")
        taken: List[TakenTokens] = []
        merged_from: Optional[int] = None
        for i, layer in enumerate(self.layers):
            if stop >= 0 and i > stop:
                break
            if merge is not None:
                before = hidden.shape[1]
                hidden, residual, pos = merge(i, hidden, residual, pos)
                if merged_from is None and hidden.shape[1] != before:
                    merged_from = i
            if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
                hidden, residual = checkpoint(layer, hidden, residual, use_reentrant=False)
            else:
                hidden, residual = layer(hidden, residual)
            if i in take:
                tokens = self.norm_f(hidden, residual) if norm else (hidden if residual is None else residual + hidden)
                taken.append((tokens, pos, None))
        return hidden, residual, pos, taken, merged_from

    def forward_tokens(self, x: torch.Tensor) -> Tuple[torch.Tensor, int]:
        """Normalised output tokens (B, T, C) and the class token's index among them."""
        hidden, residual, pos, _, _ = self._layers_taking(x)
        hidden = self.norm_f(self.drop_path(hidden), residual)
        return hidden, pos

    def _feature_depth(self) -> int:
        return len(self.layers)

    def _intermediate_run(self, x: torch.Tensor, take: Sequence[int], stop: int, norm: bool):
        """Intermediates are the residual stream after each layer (``residual + hidden``; with
        ``norm``, through ``norm_f``), the middle class token cut out; after an R-MeeTo merge the
        tokens have no patch grid, so NCHW raises there (see :mod:`blvit.models.features`)."""
        hidden, residual, pos, taken, merged_from = self._layers_taking(x, take, stop, norm)
        self.token_position = pos
        return self.norm_f(self.drop_path(hidden), residual), taken, merged_from

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop the layers after the last wanted one (and the head): what ``features_only=True``
        keeps. ``norm_f`` stays (it also adds the residual stream); ``prune_norm`` is accepted."""
        take, max_index = take_indices(len(self.layers), indices)
        self.layers = self.layers[: max_index + 1]
        if prune_head:
            self.reset_classifier(0)
        return take

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised tokens (B, T, C); the class token's index is left in ``self.token_position``."""
        tokens, pos = self.forward_tokens(x)
        self.token_position = pos
        return tokens

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False, token_position: Optional[int] = None) -> torch.Tensor:
        if x.dim() == 3:
            x = x[:, self.token_position if token_position is None else token_position]
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, pos = self.forward_tokens(x)
        self.token_position = pos
        return self.head(tokens[:, pos])  # forward_head on 3-D tokens, without its (untraceable) dim test

    # -- checkpoints -----------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Loads official-layout state dicts, checked: a state dict of another architecture raises
        a ``CheckpointError`` naming the file (when timm's loader reads one) and the keys.

        When called from ``timm.create_model(..., checkpoint_path=...)``, the file is re-read so that
        its ``"model"`` entry is used rather than timm's preferred ``"model_ema"``.
        """
        where = "state dict"
        path = _timm_checkpoint_path()
        if path is not None and os.path.isfile(path) and not str(path).endswith((".safetensors", ".npz", ".npy")):
            state_dict = select_state_dict(_read(path), path, use_ema=False)
            where = str(path)
        state = checkpoint_filter_fn(state_dict, self, where=where)
        if strict:
            _check_state(self, state, where)
        return super().load_state_dict(state, strict=strict, assign=assign)


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------

def describe_state(state: Mapping[str, Any]) -> str:
    """'embed_dim 192, depth 24, 1000 classes' from a Vim state dict (for error messages)."""
    token = state.get("pos_embed", state.get("cls_token"))
    width = token.shape[-1] if isinstance(token, torch.Tensor) else "?"
    layers = {int(k.split(".")[1]) for k in state if k.startswith("layers.") and k.split(".")[1].isdigit()}
    head = state.get("head.weight")
    classes = f", {head.shape[0]} classes" if isinstance(head, torch.Tensor) else ""
    return f"embed_dim {width}, depth {max(layers) + 1 if layers else 0}{classes}"


def _timm_checkpoint_path() -> Optional[str]:
    """The ``checkpoint_path`` of an enclosing ``timm.models._helpers.load_checkpoint`` call."""
    frame = sys._getframe(2)
    for _ in range(8):
        if frame is None:
            return None
        if frame.f_code.co_name == "load_checkpoint" and frame.f_globals.get("__name__", "").startswith("timm."):
            path = frame.f_locals.get("checkpoint_path")
            return str(path) if path is not None else None
        frame = frame.f_back
    return None


def _read(path: PathLike) -> Dict[str, Any]:
    """read_checkpoint, allowing the argparse.Namespace that DeiT/Vim training files carry."""
    safe = getattr(torch.serialization, "safe_globals", None)
    if safe is None:
        return read_checkpoint(path)
    with safe([argparse.Namespace]):
        return read_checkpoint(path)


def select_state_dict(obj: Mapping[str, Any], path: PathLike = "state dict", use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """The weights in an official Vim / VideoMamba file: ``"model"`` (or ``"model_ema"`` with
    ``use_ema``, or when there is no ``"model"``), ``"module"`` (VideoMamba's ``model_key``
    ``model|module``), ``"state_dict"``, or a plain state dict; DDP ``module.`` stripped."""
    keys = ("model_ema", "model", "module", "state_dict") if use_ema else ("model", "model_ema", "module", "state_dict")
    for key in keys:
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    state = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor: not a state dict "
                                  f"(top-level keys: {listing(obj)})")
        for prefix in ("module.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        state[k] = v
    return state


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: VisionMamba, resample_pos_embed: Optional[bool] = None,
                         where: str = "checkpoint") -> Dict[str, torch.Tensor]:
    """timm-style filter for official Vim state dicts: unwraps ``"model"``, strips ``module.``,
    drops ``head.*`` when the class count differs. Other keys pass through unchanged.

    A ``pos_embed`` of the model's width but for another (square) patch grid, i.e. a checkpoint
    trained at another ``img_size``, raises a ``CheckpointError`` naming both grids, unless
    ``resample_pos_embed`` (default: the model's ``resample_pos_embed`` attribute) is True: then it
    is resampled (bicubic, middle class token kept in the middle) with a log line."""
    if any(isinstance(state_dict.get(k), Mapping) for k in ("model", "model_ema", "state_dict")):
        state_dict = select_state_dict(state_dict)
    out = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state_dict.items()}
    if resample_pos_embed is None:
        resample_pos_embed = bool(getattr(model, "resample_pos_embed", False))
    pos, own = out.get("pos_embed"), model.pos_embed
    if isinstance(pos, torch.Tensor) and pos.dim() == 3 and pos.shape[-1] == own.shape[-1] and pos.shape[1] != own.shape[1]:
        old = pos.shape[1] - 1
        side = math.isqrt(max(old, 0))
        if side * side == old and old > 0:
            grid = tuple(model.patch_embed.grid_size)
            patch = model.patch_embed.patch_size[0]
            old_desc = f"a {side}x{side} patch grid"
            if patch == model.patch_embed.proj.stride[0]:
                old_desc += f" (img_size {side * patch} at patch {patch})"
            new_desc = f"a {grid[0]}x{grid[1]} grid (img_size {model.patch_embed.img_size[0]})"
            if not resample_pos_embed:
                raise CheckpointError(
                    f"{where}: pos_embed {tuple(pos.shape)} was trained for {old_desc}, the model has {new_desc} "
                    f"and pos_embed {tuple(own.shape)}: build the model at the checkpoint's image size, or pass "
                    f"resample_pos_embed=True to resample the position embedding (bicubic)")
            logger.info("%s: resampling pos_embed from %s to %s", where, old_desc, new_desc)
            mid = old // 2
            patches = torch.cat([pos[:, :mid], pos[:, mid + 1:]], dim=1)
            patches = resample_abs_pos_embed(patches, list(grid), old_size=[side, side], num_prefix_tokens=0)
            new_mid = patches.shape[1] // 2
            out["pos_embed"] = torch.cat([patches[:, :new_mid], pos[:, mid:mid + 1], patches[:, new_mid:]], dim=1)
    head = out.get("head.weight")
    if isinstance(head, torch.Tensor) and head.dim() == 2 and head.shape[0] != model.num_classes:
        logger.info("checkpoint head has %d classes, model %d: head left at its initialisation", head.shape[0],
                    model.num_classes)
        out.pop("head.weight")
        out.pop("head.bias", None)
    return out


def _check_state(model: VisionMamba, state: Mapping[str, torch.Tensor], where: str) -> None:
    own = nn.Module.state_dict(model)
    head_dropped = "head.weight" not in state and "head.weight" in own and any(k.startswith("layers.") for k in state)
    check_state_dict(own, state, where, "Vision Mamba", lambda k: head_dropped and k.startswith("head."),
                     f" (checkpoint: {describe_state(state)}; model: {describe_state(own)})")


def load_vim_checkpoint(model: VisionMamba, path: PathLike, use_ema: bool = False,
                        resample_pos_embed: Optional[bool] = None) -> List[str]:
    """Load an official Vim file (or a plain state dict file) into ``model``, checked.
    ``use_ema`` takes ``"model_ema"`` when present. ``resample_pos_embed``: see
    :func:`checkpoint_filter_fn` (default: the model's attribute, False unless built with it).
    Returns the keys left at initialisation (the head, when the file's class count differs)."""
    state = checkpoint_filter_fn(select_state_dict(_read(path), path, use_ema=use_ema), model,
                                 resample_pos_embed=resample_pos_embed, where=str(path))
    _check_state(model, state, str(path))
    nn.Module.load_state_dict(model, state, strict=False)
    return [k for k in nn.Module.state_dict(model) if k not in state]


# ----------------------------------------------------------------------------------------------
# FLOPs
# ----------------------------------------------------------------------------------------------


def vim_macs(model: Union[nn.Module, str], img_size: Optional[Union[int, Tuple[int, int]]] = None, batch: int = 1,
             **create_kwargs: Any) -> Dict[str, int]:
    """Multiply-adds of one forward pass of a Vim (or any model with selective scans), per batch
    of ``batch`` images: ``FlopCounterMode`` on meta tensors for the matrix products and
    convolutions, plus the selective scans counted analytically
    (:func:`~blvit.mamba.selective_scan.selective_scan_macs`; FlopCounterMode cannot see them).

    Returns {"total", "counted", "scan"}.
    """
    if isinstance(model, str):
        if img_size is not None:
            create_kwargs["img_size"] = img_size
        model = timm_model_on_meta(model, **create_kwargs)
    if img_size is None:
        img_size = model.patch_embed.img_size
    size = tuple(img_size) if isinstance(img_size, (tuple, list)) else (img_size, img_size)
    in_chans = getattr(model.patch_embed, "in_chans", 3)
    with count_scan_macs() as scans:
        counted = module_macs_on_meta(model, (batch, in_chans, *size))
    return {"total": counted + scans.macs, "counted": counted, "scan": scans.macs}


# ----------------------------------------------------------------------------------------------
# timm registration
# ----------------------------------------------------------------------------------------------


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    """Vim's evaluation transform (DeiT's): 224 x 224, bicubic, crop 0.875, ImageNet mean/std."""
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None,
        "crop_pct": 0.875, "interpolation": "bicubic", "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj", "classifier": "head", "license": "apache-2.0",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({name: _cfg() for name in VARIANTS})

_CHECKPOINTS = {
    "vim_tiny_patch16_224": "vim_t_midclstok_76p1acc.pth",
    "vim_small_patch16_224": "vim_s_midclstok_80p5acc.pth",
    "vim_base_patch16_224": "vim_b_midclstok_81p9acc.pth",
}


def _create_vim(name: str, pretrained: bool = False, **kwargs: Any) -> VisionMamba:
    if pretrained:
        raise ValueError(f"{name}: no download is configured; pass the official file with "
                         f"checkpoint_path=<{_CHECKPOINTS[name]}> (hustvl/Vim releases)")
    args = dict(VARIANTS[name], **kwargs)
    return build_model_with_cfg(VisionMamba, name, pretrained=False, pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=dict(out_indices=args.pop("out_indices", 3), feature_cls="getter"), **args)


@register_model
def vim_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionMamba:
    """Vim-Ti: embed 192, depth 24, middle class token (76.1 % ImageNet top-1 released)."""
    return _create_vim("vim_tiny_patch16_224", pretrained, **kwargs)


@register_model
def vim_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionMamba:
    """Vim-S: embed 384, depth 24, middle class token (80.5 % released)."""
    return _create_vim("vim_small_patch16_224", pretrained, **kwargs)


@register_model
def vim_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionMamba:
    """Vim-B: embed 768, depth 24, middle class token (81.9 % released)."""
    return _create_vim("vim_base_patch16_224", pretrained, **kwargs)

