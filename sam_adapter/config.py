"""Configuration of the bLViT-SAM image encoder and the named variants."""
from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, List, Optional, Tuple

from blvit.layout import layout_problems, variant_config

# Fields that change the function but not the parameters: a checkpoint may be used with others.
RUNTIME_FIELDS = ("keep_ratio", "gamma_init", "merge_r")
# Token-reduction baselines on the dense layout (sam_adapter/token_reduction.py); "" = bLViT / dense.
REDUCTIONS = ("", "evit", "evovit", "tome")


@dataclass
class BigLittleSamConfig:
    """Everything that defines a bLViT-SAM image encoder. Layer indices are 0-based.

    The P-block width is the dense SAM width (``embed_dim``); ``e_embed_dim`` is the E-block
    width (0: no E-blocks). ``blvit_layers`` are the big.LITTLE layers, all others are dense.
    A predictor runs at the input of each layer in ``predictor_layers`` and its selection is
    reused until the next one.
    """

    name: str = "b+t"
    img_size: int = 1024
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    global_attn_indexes: Tuple[int, ...] = (2, 5, 8, 11)
    window_size: int = 14
    out_chans: int = 256
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
    # token-reduction baselines (dense layout, no big.LITTLE layers): "evit" / "evovit" keep
    # keep_ratio of each window's tokens from reduction_layers on, "tome" merges merge_r tokens
    # per window in every layer from min(reduction_layers); score_momentum: Evo-ViT's running score
    reduction: str = ""
    reduction_layers: Tuple[int, ...] = ()
    merge_r: int = 0
    score_momentum: float = 0.5

    def __post_init__(self) -> None:
        for name in ("global_attn_indexes", "blvit_layers", "predictor_layers", "e_block_layers", "reduction_layers"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, tuple(sorted(int(v) for v in value)))
        if self.e_block_layers is None:
            self.e_block_layers = self.blvit_layers if self.e_embed_dim else ()
        self.validate()

    def validate(self) -> None:
        problems = layout_problems(self)
        bad = [i for i in self.global_attn_indexes if not 0 <= i < self.depth]
        if bad:
            problems.append(f"global_attn_indexes {bad} outside 0..{self.depth - 1}")
        if self.reduction not in REDUCTIONS:
            problems.append(f"reduction {self.reduction!r} not one of {REDUCTIONS}")
        elif self.reduction:
            if self.blvit_layers:
                problems.append(f"reduction {self.reduction!r} runs on the dense layout: blvit_layers must be empty")
            if not self.reduction_layers or not all(0 <= i < self.depth for i in self.reduction_layers):
                problems.append(f"reduction_layers {self.reduction_layers} must be non-empty, in 0..{self.depth - 1}")
            if self.reduction == "evovit" and min(self.reduction_layers or (0,)) == 0:
                problems.append("evovit needs reduction_layers to start after layer 0 (its scores come from the layer before)")
            if self.merge_r < 0:
                problems.append(f"merge_r {self.merge_r} must be >= 0")
            if not 0.0 <= self.score_momentum < 1.0:
                problems.append(f"score_momentum {self.score_momentum} must be in [0, 1)")
        if (self.blvit_layers or self.reduction) and self.window_size < 1:
            # stock SAM reads window_size 0 as "every layer global"; routing and reduction pick per window
            problems.append(f"window_size {self.window_size} must be >= 1 for big.LITTLE layers and token "
                            "reduction (they select tokens per window; list global layers in global_attn_indexes)")
        problems += self._unused_fields()
        if problems:
            raise ValueError(f"invalid bLViT-SAM config {self.name!r}: " + "; ".join(problems))

    def _unused_fields(self) -> List[str]:
        """Fields set away from their default where this layout never reads them (a typo'd
        experiment would otherwise run the default silently). keep_ratio is left out: callers
        pass one for every variant, and the dense and ToMe layouts ignore it by design."""
        unused = []
        if not self.blvit_layers:
            unused += ["fusion", "router_score", "e_num_heads", "e_mlp_ratio"]
        if self.reduction != "tome":
            unused.append("merge_r")
        if self.reduction != "evovit":
            unused.append("score_momentum")
        if not self.reduction:
            unused.append("reduction_layers")
        defaults = {f.name: f.default for f in fields(self)}
        return [f"{name}={getattr(self, name)!r} has no effect on this layout ("
                + (f"reduction {self.reduction!r}" if self.reduction else "bLViT" if self.blvit_layers else "dense")
                + ")" for name in unused if getattr(self, name) != defaults[name]]

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def is_dense(self) -> bool:
        return not self.blvit_layers and not self.reduction

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def architecture(self) -> Dict[str, Any]:
        """The fields a checkpoint fixes (everything but the runtime knobs)."""
        return {k: v for k, v in self.to_dict().items() if k not in RUNTIME_FIELDS and k != "name"}


