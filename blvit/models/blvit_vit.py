"""``BigLittleViT``: the bLViT ImageNet classifier in the DeiT layout, registered with timm.

Layout of the paper's B+T (0-based layer indices): patch embedding 16 x 16, a class token and a
learned position embedding (DeiT-B), layer 0 a dense DeiT-B layer, layers 1-11 big.LITTLE with
DeiT-B P-blocks (768 wide, 12 heads) and DeiT-T E-blocks (192 wide, 3 heads), predictors at the
input of layers 1, 4, 7, 10 (the paper's "after layers 1, 4, 7, 10", counted from 1), each
selection reused until the next predictor, then the final ``norm`` and ``head`` on the class
token. Selection is a fixed top-k over the whole sequence with the class token forced in
(``select_global(..., num_prefix_tokens=1)``), so every shape is static:
``K = 1 + round(keep_ratio * N)`` for N patches (50 of 197 tokens at keep ratio 0.25).

Parameter names: ``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``norm``, ``head`` are
timm's / DeiT's; blocks use this toolkit's names (``attn.qkv``, ``attn.proj``, ``mlp.lin1``,
``mlp.lin2``), so a DeiT checkpoint goes through :func:`checkpoint_filter_fn` (``fc1`` -> ``lin1``,
``fc2`` -> ``lin2``). New parameters live under ``blocks.{i}.e_block``, ``blocks.{i}.gamma_*`` and
``predictors.{i}``; with ``gamma_init = 0`` and keep ratio 1.0 the model computes exactly what
the DeiT it was loaded from computes (docs/method.md).

timm names (after ``import blvit``): ``blvit_base_tiny_patch16_224`` (B+T) and
``blvit_small_tiny_patch16_224`` (S+T)::

    model = timm.create_model("blvit_base_tiny_patch16_224", keep_ratio=0.25,
                              dense_checkpoint="deit_base_patch16_224-b5f2ef4d.pth")
    model = timm.create_model("blvit_base_tiny_patch16_224", checkpoint_path="runs/bt/best.pth")
"""
import dataclasses
import logging
import math
import re
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import resample_abs_pos_embed
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch.utils.checkpoint import checkpoint

from .. import flops as _flops
from ..utils.tracing import fx_tracing
from .features import TakenTokens, TokenFeatures, feature_info, refuse_script, take_indices
from ..blocks import layout_block
from ..layout import layout_problems, variant_config
from ..routing import TokenPredictor, TokenSelection, select_global, tokens_kept_global
from ..utils.io import CheckpointError, PathLike, atomic_save, listing, load_checked, read_checkpoint, unwrap_state_dict

logger = logging.getLogger(__name__)

__all__ = [
    "BigLittleViT",
    "BigLittleViTConfig",
    "ClassTokenViT",
    "PatchEmbed",
    "VARIANTS",
    "analytic_classifier_macs",
    "checkpoint_filter_fn",
    "classifier_macs",
    "load_blvit_checkpoint",
    "load_dense_checkpoint",
    "load_e_blocks_from_deit",
    "make_config",
    "save_blvit_checkpoint",
]

