"""Transformer blocks: the dense block, the E-block and the big.LITTLE block.

The formulas are written out in docs/method.md. Parameter names of the dense part match
segment-anything's ``Block`` (norm1, attn.qkv, attn.proj, attn.rel_pos_*, norm2, mlp.lin1,
mlp.lin2), so a big.LITTLE block's P-block is loaded from a SAM checkpoint key for key.
"""
from functools import partial
from typing import Any, Callable, Optional, Tuple, Type

import torch
import torch.nn as nn

from .layers import Attention, MappedMlp, Mlp
from .routing import TokenSelection, add_to_tokens, gather_tokens

FUSIONS = ("gated", "scaled")
DefaultNorm = partial(nn.LayerNorm, eps=1e-6)


class DenseBlock(nn.Module):
    """Pre-norm ViT block with optional window attention and relative-position bias.

    (B, N, C) -> (B, N, C). Numerically the same function as segment-anything's ``Block``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        norm_layer: Callable[[int], nn.Module] = DefaultNorm,
        act_layer: Type[nn.Module] = nn.GELU,
        use_rel_pos: bool = False,
        window_size: int = 0,
        grid: Optional[Tuple[int, int]] = None,
    ) -> None:
        """
        Args:
            window_size: > 0 for windowed attention, 0 for global attention.
            grid: (H, W) token grid; sizes the relative-position tables of global layers.
        """
        super().__init__()
        self.window_size = window_size
        self.norm1 = norm_layer(dim)
        self.attn = Attention(
            dim,
            num_heads,
            qkv_bias=qkv_bias,
            use_rel_pos=use_rel_pos,
            rel_pos_size=(window_size, window_size) if window_size > 0 else grid,
        )
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer)

    def forward(
        self, x: torch.Tensor, grid: Optional[Tuple[int, int]] = None, selection: Optional[TokenSelection] = None
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), grid, self.window_size)
        return x + self.mlp(self.norm2(x))


class EBlock(nn.Module):
    """The efficiency block: a narrow ViT block (width c) that updates every token of a width-C
    stream. qkv maps C -> 3c, the output projection c -> C; the MLP is wrapped by C -> c and
    c -> C. It has no norms of its own: it reads the big.LITTLE block's normalised tokens, the
    same tensor the P-block's keys and values are computed from.
    """

    def __init__(
        self,
        dim: int,
        inner_dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        act_layer: Type[nn.Module] = nn.GELU,
        use_rel_pos: bool = False,
        rel_pos_size: Optional[Tuple[int, int]] = None,
    ) -> None:
        super().__init__()
        self.attn = Attention(
            dim,
            num_heads,
            qkv_bias=qkv_bias,
            use_rel_pos=use_rel_pos,
            rel_pos_size=rel_pos_size,
            attn_dim=inner_dim,
            out_dim=dim,
        )
        self.mlp = MappedMlp(dim, inner_dim, int(inner_dim * mlp_ratio), act_layer)


class BigLittleBlock(DenseBlock):
    """A P-block on the selected tokens plus an optional E-block on all tokens.

    With ``fusion="gated"`` (default), for s the router score of a selected token::

        x      <- x + g_ea * E.attn(n1(x))                      (all tokens, if an E-block)
        x[sel] <- x[sel] + (1 + g_r * s) * P.attn(n1(x)[sel], n1(x))
        x      <- x + g_em * E.mlp(n2(x))                       (all tokens, if an E-block)
        x[sel] <- x[sel] + (1 + g_r * s) * P.mlp(n2(x)[sel])

    The gammas start at ``gamma_init`` (0: at keep ratio 1.0 the block is exactly the dense
    block it was loaded from). ``fusion="scaled"`` uses ``p * P(.)`` with p the raw predictor
    probability (Mixture-of-Depths as written; kept for ablations: it shrinks the pretrained
    P-block's output by about 1/group size).

    (B, N, C) -> (B, N, C).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        norm_layer: Callable[[int], nn.Module] = DefaultNorm,
        act_layer: Type[nn.Module] = nn.GELU,
        use_rel_pos: bool = False,
        window_size: int = 0,
        grid: Optional[Tuple[int, int]] = None,
        e_dim: Optional[int] = None,
        e_num_heads: Optional[int] = None,
        e_mlp_ratio: float = 4.0,
        gamma_init: float = 0.0,
        fusion: str = "gated",
        semi_cross: bool = True,
    ) -> None:
        """
        Args:
            semi_cross: the P-block's selected queries read keys and values of all tokens (the
                paper); False: of the selected tokens only (the ablation's "no semi-cross
                attention"; global attention without relative positions only).
        """
        super().__init__(
            dim, num_heads, mlp_ratio, qkv_bias, norm_layer, act_layer, use_rel_pos, window_size, grid
        )
        if fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {fusion!r}; choose one of {FUSIONS}")
        if not semi_cross and (use_rel_pos or window_size > 0):
            raise ValueError("semi_cross=False is for global attention without relative positions (the classifier)")
        self.fusion = fusion
        self.semi_cross = semi_cross
        self.gamma_router = nn.Parameter(torch.tensor(float(gamma_init)))
        self.e_block: Optional[EBlock] = None
        if e_dim:
            self.e_block = EBlock(
                dim,
                e_dim,
                e_num_heads or max(1, e_dim // 64),
                e_mlp_ratio,
                qkv_bias,
                act_layer,
                use_rel_pos,
                (window_size, window_size) if window_size > 0 else grid,
            )
            self.gamma_e_attn = nn.Parameter(torch.tensor(float(gamma_init)))
            self.gamma_e_mlp = nn.Parameter(torch.tensor(float(gamma_init)))

    def router_weight(self, selection: TokenSelection) -> torch.Tensor:
        """(B, K, 1) multiplier of the P-block output; the path by which the predictor learns."""
        if self.fusion == "gated":
            weight = 1 + self.gamma_router * selection.scores
        else:
            weight = selection.probs
        if selection.valid is not None:
            weight = weight * selection.valid
        return weight.unsqueeze(-1)

    def forward(
        self, x: torch.Tensor, grid: Optional[Tuple[int, int]] = None, selection: Optional[TokenSelection] = None
    ) -> torch.Tensor:
        if selection is None:
            raise ValueError("a big.LITTLE block needs a token selection (run a predictor first)")
        weight = self.router_weight(selection)
        xn = self.norm1(x)
        if self.semi_cross:
            p_out = self.attn(xn, grid, self.window_size, selection) * weight
        else:  # the selected tokens attend among themselves
            p_out = self.attn(gather_tokens(xn, selection)) * weight
        if self.e_block is None:
            x = add_to_tokens(x, selection, p_out)
            p_out = self.mlp(self.norm2(gather_tokens(x, selection))) * weight
            return add_to_tokens(x, selection, p_out)

        x = x + self.gamma_e_attn * self.e_block.attn(xn, grid, self.window_size)
        x = add_to_tokens(x, selection, p_out, inplace=True)
        xn = self.norm2(x)
        p_out = self.mlp(gather_tokens(xn, selection)) * weight
        x = x + self.gamma_e_mlp * self.e_block.mlp(xn)
        return add_to_tokens(x, selection, p_out, inplace=True)


def layout_block(config: Any, layer: int, **common: Any) -> nn.Module:
    """Block ``layer`` of a big.LITTLE layout ``config`` (the SAM encoder's or the classifier's):
    a ``BigLittleBlock`` in ``config.blvit_layers`` (with an E-block if the layer is in
    ``config.e_block_layers``), a ``DenseBlock`` elsewhere; ``common`` (dim, heads, ...) goes to both."""
    if layer not in config.blvit_layers:
        return DenseBlock(**common)
    return BigLittleBlock(
        **common,
        e_dim=config.e_embed_dim if layer in config.e_block_layers else None,
        e_num_heads=config.e_num_heads,
        e_mlp_ratio=config.e_mlp_ratio,
        gamma_init=config.gamma_init,
        fusion=config.fusion,
        semi_cross=getattr(config, "semi_cross", True),
    )
