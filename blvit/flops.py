"""FLOP counting with ``torch.utils.flop_counter.FlopCounterMode``.

Counting runs on the ``meta`` device by default: shapes only, no arithmetic, so a ViT-H at
1024 x 1024 is counted in about a second on any machine. On real CPU tensors PyTorch routes
SDPA to ``_scaled_dot_product_flash_attention_for_cpu``, for which torch ships no formula (it
would count attention as 0); it is registered here.
"""
from typing import Any, Callable, Dict, Tuple

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula, sdpa_flop_count

_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
if _CPU_FLASH is not None and _CPU_FLASH not in flop_registry:

    @register_flop_formula(_CPU_FLASH)
    def _cpu_flash_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)


def count_flops(module: nn.Module, *inputs: torch.Tensor) -> int:
    """FLOPs (2 per multiply-accumulate) of one forward pass of ``module(*inputs)``."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*inputs)
    return int(counter.get_total_flops())


def count_macs_on_meta(build: Callable[[], nn.Module], input_shape: Tuple[int, ...]) -> int:
    """Multiply-accumulates of ``build()`` on an input of ``input_shape``, counted on ``meta``."""
    with torch.device("meta"):
        module = build().eval()
        x = torch.zeros(input_shape)
    return count_flops(module, x) // 2


def analytic_sam_encoder_macs(config) -> Dict[str, float]:
    """Multiply-accumulates of a ``BigLittleSamConfig`` encoder, layer by layer, as this toolkit
    computes it (docs/method.md, "FLOP accounting"). Returns {"total", "layers", "patch_embed",
    "neck", "predictors"}."""
    g, c, r = config.grid_size, config.embed_dim, config.mlp_ratio
    ws, n = config.window_size, config.grid_size**2
    nw = (-(-g // ws)) ** 2
    s = ws * ws
    picks = nw * min(s, max(1, round(config.keep_ratio * s)))
    layers = 0.0
    for i in range(config.depth):
        windowed = i not in config.global_attn_indexes
        n_q, n_k = (nw * s, s) if windowed else (n, n)  # dense attention runs on padded windows
        table = 2 * ws - 1 if windowed else 2 * g - 1
        if i not in config.blvit_layers:
            layers += 4 * n * c * c + 2 * r * n * c * c + 2 * n_q * n_k * c + 2 * n_q * table * c
            continue
        p_k = n_k if windowed else n  # keys per selected query
        layers += picks * c * c + 2 * n * c * c + 2 * picks * p_k * c + 2 * picks * table * c
        layers += picks * c * c + 2 * r * picks * c * c
        if i in config.e_block_layers:
            e = config.e_embed_dim
            layers += 3 * n * c * e + 2 * n_q * n_k * e + 2 * n_q * table * e + n * e * c
            layers += 2 * n * c * e + 2 * config.e_mlp_ratio * n * e * e
    patch = n * c * config.in_chans * config.patch_size**2
    neck = n * c * config.out_chans + 9 * n * config.out_chans**2
    predictors = len(config.predictor_layers) * n * c
    total = layers + patch + neck + predictors
    return {"total": total, "layers": layers, "patch_embed": patch, "neck": neck, "predictors": predictors}


def timm_model_on_meta(name: str, **create_kwargs: Any) -> nn.Module:
    """``timm.create_model(name, **create_kwargs)`` on the meta device (for counting: no memory)."""
    import timm

    with torch.device("meta"):
        return timm.create_model(name, **create_kwargs)


def module_macs_on_meta(module: nn.Module, input_shape: Tuple[int, ...]) -> int:
    """Multiply-accumulates of an existing (loaded) ``module`` in eval mode, counted on ``meta``
    copies of its parameters and buffers: no arithmetic, no second copy of the weights, and the
    module (its weights, mode and attention backends) as it was afterwards.

    FlexAttention neither runs on ``meta`` nor has a FLOP formula, so attention layers set to the
    ``flex`` backend are counted as the same math through SDPA (bias additions are not MACs)."""
    from torch.func import functional_call

    from .layers.attention import Attention

    flex = [m for m in module.modules() if isinstance(m, Attention) and m.backend == "flex"]
    tensors = {name: t.to("meta") for name, t in list(module.named_parameters()) + list(module.named_buffers())}
    x = torch.zeros(input_shape, device="meta")
    was_training = module.training
    try:
        module.eval()
        for m in flex:
            m.backend = "sdpa"
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            functional_call(module, tensors, (x,))
    finally:
        module.train(was_training)
        for m in flex:
            m.backend = "flex"
    return int(counter.get_total_flops()) // 2