# ----------------------------------------------------------------------------------------------
# Embedding, head and the parts every class-token ViT here shares
# ----------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """Non-overlapping patches to tokens (timm's key names: ``proj``).

    (B, in_chans, img_size, img_size) -> (B, N, C), N = (img_size / patch_size)^2, row-major.
    """

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size, chans = self.img_size, self.in_chans
        if not fx_tracing() and (x.dim() != 4 or x.shape[1] != chans or x.shape[2] != size or x.shape[3] != size):
            raise ValueError(f"expected images of shape (B, {chans}, {size}, {size}), got {tuple(x.shape)}")
        return self.proj(x).flatten(2).transpose(1, 2)


def init_vit_weights_(module: nn.Module) -> None:
    """timm's default ViT init: truncated normal (std 0.02) linear weights, zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def drop_layer(x_in: torch.Tensor, x_out: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth on a whole layer, per sample: ``x_in + mask * (x_out - x_in) / (1 - rate)``.

    x_in, x_out: (B, L, C). The identity outside training or at rate 0.
    """
    if rate <= 0.0 or not training:
        return x_out
    keep = 1.0 - rate
    mask = x_in.new_empty(x_in.shape[0], 1, 1).bernoulli_(keep)
    return x_in + (x_out - x_in) * (mask / keep)


_TIMM_MLP = re.compile(r"^(blocks\.\d+\.mlp\.)fc([12])\.")


def rename_timm_keys(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """timm / DeiT ViT key names -> this toolkit's: ``blocks.{i}.mlp.fc1`` -> ``blocks.{i}.mlp.lin1``,
    ``fc2`` -> ``lin2``; a DDP ``module.`` prefix is dropped. Other keys are kept as they are."""
    out = {}
    for key, value in state.items():
        key = key[len("module."):] if key.startswith("module.") else key
        out[_TIMM_MLP.sub(r"\1lin\2.", key)] = value
    return out


class ClassTokenViT(TokenFeatures, nn.Module):
    """What a DeiT-style classifier has around its blocks: patch embedding, class token,
    learned position embedding (class token included, DeiT layout), final ``norm`` and a
    linear ``head`` on the class token. Subclasses build ``blocks`` and ``forward_features``.
    """

    num_prefix_tokens = 1

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.embed_dim = self.num_features = self.head_hidden_size = embed_dim
        self.global_pool = "token"
        self.grad_checkpointing = False
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.patch_embed.num_patches, embed_dim))

    def _init_head(self, num_classes: int, drop_rate: float, eps: float = 1e-6) -> None:
        self.num_classes = num_classes
        self.norm = nn.LayerNorm(self.embed_dim, eps=eps)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def init_weights(self) -> None:
        """Random init as timm's ViT (pos_embed std 0.02, cls_token std 1e-6, linear std 0.02).
        Scalars (the gammas) keep their ``gamma_init``."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        self.apply(init_vit_weights_)

    @staticmethod
    def is_new_parameter(key: str) -> bool:
        """Parameters a dense DeiT checkpoint cannot provide."""
        return False

    @staticmethod
    def checked_image_size(model: str, img_size: Any, patch_size: int, global_pool: str) -> int:
        """The side of a square input from ``img_size`` (an int, or (H, W) as timm passes
        ``input_size[-2:]``); errors for other shapes, pooling and patch multiples."""
        if isinstance(img_size, (tuple, list)):
            if len(img_size) != 2 or img_size[0] != img_size[1]:
                raise ValueError(f"{model} takes square images, got img_size={tuple(img_size)}")
            img_size = img_size[0]
        if global_pool != "token":
            raise ValueError(f"only class-token pooling is supported, got global_pool={global_pool!r}")
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} not a multiple of patch_size {patch_size}")
        return int(img_size)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, 1 + N, C): class token first, position embedding added."""
        x = self.patch_embed(x)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1) + self.pos_embed

    def _blocks_taking(self, x: torch.Tensor, take: Sequence[int], stop: int) -> Tuple[torch.Tensor, List[TakenTokens]]:
        """Run blocks 0..``stop`` on embedded tokens ``x`` (B, 1 + N, C): (the tokens after block
        ``stop``, the tokens after each block in ``take`` with their patch positions)."""
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, 1 + N', C) normalised tokens, class token first."""
        x, _ = self._blocks_taking(self._embed(x), (), len(self.blocks) - 1)
        return self.norm(x)

    def _set_feature_info(self, patch_size: int) -> None:
        self.feature_info = feature_info(len(self.blocks), self.embed_dim, patch_size, "blocks")

    def _feature_depth(self) -> int:
        return len(self.blocks)

    def _intermediate_run(self, x: torch.Tensor, take: Sequence[int], stop: int, norm: bool):
        x, taken = self._blocks_taking(self._embed(x), take, stop)
        if norm:
            taken = [(self.norm(t), c, p) for t, c, p in taken]
        return self.norm(x), taken, None

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop the blocks after the last wanted one (and the norm / head): what
        ``features_only=True`` keeps. Returns the wanted block indices."""
        take, max_index = take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0)
        return take

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, L, C) tokens -> (B, num_classes) logits, or (B, C) pooled features."""
        x = self.head_drop(x[:, 0])
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) normalised images -> (B, num_classes) logits."""
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head

    def __prepare_scriptable__(self):
        refuse_script(self)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new (randomly initialised) head for ``num_classes`` (0: no head, features out)."""
        if global_pool not in (None, "token"):
            raise ValueError(f"only class-token pooling is supported, got global_pool={global_pool!r}")
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return {"pos_embed", "cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Parameter groups by layer for timm's layer-wise learning-rate decay."""
        return dict(
            stem=r"^cls_token|pos_embed|patch_embed",
            blocks=[(r"^blocks\.(\d+)", None), (r"^predictors\.(\d+)", None), (r"^norm", (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in backward (saves training memory)."""
        self.grad_checkpointing = enable

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict`` that also accepts timm / DeiT MLP names (fc1, fc2)."""
        return super().load_state_dict(rename_timm_keys(state_dict), strict=strict, assign=assign)


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------

# Fields that change the function or training behaviour but not the parameters.
RUNTIME_FIELDS = ("keep_ratio", "gamma_init", "drop_rate", "drop_path_rate", "semi_cross")
# How the P-blocks' tokens are chosen (only "predictor" has parameters).
SELECTORS = ("predictor", "cls_attn", "uniform", "random")


@dataclass
class BigLittleViTConfig:
    """Everything that defines a bLViT classifier. Layer indices are 0-based.

    The P-block width is the dense width (``embed_dim``, ``num_heads``); ``e_embed_dim`` is the
    E-block width (0: no E-blocks). ``blvit_layers`` are the big.LITTLE layers, all others are
    dense. A predictor runs at the input of each layer in ``predictor_layers``; its selection is
    reused until the next one. ``drop_path_rate`` drops whole layers per sample (stochastic
    depth, rising linearly from 0 at layer 0 to the rate at the last layer).
    """

    name: str = "b+t"
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    e_embed_dim: int = 192
    e_num_heads: int = 3
    e_mlp_ratio: float = 4.0
    blvit_layers: Tuple[int, ...] = tuple(range(1, 12))
    e_block_layers: Optional[Tuple[int, ...]] = None  # None: every big.LITTLE layer
    predictor_layers: Tuple[int, ...] = (1, 4, 7, 10)
    keep_ratio: float = 0.25
    gamma_init: float = 0.0
    fusion: str = "gated"
    router_score: str = "softmax"
    # Ablation switches (Table 3 of the paper; the defaults are the final model):
    # selector: "predictor" (learned), "cls_attn" (the class token's attention in the layer's
    # P-block, as Evo-ViT ranks tokens), "uniform" (a fixed evenly spaced set of patches) or
    # "random" (a new draw every forward pass); semi_cross: P-block queries read every token
    # (True) or only the selected ones (False).
    selector: str = "predictor"
    semi_cross: bool = True
    global_pool: str = "token"
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.img_size, (tuple, list)):  # timm passes input_size[-2:]
            if len(self.img_size) != 2 or self.img_size[0] != self.img_size[1]:
                raise ValueError(f"bLViT classifiers take square images, got img_size={tuple(self.img_size)}")
            self.img_size = self.img_size[0]
        self.img_size = int(self.img_size)
        for name in ("blvit_layers", "predictor_layers", "e_block_layers"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, tuple(sorted(int(v) for v in value)))
        if self.e_block_layers is None:
            self.e_block_layers = self.blvit_layers if self.e_embed_dim else ()
        self.validate()

    def validate(self) -> None:
        problems = layout_problems(self)
        if self.num_classes < 0:
            problems.append(f"num_classes {self.num_classes} must be >= 0")
        if self.global_pool != "token":
            problems.append(f"global_pool {self.global_pool!r}: only 'token' (class token) is supported")
        if self.selector not in SELECTORS:
            problems.append(f"selector {self.selector!r} not one of {SELECTORS}")
        if not 0.0 <= self.drop_rate < 1.0 or not 0.0 <= self.drop_path_rate < 1.0:
            problems.append(f"drop_rate {self.drop_rate} and drop_path_rate {self.drop_path_rate} must be in [0, 1)")
        if problems:
            raise ValueError(f"invalid bLViT classifier config {self.name!r}: " + "; ".join(problems))

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """Class token plus patches."""
        return 1 + self.grid_size**2

    @property
    def num_selected(self) -> int:
        """Tokens each P-block processes: the class token plus round(keep_ratio * patches)."""
        return tokens_kept_global(self.keep_ratio, self.num_tokens, 1)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def architecture(self) -> Dict[str, Any]:
        """The fields a checkpoint fixes (everything but the runtime knobs and the name)."""
        return {k: v for k, v in self.to_dict().items() if k not in RUNTIME_FIELDS and k != "name"}


_BLVIT_LAYOUT = dict(blvit_layers=tuple(range(1, 12)), predictor_layers=(1, 4, 7, 10), depth=12)
VARIANTS: Dict[str, Dict[str, Any]] = {
    # Paper's B+T: DeiT-B P-blocks (768, 12 heads), DeiT-T E-blocks (192, 3 heads).
    "b+t": dict(_BLVIT_LAYOUT, embed_dim=768, num_heads=12, e_embed_dim=192, e_num_heads=3),
    # S+T: DeiT-S P-blocks (384, 6 heads), DeiT-T E-blocks.
    "s+t": dict(_BLVIT_LAYOUT, embed_dim=384, num_heads=6, e_embed_dim=192, e_num_heads=3),
}
# The timm model whose checkpoint initialises each variant's dense layer and P-blocks.
DENSE_SOURCE = {"b+t": "deit_base_patch16_224", "s+t": "deit_small_patch16_224"}


def make_config(variant: str = "b+t", **overrides: Any) -> BigLittleViTConfig:
    """The named variant's config with ``overrides`` applied; unknown names are an error."""
    return variant_config(BigLittleViTConfig, VARIANTS, variant, "bLViT classifier", overrides)


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


def class_token_attention(q_cls: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The class token's softmax attention row, averaged over heads (float32): q_cls (B, h, 1, d)
    unscaled, k (B, h, L, d) -> (B, L). What EViT, Evo-ViT and the class-attention selector rank by."""
    logits = (q_cls * q_cls.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, h, 1, L)
    return logits.float().softmax(dim=-1).mean(dim=1)[:, 0]


def class_attention(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The class token's attention to every token, averaged over heads, with ``attn``'s query and
    key projections (one query row: O(N C^2) for the keys). x (B, 1 + N, C) normalised -> (B, 1 + N)."""
    b, n, _ = x.shape
    d, h = attn.attn_dim, attn.num_heads
    weight, bias = attn.qkv.weight, attn.qkv.bias
    q = F.linear(x[:, :1], weight[:d], None if bias is None else bias[:d]).view(b, 1, h, d // h).transpose(1, 2)
    k = F.linear(x, weight[d:2 * d], None if bias is None else bias[d:2 * d]).view(b, n, h, d // h).transpose(1, 2)
    return class_token_attention(q, k)


class BigLittleViT(ClassTokenViT):
    """The bLViT image classifier (timm interface).

    (B, in_chans, img_size, img_size) normalised images -> (B, num_classes) logits.
    ``forward_features``: -> (B, 1 + N, C) normalised tokens (class token first, all N patches:
    big.LITTLE layers update the selected tokens with the P-block and every token with the
    E-block, so no token is dropped). ``forward_head``: -> (B, num_classes) from the class token.
    """

    def __init__(self, config: BigLittleViTConfig) -> None:
        super().__init__(config.img_size, config.patch_size, config.in_chans, config.embed_dim)
        self.config = config
        # Set True to keep the last forward's selections in ``last_selections`` (plots, tests).
        self.record_selections = False
        self.last_selections: Dict[int, TokenSelection] = {}
        common = dict(dim=config.embed_dim, num_heads=config.num_heads, mlp_ratio=config.mlp_ratio,
                      qkv_bias=config.qkv_bias)
        self.blocks = nn.ModuleList(layout_block(config, i, **common) for i in range(config.depth))
        learned = config.selector == "predictor"
        self.predictors = nn.ModuleDict({str(i): TokenPredictor(config.embed_dim) for i in config.predictor_layers
                                         if learned})
        self._set_feature_info(config.patch_size)
        self._init_head(config.num_classes, config.drop_rate)
        depth = max(1, config.depth - 1)
        self.layer_drop_rates = [config.drop_path_rate * i / depth for i in range(config.depth)]
        self.init_weights()

    @property
    def keep_ratio(self) -> float:
        return self.config.keep_ratio

    @keep_ratio.setter
    def keep_ratio(self, value: float) -> None:
        if not 0.0 < value <= 1.0:
            raise ValueError(f"keep_ratio {value} must be in (0, 1]")
        self.config.keep_ratio = float(value)

    @staticmethod
    def is_new_parameter(key: str) -> bool:
        """E-blocks, gammas and predictors: a dense DeiT checkpoint cannot provide them."""
        return ".e_block." in key or ".gamma_" in key or key.startswith("predictors.")

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """pos_embed, cls_token and every gamma."""
        gammas = {name for name, _ in self.named_parameters() if ".gamma_" in name}
        return super().no_weight_decay() | gammas

    def forward_features_with_selections(self, x: torch.Tensor) -> Tuple[torch.Tensor, Dict[int, TokenSelection]]:
        """Like ``forward_features``, also returning the selection made at each predictor layer.

        Each ``TokenSelection.flat_index`` is (B, K) positions in the (1 + N)-token sequence,
        K = ``config.num_selected``, the class token (position 0) always among them.
        """
        selections: Dict[int, TokenSelection] = {}
        x, _ = self._run_blocks(self._embed(x), (), len(self.blocks) - 1, selections)
        return self.norm(x), selections

    def _run_blocks(self, x: torch.Tensor, take: Sequence[int], stop: int,
                    selections: Dict[int, TokenSelection]) -> Tuple[torch.Tensor, List[TakenTokens]]:
        """Blocks 0..``stop`` on (B, 1 + N, C) tokens; no token is dropped, so all stay in place."""
        cfg = self.config
        selection: Optional[TokenSelection] = None
        taken: List[TakenTokens] = []
        for i, block in enumerate(self.blocks):
            if i > stop:
                break
            if i in cfg.predictor_layers:
                selection = self._select(i, block, x)
                selections[i] = selection
            if self.grad_checkpointing and torch.is_grad_enabled():
                out = checkpoint(block, x, None, selection, use_reentrant=False)
            else:
                out = block(x, None, selection)
            x = drop_layer(x, out, self.layer_drop_rates[i], self.training)
            if i in take:
                taken.append((x, 0, None))
        return x, taken

    def _select(self, layer: int, block: nn.Module, x: torch.Tensor) -> TokenSelection:
        """The selection made at predictor layer ``layer`` from its input tokens (B, 1 + N, C).

        The token count is static (no token is dropped): k never reads a shape (fx / jit.trace).
        Without the learned predictor the P-block's output is not scaled (scores 0, probs 1)."""
        cfg = self.config
        num_tokens = 1 + self.patch_embed.num_patches
        if cfg.selector == "predictor":
            logits = self.predictors[str(layer)](x)  # (B, 1 + N)
            return select_global(logits, cfg.keep_ratio, self.num_prefix_tokens, cfg.router_score, num_tokens=num_tokens)
        with torch.no_grad():
            if cfg.selector == "cls_attn":
                logits = class_attention(block.attn, block.norm1(x))  # (B, 1 + N), class token first
            elif cfg.selector == "random":
                logits = torch.rand(x.shape[0], num_tokens, device=x.device)
            else:  # uniform: evenly spaced patches, the same for every image
                k = tokens_kept_global(cfg.keep_ratio, num_tokens, self.num_prefix_tokens) - self.num_prefix_tokens
                picks = torch.linspace(0, num_tokens - 2, k, device=x.device).round().long() + 1
                logits = torch.zeros(x.shape[0], num_tokens, device=x.device).index_fill_(1, picks, 1.0)
            selection = select_global(logits, cfg.keep_ratio, self.num_prefix_tokens, "softmax", num_tokens=num_tokens)
        return dataclasses.replace(selection, scores=torch.zeros_like(selection.scores),
                                   probs=torch.ones_like(selection.probs))

    def _blocks_taking(self, x: torch.Tensor, take: Sequence[int], stop: int) -> Tuple[torch.Tensor, List[TakenTokens]]:
        selections: Dict[int, TokenSelection] = {}
        x, taken = self._run_blocks(x, take, stop, selections)
        if self.record_selections:
            self.last_selections = selections
        return x, taken

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Strict loading of a dense DeiT state dict gets a pointer to ``dense_checkpoint=``."""
        new = [k for k in self.state_dict() if self.is_new_parameter(k)]
        if strict and new and not any(self.is_new_parameter(k) for k in rename_timm_keys(state_dict)):
            raise CheckpointError(
                "this state dict has no E-block, gamma or predictor entries: it looks like a dense "
                "DeiT / ViT checkpoint, not a bLViT one; load it with dense_checkpoint= "
                "(timm.create_model) or blvit.models.load_dense_checkpoint"
            )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------

FORMAT = "blvit-vit"
FORMAT_VERSION = 1


def describe_state(state: Mapping[str, torch.Tensor]) -> str:
    """'embed_dim 768, depth 12, 1000 classes' from a ViT state dict (for error messages)."""
    token = state.get("pos_embed", state.get("cls_token"))
    width = token.shape[-1] if token is not None else "?"
    indices = {int(k.split(".")[1]) for k in state if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    head = state.get("head.weight")
    classes = f", {head.shape[0]} classes" if head is not None else ""
    return f"embed_dim {width}, depth {max(indices) + 1 if indices else 0}{classes}"


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: ClassTokenViT) -> Dict[str, torch.Tensor]:
    """timm-style filter: a DeiT / timm ViT state dict -> this toolkit's classifier keys.

    Accepts timm's plain state dict (``blocks.0.mlp.fc1.weight``, ...) and the original DeiT
    ``.pth`` (the same names under ``"model"``); maps fc1/fc2 to lin1/lin2, drops a DDP
    ``module.`` prefix, resamples ``pos_embed`` (bicubic) to the model's grid when only the grid
    differs, and drops ``head.*`` when the class count differs from the model's (fine-tuning
    on another label set). Everything else passes through unchanged, so a checkpoint of another
    architecture still shows its own keys to the loader that reports it.
    """
    for key in ("model", "state_dict"):
        if isinstance(state_dict.get(key), Mapping):
            state_dict = state_dict[key]
            break
    out = rename_timm_keys(state_dict)
    pos = out.get("pos_embed")
    own_pos = model.pos_embed
    if (
        isinstance(pos, torch.Tensor) and pos.dim() == 3 and pos.shape[-1] == own_pos.shape[-1]
        and pos.shape[1] != own_pos.shape[1]
    ):
        patches = pos.shape[1] - model.num_prefix_tokens
        side = math.isqrt(max(patches, 0))
        if side * side == patches:
            logger.info("resampling pos_embed from a %dx%d to a %s grid", side, side, model.patch_embed.grid_size)
            out["pos_embed"] = resample_abs_pos_embed(
                pos, list(model.patch_embed.grid_size), num_prefix_tokens=model.num_prefix_tokens
            )
    head = out.get("head.weight")
    if isinstance(head, torch.Tensor) and head.dim() == 2 and head.shape[0] != model.num_classes:
        logger.info("checkpoint head has %d classes, model %d: head left at its initialisation",
                    head.shape[0], model.num_classes)
        out.pop("head.weight")
        out.pop("head.bias", None)
    return out


def _read_vit_state(path: PathLike) -> Dict[str, torch.Tensor]:
    """A checkpoint's state dict with timm key names mapped; refuses files with no ViT blocks."""
    state = unwrap_state_dict(read_checkpoint(path), path)
    if not any(k.startswith("blocks.") for k in rename_timm_keys(state)):
        is_sam = any(k.startswith("image_encoder.") for k in state)
        what = "a SAM checkpoint" if is_sam else "not a ViT / DeiT checkpoint"
        raise CheckpointError(
            f"{path}: {what}: no 'blocks.*' keys (first keys: {listing(list(state)[:6])}); "
            "a DeiT checkpoint (timm state dict or facebookresearch/deit .pth) is needed"
        )
    return state


def load_dense_checkpoint(model: ClassTokenViT, path: PathLike, source: Optional[str] = None,
                          filter_fn: Optional[Any] = None) -> List[str]:
    """Initialise a classifier from a DeiT checkpoint (timm state dict or ``{"model": ...}``).

    Patch embedding, class token, position embedding, every dense layer and P-block, ``norm``
    and ``head`` take the checkpoint's weights; E-blocks, gammas and predictors keep their
    initialisation. A file of another architecture or width raises a ``CheckpointError``
    naming the path and the offending keys and shapes. Returns the keys left at initialisation.
    """
    state = (filter_fn or checkpoint_filter_fn)(_read_vit_state(path), model)
    hint = f" (checkpoint: {describe_state(state)}; model: {describe_state(model.state_dict())}"
    hint += f"; this model needs a {source} checkpoint)" if source else ")"
    head_dropped = "head.weight" not in state

    def may_be_missing(key: str) -> bool:
        return model.is_new_parameter(key) or (head_dropped and key.startswith("head."))

    kept = load_checked(model, state, path, f"{type(model).__name__}", may_be_missing, hint)
    logger.info("loaded %s; %d tensors keep their initialisation", path, len(kept))
    return kept


def load_e_blocks_from_deit(model: BigLittleViT, path: PathLike) -> Dict[str, List[str]]:
    """Initialise the E-blocks' inner MLPs from a DeiT of the E width (DeiT-T for B+T / S+T).

    The E-block of layer i takes layer i's ``mlp.fc1`` / ``mlp.fc2`` (c -> 4c -> c: the same
    shapes and role). Its ``C -> 3c`` qkv, ``c -> C`` projection and the MLP's ``down`` / ``up``
    mappings have no counterpart in a width-c model and keep their initialisation; the
    returned ``kept`` list names them. Returns {"loaded": [...], "kept": [...]}.
    """
    config = model.config
    source = rename_timm_keys(_read_vit_state(path))
    width = source.get("pos_embed", source.get("cls_token"))
    if width is None or width.shape[-1] != config.e_embed_dim:
        raise CheckpointError(
            f"{path}: E-blocks are {config.e_embed_dim} wide but this checkpoint is {describe_state(source)}"
        )
    depth = len({k.split(".")[1] for k in source if k.startswith("blocks.")})
    if depth != config.depth:
        raise CheckpointError(f"{path}: has {depth} layers; E-blocks are taken layer for layer from a model "
                              f"of the same depth ({config.depth})")
    loaded, kept = [], []
    with torch.no_grad():
        for layer in config.e_block_layers:
            e_block = model.blocks[layer].e_block
            for name, param in e_block.named_parameters():
                src_key = f"blocks.{layer}.{name}"
                target = f"blocks.{layer}.e_block.{name}"
                if name.startswith("mlp.lin") and src_key in source:
                    if source[src_key].shape != param.shape:
                        raise CheckpointError(f"{path}: {src_key} {tuple(source[src_key].shape)} does not fit "
                                              f"{target} {tuple(param.shape)}")
                    param.copy_(source[src_key])
                    loaded.append(f"{target} <- {src_key}")
                else:
                    kept.append(target)
    logger.info("E-blocks from %s: %d tensors loaded, %d kept at initialisation", path, len(loaded), len(kept))
    return {"loaded": loaded, "kept": kept}


def save_blvit_checkpoint(model: BigLittleViT, path: PathLike, extra: Optional[Dict[str, Any]] = None) -> None:
    """Write ``{"format", "version", "config", "model": state_dict}`` atomically.

    timm's ``create_model(..., checkpoint_path=path)`` reads the ``"model"`` entry of this file.
    """
    payload = {"format": FORMAT, "version": FORMAT_VERSION, "config": model.config.to_dict(),
               "model": model.state_dict()}
    payload.update(extra or {})
    atomic_save(payload, path)


def load_blvit_checkpoint(model: BigLittleViT, path: PathLike) -> Dict[str, Any]:
    """Load a checkpoint of this toolkit into a matching model (architecture checked first).
    A plain state dict of the model is accepted too. Returns the file's contents."""
    obj = read_checkpoint(path)
    if "config" in obj:
        if obj.get("format") != FORMAT:
            raise CheckpointError(
                f"{path}: format {obj.get('format')!r}, not a bLViT classifier checkpoint ({FORMAT!r})"
            )
        stored = BigLittleViTConfig(**obj["config"])
        wanted = model.config.architecture()
        diff = [
            f"{k}: checkpoint {v!r} vs model {wanted[k]!r}" for k, v in stored.architecture().items() if wanted[k] != v
        ]
        if diff:
            raise CheckpointError(
                f"{path}: saved for bLViT {stored.name!r}, which differs from the model: " + "; ".join(diff)
            )
    state = rename_timm_keys(unwrap_state_dict(obj, path))
    load_checked(model, state, path, f"bLViT classifier {model.config.name!r}", lambda key: False,
                  f" (checkpoint: {describe_state(state)}; model: {describe_state(model.state_dict())})")
    return obj


# ----------------------------------------------------------------------------------------------
# FLOPs
# ----------------------------------------------------------------------------------------------


def analytic_classifier_macs(config: BigLittleViTConfig) -> Dict[str, float]:
    """Multiply-accumulates of a ``BigLittleViTConfig`` classifier as this toolkit computes it.

    T = 1 + N tokens, K = ``config.num_selected``, width C, E width c, MLP ratios r, r_e:

    - dense layer: ``4 T C^2 + 2 T^2 C + 2 r T C^2``
    - P-block: ``K C^2 (Q) + 2 T C^2 (K, V) + 2 K T C + K C^2 (proj) + 2 r K C^2`` (T -> K in
      the K, V and attention terms without semi-cross attention)
    - E-block: ``3 T C c + 2 T^2 c + T c C + 2 T C c + 2 r_e T c^2``
    - predictor ``T C`` (class-attention selection ``C^2 + T C^2 + T C``; uniform / random 0), patch embedding ``N C in_chans p^2``, head ``C num_classes``.

    Returns {"total", "layers", "patch_embed", "predictors", "head"}.
    """
    t, c, r = config.num_tokens, config.embed_dim, config.mlp_ratio
    k = config.num_selected
    layers = 0.0
    for i in range(config.depth):
        if i not in config.blvit_layers:
            layers += 4 * t * c * c + 2 * t * t * c + 2 * r * t * c * c
            continue
        reads = t if config.semi_cross else k  # tokens the selected queries attend to
        layers += k * c * c + 2 * reads * c * c + 2 * k * reads * c + k * c * c + 2 * r * k * c * c
        if i in config.e_block_layers:
            e = config.e_embed_dim
            layers += 3 * t * c * e + 2 * t * t * e + t * e * c + 2 * t * c * e + 2 * config.e_mlp_ratio * t * e * e
    patch = (t - 1) * c * config.in_chans * config.patch_size**2
    per_predictor = {"predictor": t * c, "cls_attn": c * c + t * c * c + t * c}.get(config.selector, 0)
    predictors = len(config.predictor_layers) * per_predictor
    head = c * config.num_classes
    return {"total": layers + patch + predictors + head, "layers": layers, "patch_embed": patch,
            "predictors": predictors, "head": head}


def classifier_macs(model: Union[nn.Module, str], img_size: Optional[int] = None, **create_kwargs: Any) -> int:
    """Multiply-accumulates of one forward pass on one image, counted with ``FlopCounterMode``
    on the meta device (shapes only: a DeiT-B is counted in well under a second).

    Args:
        model: a module (its parameters are swapped for meta tensors for the count, nothing is
            copied or changed), or a timm model name (built on the meta device with
            ``create_kwargs``, e.g. ``keep_ratio=0.25``).
        img_size: input side; default: the model's own (224 for a timm name).
    """
    if isinstance(model, str):
        if img_size is not None:
            create_kwargs["img_size"] = img_size
        model = _flops.timm_model_on_meta(model, **create_kwargs)
    patch_embed = getattr(model, "patch_embed", None)
    if img_size is None:
        size = getattr(patch_embed, "img_size", 224)
        img_size = size[0] if isinstance(size, (tuple, list)) else int(size)
    in_chans = getattr(patch_embed, "in_chans", 3)
    return _flops.module_macs_on_meta(model, (1, in_chans, img_size, img_size))


# ----------------------------------------------------------------------------------------------
# timm registration
# ----------------------------------------------------------------------------------------------


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    """DeiT's data config: ImageNet mean/std, 224 x 224 input, bicubic, and the crop of DeiT's
    released eval (facebookresearch/deit datasets.py: resize 256, centre crop 224, crop_pct 0.875;
    timm's own DeiT config says 0.9), the protocol of the numbers these models are compared with."""
    return {
        "url": "",
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None,
        "crop_pct": 0.875, "interpolation": "bicubic", "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj", "classifier": "head",
        "license": "apache-2.0",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "blvit_base_tiny_patch16_224": _cfg(),
    "blvit_small_tiny_patch16_224": _cfg(),
})


# The DeiT layouts the token-reduction baselines (EViT, DynamicViT) are built on.
DEIT_ARCHS: Dict[str, Dict[str, int]] = {
    "deit_base_patch16_224": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "deit_small_patch16_224": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
}


def create_deit_variant(cls: type, name: str, source: str, pretrained: bool = False, filter_fn: Any = None,
                        **kwargs: Any) -> nn.Module:
    """A DeiT-shaped baseline ``cls`` in the layout of the DeiT model ``source``, through timm's
    ``build_model_with_cfg``; ``dense_checkpoint=`` a DeiT file of that size (timm state dict or
    DeiT ``.pth``) initialises every parameter it has (``cls.is_new_parameter`` names the rest).
    ``filter_fn``: the model's own key mapping (default :func:`checkpoint_filter_fn`)."""
    dense_checkpoint = kwargs.pop("dense_checkpoint", None)
    if pretrained:
        raise ValueError(f"no pretrained weights are published for {name}; pass dense_checkpoint=<{source} .pth>")
    out_indices = kwargs.pop("out_indices", 3)  # features_only: the last 3 blocks, as timm's ViTs
    model = build_model_with_cfg(
        cls, name, pretrained=False, pretrained_filter_fn=filter_fn or checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **dict(DEIT_ARCHS[source], **kwargs)
    )
    if dense_checkpoint is not None:
        load_dense_checkpoint(model, dense_checkpoint, source, filter_fn)
    return model


def is_p_block_key(model: BigLittleViT, key: str) -> bool:
    """A P-block parameter: the dense part of a big.LITTLE layer (not its E-block or gammas)."""
    parts = key.split(".")
    return (len(parts) > 2 and parts[0] == "blocks" and int(parts[1]) in model.config.blvit_layers
            and not model.is_new_parameter(key))


def _build(variant: str, **kwargs: Any) -> BigLittleViT:
    return BigLittleViT(make_config(variant, **kwargs))


def _create_blvit(name: str, variant: str, pretrained: bool = False, **kwargs: Any) -> BigLittleViT:
    """Build through timm's ``build_model_with_cfg`` (pretrained_cfg, traits), then load weights.

    Extra keyword arguments: ``dense_checkpoint`` (a DeiT file for the dense layer and P-blocks),
    ``p_blocks_from_dense`` (False: the P-blocks keep their random initialisation, the ablation),
    ``e_checkpoint`` (a DeiT file of the E width for the E-blocks' inner MLPs), and any
    ``BigLittleViTConfig`` field (``keep_ratio``, ``gamma_init``, ``e_embed_dim``, ...).
    """
    dense_checkpoint = kwargs.pop("dense_checkpoint", None)
    e_checkpoint = kwargs.pop("e_checkpoint", None)
    p_blocks_from_dense = kwargs.pop("p_blocks_from_dense", True)
    if pretrained:
        raise ValueError(
            f"no pretrained weights are published for {name}; initialise it from DeiT with "
            f"dense_checkpoint=<{DENSE_SOURCE[variant]} .pth>, or load a bLViT checkpoint with checkpoint_path="
        )
    out_indices = kwargs.pop("out_indices", 3)  # features_only: the last 3 blocks, as timm's ViTs
    model = build_model_with_cfg(
        partial(_build, variant), name, pretrained=False, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **kwargs
    )
    if dense_checkpoint is not None:
        # the ablation "P-blocks from scratch": everything else of the dense model is loaded
        fresh = {} if p_blocks_from_dense else {k: v.clone() for k, v in model.state_dict().items() if is_p_block_key(model, k)}
        load_dense_checkpoint(model, dense_checkpoint, DENSE_SOURCE[variant])
        if fresh:
            model.load_state_dict(fresh, strict=False)
            logger.info("p_blocks_from_dense=False: %d P-block tensors keep their random initialisation", len(fresh))
    if e_checkpoint is not None:
        load_e_blocks_from_deit(model, e_checkpoint)
    return model


@register_model
def blvit_base_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> BigLittleViT:
    """bLViT B+T: DeiT-B P-blocks, DeiT-T E-blocks, keep ratio 0.25 by default."""
    return _create_blvit("blvit_base_tiny_patch16_224", "b+t", pretrained, **kwargs)


@register_model
def blvit_small_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> BigLittleViT:
    """bLViT S+T: DeiT-S P-blocks, DeiT-T E-blocks, keep ratio 0.25 by default."""
    return _create_blvit("blvit_small_tiny_patch16_224", "s+t", pretrained, **kwargs)
