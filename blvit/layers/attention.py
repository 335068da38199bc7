"""Multi-head attention through ``F.scaled_dot_product_attention``.

One module serves three roles, with segment-anything's parameter names (qkv, proj,
rel_pos_h, rel_pos_w) so SAM checkpoints load as they are:

- dense self-attention, windowed or global (SAM's ``Attention``);
- the E-block's narrow attention (``attn_dim`` c < C, output mapped back to C);
- the P-block's semi-cross attention: queries from the selected tokens only, keys and values
  from every token; the relative-position bias follows the selected queries.
"""
from functools import lru_cache
from typing import Callable, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..routing import TokenSelection
from .rel_pos import axis_rel_pos_biases, decomposed_rel_pos_bias
from .windows import window_partition, window_unpartition

# How the relative-position bias reaches the attention kernel (same numerics, different kernels):
#   sdpa:   the (B, heads, Lq, Lk) bias is built and passed to SDPA as a float mask (keeps SDPA off
#           its flash kernel and reads the whole bias from memory).
#   folded: no mask: q' = [q / sqrt(d), bias_h, bias_w] and k' = [k, onehot(k_row), onehot(k_col)],
#           so q' . k' is the biased logit; SDPA then runs maskless (d + k_h + k_w wide q/k).
#   flex:   FlexAttention with the two bias factors looked up in a score_mod (no bias tensor of
#           Lq x Lk); compiled on CUDA and under torch.compile, the unfused reference path in
#           eager mode on CPU (inference only).
ATTENTION_BACKENDS = ("sdpa", "folded", "flex")


