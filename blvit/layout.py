"""Checks every big.LITTLE layout shares (the SAM encoder's and the classifier's configs)."""
from dataclasses import fields
from typing import Any, Dict, List, Mapping

from .blocks import FUSIONS
from .routing import ROUTER_SCORES


def layout_problems(cfg: Any) -> List[str]:
    """What is wrong with a config's depth, layer lists, widths, keep ratio and routing options
    (fields: depth, blvit_layers, predictor_layers, e_block_layers, e_embed_dim, e_num_heads,
    embed_dim, num_heads, img_size, patch_size, keep_ratio, fusion, router_score)."""
    problems = []
    for name in ("blvit_layers", "predictor_layers", "e_block_layers"):
        bad = [i for i in getattr(cfg, name) if not 0 <= i < cfg.depth]
        if bad:
            problems.append(f"{name} {bad} outside 0..{cfg.depth - 1}")
    if not set(cfg.predictor_layers) <= set(cfg.blvit_layers):
        problems.append(f"predictor_layers {cfg.predictor_layers} must be big.LITTLE layers {cfg.blvit_layers}")
    if cfg.blvit_layers and min(cfg.blvit_layers) not in cfg.predictor_layers:
        problems.append(f"the first big.LITTLE layer {min(cfg.blvit_layers)} needs a predictor")
    if not set(cfg.e_block_layers) <= set(cfg.blvit_layers):
        problems.append(f"e_block_layers {cfg.e_block_layers} must be big.LITTLE layers")
    if cfg.e_block_layers and not cfg.e_embed_dim:
        problems.append("e_block_layers given but e_embed_dim is 0")
    if not 0.0 < cfg.keep_ratio <= 1.0:
        problems.append(f"keep_ratio {cfg.keep_ratio} must be in (0, 1]")
    if cfg.embed_dim % cfg.num_heads:
        problems.append(f"embed_dim {cfg.embed_dim} not divisible by num_heads {cfg.num_heads}")
    if cfg.e_embed_dim and cfg.e_embed_dim % cfg.e_num_heads:
        problems.append(f"e_embed_dim {cfg.e_embed_dim} not divisible by e_num_heads {cfg.e_num_heads}")
    if cfg.img_size % cfg.patch_size:
        problems.append(f"img_size {cfg.img_size} not a multiple of patch_size {cfg.patch_size}")
    if cfg.fusion not in FUSIONS:
        problems.append(f"fusion {cfg.fusion!r} not one of {FUSIONS}")
    if cfg.router_score not in ROUTER_SCORES:
        problems.append(f"router_score {cfg.router_score!r} not one of {ROUTER_SCORES}")
    return problems


def variant_config(config_cls: type, variants: Mapping[str, Dict[str, Any]], variant: str, label: str,
                   overrides: Mapping[str, Any]) -> Any:
    """``config_cls`` for the named variant with ``overrides`` applied (the SAM encoder's and the
    classifier's ``make_config``); an unknown variant or key is an error listing the valid ones."""
    if variant not in variants:
        raise ValueError(f"unknown {label} variant {variant!r}; known: {sorted(variants)}")
    keys = [f.name for f in fields(config_cls)]
    unknown = sorted(set(overrides) - set(keys))
    if unknown:
        raise ValueError(f"unknown {label} config key(s) {unknown}; valid keys: {keys}")
    values = dict(variants[variant], name=variant)
    values.update(overrides)
    return config_cls(**values)