_VIT_B = dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11))
_VIT_L = dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23))
_VIT_H = dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31))
_DENSE = dict(e_embed_dim=0, blvit_layers=(), predictor_layers=(), e_block_layers=())

VARIANTS: Dict[str, Dict[str, Any]] = {
    # Paper's B+T: layer 0 dense ViT-B, layers 1-11 big.LITTLE (ViT-B P-blocks, ViT-T E-blocks),
    # predictors before layers 1, 4, 7, 10 ("after layers 1, 4, 7, 10" counted from 1).
    "b+t": dict(
        _VIT_B, e_embed_dim=192, e_num_heads=3, blvit_layers=tuple(range(1, 12)),
        predictor_layers=(1, 4, 7, 10),
    ),
    # Paper's H+B: layers 0-8 dense ViT-H, 9-31 big.LITTLE; ViT-B E-blocks on every second
    # big.LITTLE layer (9, 11, ..., 31: 12 of them); predictors after layers 8, 16, 24 (0-based).
    "h+b": dict(
        _VIT_H, e_embed_dim=768, e_num_heads=12, blvit_layers=tuple(range(9, 32)),
        e_block_layers=tuple(range(9, 32, 2)), predictor_layers=(9, 17, 25),
    ),
    # Token-reduction baselines of the paper's Table 2 on SAM's own layouts (docs/method.md,
    # "Token reduction on SAM"); the defaults give about the encoder FLOPs of B+T / H+B at 1024.
    # EViT: reduce where EViT does in DeiT-B (before blocks 4, 7, 10 of 12) and where H+B's
    # predictors sit in ViT-H; Evo-ViT: slow-fast from H+B's / EViT's first reduced layer;
    # ToMe: merge in every layer.
    "evit-b": dict(_VIT_B, **_DENSE, reduction="evit", reduction_layers=(3, 6, 9), keep_ratio=0.6),
    # measured at 1024 (blvit-flops): evit-b 0.594, evovit-b 0.628, tome-b 0.593 of dense ViT-B
    # (B+T: 0.605); evit-h 0.781, evovit-h 0.797, tome-h 0.782 of dense ViT-H (H+B: 0.789)
    "evit-h": dict(_VIT_H, **_DENSE, reduction="evit", reduction_layers=(9, 17, 25), keep_ratio=0.75),
    "evovit-b": dict(_VIT_B, **_DENSE, reduction="evovit", reduction_layers=(3,), keep_ratio=0.4),
    "evovit-h": dict(_VIT_H, **_DENSE, reduction="evovit", reduction_layers=(9,), keep_ratio=0.6),
    "tome-b": dict(_VIT_B, **_DENSE, reduction="tome", reduction_layers=(0,), merge_r=15),
    "tome-h": dict(_VIT_H, **_DENSE, reduction="tome", reduction_layers=(0,), merge_r=4),
    # This toolkit's dense encoders (SDPA attention) in the stock SAM layouts.
    "vit_b": dict(_VIT_B, **_DENSE),
    "vit_l": dict(_VIT_L, **_DENSE),
    "vit_h": dict(_VIT_H, **_DENSE),
}

# The stock SAM model whose encoder each variant's P-blocks come from.
DENSE_SOURCE = {"b+t": "vit_b", "h+b": "vit_h", "vit_b": "vit_b", "vit_l": "vit_l", "vit_h": "vit_h",
                "evit-b": "vit_b", "evit-h": "vit_h", "evovit-b": "vit_b", "evovit-h": "vit_h",
                "tome-b": "vit_b", "tome-h": "vit_h"}


def make_config(variant: str = "b+t", **overrides: Any) -> BigLittleSamConfig:
    """The named variant's config with ``overrides`` applied; unknown names are an error."""
    return variant_config(BigLittleSamConfig, VARIANTS, variant, "bLViT-SAM", overrides)