def set_attention_backend(module: nn.Module, backend: str) -> nn.Module:
    """Make every ``Attention`` inside ``module`` use ``backend`` (one of ATTENTION_BACKENDS)."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {ATTENTION_BACKENDS}")
    for m in module.modules():
        if isinstance(m, Attention):
            m.backend = backend
    return module


@lru_cache(maxsize=None)
def _compiled_flex_attention() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    # One static-shape graph per attention shape: a bLViT encoder has up to six (dense, P-block
    # semi-cross and E-block, each windowed and global) per batch size, more than dynamo's default
    # of 8 recompiles per function allows; past it, dynamo would quietly run the unfused path.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(flex_attention, dynamic=False)


def _rel_pos_score_mod(bias_h: torch.Tensor, bias_w: torch.Tensor, k_w: int) -> Callable:
    def add_bias(score, b, h, q_idx, kv_idx):
        return score + bias_h[b, h, q_idx, kv_idx // k_w] + bias_w[b, h, q_idx, kv_idx % k_w]

    return add_bias


@torch.compiler.disable
def _flex_in_own_graph(q, k, v, bias_h, bias_w, k_w: int, scale: float) -> torch.Tensor:
    # Inductor's CPU FlexAttention cannot lower a score_mod whose tensors are computed inside the
    # same graph (NoValidChoicesError, torch 2.14); as inputs of their own graph they lower.
    return _compiled_flex_attention()(q, k, v, score_mod=_rel_pos_score_mod(bias_h, bias_w, k_w), scale=scale)


def _flex_attention(q, k, v, bias_h, bias_w, k_w: int, scale: float) -> torch.Tensor:
    """FlexAttention with the decomposed bias in a score_mod: compiled on CUDA, the reference path
    on CPU in eager mode (tests), its own compiled graph when an outer torch.compile runs on CPU."""
    from torch.nn.attention.flex_attention import flex_attention

    if torch.compiler.is_compiling():
        if q.is_cuda:
            return flex_attention(q, k, v, score_mod=_rel_pos_score_mod(bias_h, bias_w, k_w), scale=scale)
        return _flex_in_own_graph(q, k, v, bias_h, bias_w, k_w, scale)
    if q.is_cuda:
        return _compiled_flex_attention()(q, k, v, score_mod=_rel_pos_score_mod(bias_h, bias_w, k_w), scale=scale)
    if torch.is_grad_enabled() and q.requires_grad:
        raise RuntimeError("attention backend 'flex' runs FlexAttention's reference path outside torch.compile, "
                           "which has no backward pass; train with backend 'sdpa' or 'folded', or compile the model")
    return flex_attention(q, k, v, score_mod=_rel_pos_score_mod(bias_h, bias_w, k_w), scale=scale)


def folded_bias_qk(
    q: torch.Tensor, k: torch.Tensor, bias_h: torch.Tensor, bias_w: torch.Tensor, k_grid: Tuple[int, int]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """q (B, h, Lq, d) unscaled, k (B, h, Lk, d), bias factors (B, h, Lq, k_h) and (B, h, Lq, k_w)
    -> q', k' (..., d') with q' . k' = q . k / sqrt(d) + bias_h[kh] + bias_w[kw]; d' is
    d + k_h + k_w rounded up to a multiple of 8 (kernel alignment)."""
    k_h, k_w = k_grid
    width = q.shape[-1] + k_h + k_w
    pad = -width % 8
    keys = torch.arange(k_h * k_w, device=k.device)
    onehot = torch.cat([F.one_hot(keys // k_w, k_h), F.one_hot(keys % k_w, k_w),
                        keys.new_zeros(keys.shape[0], pad)], dim=-1).to(k.dtype)
    q_fold = torch.cat([q * q.shape[-1] ** -0.5, bias_h.to(q.dtype), bias_w.to(q.dtype),
                        q.new_zeros(*q.shape[:-1], pad)], dim=-1)
    k_fold = torch.cat([k, onehot.expand(*k.shape[:-1], onehot.shape[-1])], dim=-1)
    return q_fold, k_fold


class Attention(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        use_rel_pos: bool = False,
        rel_pos_size: Optional[Tuple[int, int]] = None,
        attn_dim: Optional[int] = None,
        out_dim: Optional[int] = None,
    ) -> None:
        """
        Args:
            dim: input width C.
            num_heads: attention heads.
            use_rel_pos: add SAM's decomposed relative-position bias.
            rel_pos_size: (h, w) of the key grid the bias tables are sized for
                (the window for windowed layers, the token grid for global ones).
            attn_dim: width of q, k, v (default C; the E-block uses its narrow width c).
            out_dim: output width (default C).
        """
        super().__init__()
        attn_dim = attn_dim or dim
        if attn_dim % num_heads:
            raise ValueError(f"attention width {attn_dim} is not divisible by {num_heads} heads")
        self.backend = "sdpa"  # see ATTENTION_BACKENDS; set_attention_backend changes a whole model
        self.num_heads = num_heads
        self.attn_dim = attn_dim
        self.head_dim = attn_dim // num_heads
        self.qkv = nn.Linear(dim, 3 * attn_dim, bias=qkv_bias)
        self.proj = nn.Linear(attn_dim, out_dim or dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            if rel_pos_size is None:
                raise ValueError("rel_pos_size is needed with use_rel_pos")
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * rel_pos_size[0] - 1, self.head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * rel_pos_size[1] - 1, self.head_dim))

    def _heads(self, t: torch.Tensor, parts: int) -> Tuple[torch.Tensor, ...]:
        """(B, L, parts * D) -> parts x (B, heads, L, head_dim)."""
        b, length, _ = t.shape
        return t.view(b, length, parts, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        q_pos: Optional[torch.Tensor],
        k_grid: Optional[Tuple[int, int]],
    ) -> torch.Tensor:
        """q (B, h, Lq, d), k/v (B, h, Lk, d), q_pos (B or 1, Lq) row-major positions in k_grid.

        Returns (B, Lq, h * d).
        """
        if not self.use_rel_pos:
            out = F.scaled_dot_product_attention(q, k, v)
            return out.transpose(1, 2).flatten(2)
        q_h, q_w = q_pos // k_grid[1], q_pos % k_grid[1]
        if self.backend == "sdpa":
            mask = decomposed_rel_pos_bias(q, q_h, q_w, self.rel_pos_h, self.rel_pos_w, k_grid).to(q.dtype)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        elif self.backend == "folded":
            bias_h, bias_w = axis_rel_pos_biases(q, q_h, q_w, self.rel_pos_h, self.rel_pos_w, k_grid)
            q_fold, k_fold = folded_bias_qk(q, k, bias_h, bias_w, k_grid)
            out = F.scaled_dot_product_attention(q_fold, k_fold, v, scale=1.0)
        elif self.backend == "flex":
            bias_h, bias_w = axis_rel_pos_biases(q, q_h, q_w, self.rel_pos_h, self.rel_pos_w, k_grid)
            out = _flex_attention(q, k, v, bias_h.to(q.dtype), bias_w.to(q.dtype), k_grid[1], q.shape[-1] ** -0.5)
        else:
            raise ValueError(f"unknown attention backend {self.backend!r}; choose one of {ATTENTION_BACKENDS}")
        return out.transpose(1, 2).flatten(2)

    def _padded_windows(self, t: torch.Tensor, bias: Optional[torch.Tensor], grid, window_size: int):
        # Project first, pad after, then add the bias: a zero padding token then carries exactly
        # the bias, as in SAM (which pads before projecting), without projecting the padding.
        t = window_partition(t, grid, window_size)
        # the bias in the projection's dtype: under autocast F.linear gives bf16, and a float32
        # bias would promote the whole q/k/v of every windowed layer back to float32
        return t if bias is None else t + bias.to(t.dtype)

    def forward(
        self,
        x: torch.Tensor,
        grid: Optional[Tuple[int, int]] = None,
        window_size: int = 0,
        selection: Optional[TokenSelection] = None,
    ) -> torch.Tensor:
        """
        Args:
            x: (B, N, C) normalised tokens; with a grid, N = H * W in row-major order.
            grid: (H, W) of the tokens; needed for windows and the relative-position bias.
            window_size: > 0 for windowed attention (zero-padded windows, as in SAM).
            selection: if given, only the selected tokens are queries (semi-cross attention).
        Returns:
            (B, N, out_dim), or (B, K, out_dim) for the K selected tokens.
        """
        b, n, _ = x.shape
        d = self.attn_dim
        w_qkv, b_qkv = self.qkv.weight, self.qkv.bias
        if selection is None:
            if window_size > 0:
                qkv = self._padded_windows(F.linear(x, w_qkv), b_qkv, grid, window_size)
                q, k, v = self._heads(qkv, 3)
                pos = torch.arange(window_size * window_size, device=x.device)[None]
                out = self._attend(q, k, v, pos, (window_size, window_size))
                out = window_unpartition(out, grid, window_size)
            else:
                q, k, v = self._heads(self.qkv(x), 3)
                pos = torch.arange(n, device=x.device)[None] if grid is not None else None
                out = self._attend(q, k, v, pos, grid)
            return self.proj(out)

        b_q = b_kv = None
        if b_qkv is not None:
            b_q, b_kv = b_qkv[:d], b_qkv[d:]
        queries = x.reshape(b * n, -1).index_select(0, selection.gather_index)
        q = F.linear(queries, w_qkv[:d], b_q)
        if window_size > 0:
            if selection.local_index is None or selection.window_size != window_size:
                raise ValueError(
                    f"windowed semi-cross attention (window {window_size}) needs a selection "
                    f"made per window of that size (got window {selection.window_size})"
                )
            kv = self._padded_windows(F.linear(x, w_qkv[d:]), b_kv, grid, window_size)
            k, v = self._heads(kv, 2)
            picks = selection.local_index.shape[-1]
            (q,) = self._heads(q.view(k.shape[0], picks, d), 1)
            q_pos = selection.local_index.reshape(-1, picks)
            out = self._attend(q, k, v, q_pos, (window_size, window_size))
        else:
            k, v = self._heads(F.linear(x, w_qkv[d:], b_kv), 2)
            (q,) = self._heads(q.view(b, -1, d), 1)
            out = self._attend(q, k, v, selection.flat_index, grid)
        return self.proj(out.reshape(b, -1, d))
