"""Configuration of the bLViT-SAM image encoder and the named variants."""
from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional, Tuple

from blvit.layout import layout_problems, variant_config

# Fields that change the function but not the parameters: a checkpoint may be used with others.
RUNTIME_FIELDS = ("keep_ratio", "gamma_init")


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

    def __post_init__(self) -> None:
        for name in ("global_attn_indexes", "blvit_layers", "predictor_layers", "e_block_layers"):
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
        if problems:
            raise ValueError(f"invalid bLViT-SAM config {self.name!r}: " + "; ".join(problems))

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def is_dense(self) -> bool:
        return not self.blvit_layers

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
    # This toolkit's dense encoders (SDPA attention) in the stock SAM layouts.
    "vit_b": dict(_VIT_B, **_DENSE),
    "vit_l": dict(_VIT_L, **_DENSE),
    "vit_h": dict(_VIT_H, **_DENSE),
}

# The stock SAM model whose encoder each variant's P-blocks come from.
DENSE_SOURCE = {"b+t": "vit_b", "h+b": "vit_h", "vit_b": "vit_b", "vit_l": "vit_l", "vit_h": "vit_h"}


def make_config(variant: str = "b+t", **overrides: Any) -> BigLittleSamConfig:
    """The named variant's config with ``overrides`` applied; unknown names are an error."""
    return variant_config(BigLittleSamConfig, VARIANTS, variant, "bLViT-SAM", overrides)
