"""Token-reduction baselines on SAM's windowed encoder: EViT, Evo-ViT and ToMe.

``TokenReductionImageEncoder`` is a dense SAM encoder (segment-anything's parameter names, so an
official ``.pth`` loads with nothing missing: none of the three methods adds a parameter) that
runs its later blocks on a reduced set of tokens. SAM's encoder is windowed (14 x 14 windows,
a few global layers) and the mask decoder needs the whole 64 x 64 map back, so every method here
works per window, with a fixed number of tokens per window (static shapes):

- the tokens live as ``(B, nW, L, C)``: each window's tokens, with their positions in the padded
  grid (relative-position bias of windowed layers uses the position inside the window, of global
  layers the position in the grid); an extra token (EViT's fused token, Evo-ViT's representative)
  has no position and gets no positional bias;
- windowed layers attend inside each window (SAM's zero padding tokens take part as keys, as in
  SAM); global layers attend over every window's tokens (padding masked, as SAM has none there);
- the map the neck reads is rebuilt from the windows at the end.

The methods (design and return path in docs/method.md, "Token reduction on SAM"):

- **EViT** (``reduction="evit"``): at each of ``reduction_layers`` a token's attentiveness is the
  attention it receives in that layer (mean over heads and over its window's queries; SAM has no
  class token). After the layer's attention the top ``keep_ratio ** s`` of each window (stage s)
  go on; the others are fused, weighted by attentiveness, into one fused token per window (the
  previous fused token folded in) and leave with their current value, which is what the neck
  reads for them.
- **Evo-ViT** (``reduction="evovit"``): from the first of ``reduction_layers`` on, every layer
  splits each window into the top ``keep_ratio`` "slow" tokens by a running attentiveness score
  (``score_momentum`` x old + (1 - momentum) x the attention received in the layer, slow tokens
  only) and the others ("fast"); slow tokens plus one representative token per window (the
  fast tokens' score-weighted mean) go through the block; every fast token then gets the
  representative's update added. No token is dropped.
- **ToMe** (``reduction="tome"``): from the first of ``reduction_layers`` (default: layer 0) on,
  ``merge_r`` tokens per window are merged in every layer by bipartite soft matching on the
  keys, between attention and MLP, with proportional attention (log token size added to the
  logits); a merged token keeps its destination's position. Unmerging copies each merged token
  back to all of its sources. Training-free.

At ``keep_ratio=1`` (EViT, Evo-ViT) or ``merge_r=0`` (ToMe) every token stays and each method
is SAM's encoder (tested against segment-anything's ``ImageEncoderViT``).
"""
from dataclasses import dataclass, replace
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from blvit.blocks import DenseBlock
from blvit.layers.rel_pos import axis_rel_pos_biases
from blvit.layers.windows import padded_grid, window_partition, window_unpartition
from blvit.routing import tokens_per_window

from .config import REDUCTIONS as CONFIG_REDUCTIONS, BigLittleSamConfig
from .image_encoder import BigLittleImageEncoder

REDUCTIONS = tuple(r for r in CONFIG_REDUCTIONS if r)


@dataclass
class WindowTokens:
    """Tokens grouped by window.

    Attributes:
        x: (B, nW, L, C) the tokens.
        row, col: (B, nW, L) long position in the padded grid; -1 for an extra token.
        pad: (B, nW, L) bool, a window-padding position (zero input to windowed attention, not a
            key of global attention, never written back).
        size: (B, nW, L) float, how many grid tokens a token stands for (ToMe; 0 for padding).
    """

    x: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    pad: torch.Tensor
    size: torch.Tensor

    @property
    def has_position(self) -> torch.Tensor:
        return self.row >= 0


def window_tokens(x: torch.Tensor, grid: Tuple[int, int], window_size: int) -> WindowTokens:
    """(B, H*W, C) row-major tokens -> every token of every zero-padded window."""
    b, n, c = x.shape
    hp, wp = padded_grid(grid, window_size)
    windows = window_partition(x, grid, window_size)  # (B * nW, S, C)
    n_windows = windows.shape[0] // b
    # padded-grid coordinates of every window slot, laid out as the windows are
    rows = torch.arange(hp, device=x.device)[:, None].expand(hp, wp)
    cols = torch.arange(wp, device=x.device)[None, :].expand(hp, wp)
    coords = torch.stack([rows, cols], -1).reshape(1, hp * wp, 2)
    coords = window_partition(coords, (hp, wp), window_size).view(1, n_windows, -1, 2).expand(b, -1, -1, -1)
    row, col = coords[..., 0].contiguous(), coords[..., 1].contiguous()
    pad = (row >= grid[0]) | (col >= grid[1])
    return WindowTokens(windows.view(b, n_windows, -1, c), row, col, pad, (~pad).to(x.dtype))


def write_back(tokens: WindowTokens, base: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """``base`` (B, H*W, C) with every positioned, non-padding token of ``tokens`` written at its
    grid position (a merged token at its destination's)."""
    b, n, c = base.shape
    real = tokens.has_position & ~tokens.pad
    index = torch.where(real, tokens.row * grid[1] + tokens.col, torch.full_like(tokens.row, n)).view(b, -1)
    out = torch.cat([base, base.new_zeros(b, 1, c)], 1)  # slot n takes what is not written back
    out = out.scatter(1, index[..., None].expand(-1, -1, c), tokens.x.reshape(b, -1, c).to(base.dtype))
    return out[:, :n]


def gather_windows(t: WindowTokens, index: torch.Tensor) -> WindowTokens:
    """The tokens at ``index`` (B, nW, K) of each window."""
    def take(v: torch.Tensor) -> torch.Tensor:
        if v.dim() == 4:
            return v.gather(2, index[..., None].expand(-1, -1, -1, v.shape[-1]))
        return v.gather(2, index)

    return WindowTokens(take(t.x), take(t.row), take(t.col), take(t.pad), take(t.size))


def append_token(t: WindowTokens, extra: torch.Tensor) -> WindowTokens:
    """Add one position-less token per window (B, nW, C) after the window's tokens."""
    ones = t.row[..., :1]
    return WindowTokens(torch.cat([t.x, extra[:, :, None].to(t.x.dtype)], 2), torch.cat([t.row, torch.full_like(ones, -1)], 2),
                        torch.cat([t.col, torch.full_like(ones, -1)], 2), torch.cat([t.pad, torch.zeros_like(t.pad[..., :1])], 2),
                        torch.cat([t.size, torch.ones_like(t.size[..., :1])], 2))


def gathered_bias(attn: nn.Module, q: torch.Tensor, row: torch.Tensor, col: torch.Tensor, has_pos: torch.Tensor,
                  key_grid: Tuple[int, int], key_bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The (G, heads, L, L) additive bias of :func:`folded_logits_qk`'s logits, as a tensor."""
    g, heads, length, _ = q.shape
    bias = q.new_zeros(g, 1, length, length)
    if attn.use_rel_pos:
        row, col = row.clamp(0, key_grid[0] - 1), col.clamp(0, key_grid[1] - 1)
        bias_h, bias_w = axis_rel_pos_biases(q, row, col, attn.rel_pos_h, attn.rel_pos_w, key_grid)
        # a token without a position: its query row is zero, and as a key it reads an appended zero
        # column (no full-size mask multiply)
        on = has_pos[:, None, :, None].to(bias_h.dtype)
        bias_h = F.pad(bias_h * on, (0, 1))
        bias_w = F.pad(bias_w * on, (0, 1))
        row = torch.where(has_pos, row, key_grid[0])
        col = torch.where(has_pos, col, key_grid[1])
        bias = bias_h.gather(-1, row[:, None, None, :].expand(g, heads, length, length))
        bias += bias_w.gather(-1, col[:, None, None, :].expand(g, heads, length, length))
    if key_bias is not None:
        bias = bias + key_bias.to(bias.dtype)[:, None, None, :]
    return bias.to(q.dtype)


def folded_logits_qk(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, row: torch.Tensor, col: torch.Tensor,
                     has_pos: torch.Tensor, key_grid: Tuple[int, int],
                     key_bias: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """q', k' with q' . k' = q . k / sqrt(d) + SAM's relative-position bias + ``key_bias``, for
    tokens at arbitrary positions, so that SDPA runs with no (L x L) bias tensor.

    The bias factors of each query against every row / column of ``key_grid`` are appended to q,
    a one-hot of each key's row / column to k (a token without a position gets zeros: no bias);
    ``key_bias`` (G, L), a per-key additive term (ToMe's log size, -1e9 for masked keys), rides
    in one more column. q, k: (G, heads, L, d) unscaled; row, col, has_pos: (G, L).
    """
    g, heads, length, d = q.shape
    parts_q, parts_k = [q * d**-0.5], [k]
    if attn.use_rel_pos:
        row, col = row.clamp(0, key_grid[0] - 1), col.clamp(0, key_grid[1] - 1)
        bias_h, bias_w = axis_rel_pos_biases(q, row, col, attn.rel_pos_h, attn.rel_pos_w, key_grid)
        on = has_pos.to(q.dtype)
        parts_q += [bias_h * on[:, None, :, None], bias_w * on[:, None, :, None]]
        for coord, size in ((row, key_grid[0]), (col, key_grid[1])):
            onehot = F.one_hot(coord, size).to(q.dtype) * on[..., None]
            parts_k.append(onehot[:, None].expand(g, heads, length, size))
    if key_bias is not None:
        parts_q.append(q.new_ones(g, heads, length, 1))
        parts_k.append(key_bias.to(q.dtype)[:, None, :, None].expand(g, heads, length, 1))
    width = sum(p.shape[-1] for p in parts_q)
    pad = -width % 8  # kernel alignment
    if pad:
        parts_q.append(q.new_zeros(g, heads, length, pad))
        parts_k.append(k.new_zeros(g, heads, length, pad))
    return torch.cat(parts_q, -1), torch.cat(parts_k, -1)


@dataclass
class AttentionOutput:
    tokens: WindowTokens      # after the attention residual
    received: Optional[torch.Tensor]  # (B, nW, L) attention each token received, if asked
    keys: Optional[torch.Tensor]      # (B, nW, L, d) keys averaged over heads, if asked


def block_attention(block: DenseBlock, t: WindowTokens, grid: Tuple[int, int], window_size: int,
                    scores: bool = False, keys: bool = False, proportional: bool = False) -> AttentionOutput:
    """The attention half of a SAM block on window-grouped tokens (windowed if the block is)."""
    attn = block.attn
    b, nw, length, c = t.x.shape
    windowed = block.window_size > 0
    xn = block.norm1(t.x)
    if windowed:  # SAM pads after the norm: padding tokens enter every windowed layer as zeros
        xn = xn.masked_fill(t.pad[..., None], 0.0)
    groups, seq = (b * nw, length) if windowed else (b, nw * length)
    heads, hd = attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(xn.reshape(groups, seq, c)).view(groups, seq, 3, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
    has_pos = t.has_position.reshape(groups, seq)
    if windowed:
        row, col, key_grid = t.row % window_size, t.col % window_size, (window_size, window_size)
    else:
        row, col, key_grid = t.row, t.col, grid
    key_bias = None
    if proportional:  # ToMe: a token standing for s tokens counts s times in every softmax
        key_bias = t.size.reshape(groups, seq).clamp(min=1).log()
    if not windowed:  # global layers: no padding tokens among the keys (SAM has none there)
        masked = t.pad.reshape(groups, seq).float() * -1e9
        key_bias = masked if key_bias is None else key_bias + masked
    row, col = row.reshape(groups, seq), col.reshape(groups, seq)
    folded = attn.backend == "folded"
    if folded:  # no (L x L) bias tensor; costs (k_h + k_w) more multiply-adds per logit
        q_fold, k_fold = folded_logits_qk(attn, q, k, row, col, has_pos, key_grid, key_bias)
    else:  # "sdpa" (default; "flex" falls back here): the bias tensor, as the dense encoder's default
        bias = gathered_bias(attn, q, row, col, has_pos, key_grid, key_bias)
    received = None
    if scores:
        if folded:
            logits = q_fold @ k_fold.transpose(-2, -1)
        else:  # the bias added inside the matmul (one pass over the L x L logits less)
            bias = bias.expand(groups, heads, seq, seq).reshape(groups * heads, seq, seq)
            logits = torch.baddbmm(bias, (q * hd**-0.5).reshape(groups * heads, seq, hd),
                                   k.reshape(groups * heads, seq, hd).transpose(1, 2)).view(groups, heads, seq, seq)
        probs = logits.float().softmax(-1).to(v.dtype)
        out = probs @ v
        # attention received, averaged over heads and over the real queries of the window
        real_queries = (~t.pad).to(probs.dtype)  # (B, nW, L)
        if windowed:  # (G, 1, L) @ (G, heads, L, L): summed over the real queries by a matmul
            summed = (real_queries.reshape(groups, 1, 1, seq) @ probs).sum(1)[:, 0]  # (G, L)
            received = summed / (real_queries.reshape(groups, seq).sum(-1, keepdim=True) * heads).clamp(min=1)
        else:  # global layers: over the queries of the key's own window
            per_query_window = torch.block_diag(*real_queries.reshape(b * nw, 1, length).unbind(0)) if b == 1 else None
            if per_query_window is not None:  # (nW, seq) @ (heads, seq, seq) -> (heads, nW, seq)
                per_window = (per_query_window @ probs[0]).sum(0).view(nw, nw, length)[None]
            else:
                per_window = (probs * real_queries.reshape(b, 1, seq, 1)).view(b, heads, nw, length, seq).sum((1, 3))
                per_window = per_window.view(b, nw, nw, length)
            received = torch.diagonal(per_window, dim1=1, dim2=2).permute(0, 2, 1)
            received = received / ((~t.pad).sum(-1, keepdim=True) * heads).clamp(min=1)
        received = received.reshape(b, nw, length).float()
    elif folded:
        out = F.scaled_dot_product_attention(q_fold, k_fold, v, scale=1.0)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    out = attn.proj(out.transpose(1, 2).reshape(groups, seq, heads * hd)).view(b, nw, length, c)
    key_mean = k.mean(1).reshape(b, nw, length, hd) if keys else None
    return AttentionOutput(replace(t, x=t.x + out), received, key_mean)


def block_mlp(block: DenseBlock, t: WindowTokens) -> WindowTokens:
    return replace(t, x=t.x + block.mlp(block.norm2(t.x)))


def _top_real(score: torch.Tensor, t: WindowTokens, k: int) -> torch.Tensor:
    """(B, nW, k) indices of the k best-scored positioned, non-padding tokens of each window."""
    eligible = t.has_position & ~t.pad
    return score.masked_fill(~eligible, float("-inf")).topk(k, dim=-1, sorted=False).indices


def _weighted_mean(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(B, nW, L, C), (B, nW, L) -> (B, nW, C)."""
    weight = weight.to(x.dtype)
    return (x * weight[..., None]).sum(2) / weight.sum(2, keepdim=True).clamp(min=1e-6)


def bipartite_merge(t: WindowTokens, metric: torch.Tensor, r: int) -> Tuple[WindowTokens, torch.Tensor]:
    """ToMe's bipartite soft matching inside each window: the r tokens of the even set (A) most
    similar to a token of the odd set (B) are merged into it (size-weighted mean); padding and
    position-less tokens never merge. Returns the new tokens (A's unmerged, then B) and, for each
    old index, its new index (B, nW, L)."""
    b, nw, length, _ = t.x.shape
    metric = metric / metric.norm(dim=-1, keepdim=True).clamp(min=1e-6)
    a_idx = torch.arange(0, length, 2, device=t.x.device)
    b_idx = torch.arange(1, length, 2, device=t.x.device)
    eligible = t.has_position & ~t.pad
    sim = metric[:, :, a_idx] @ metric[:, :, b_idx].transpose(-2, -1)  # (B, nW, La, Lb)
    sim = sim.masked_fill(~eligible[:, :, a_idx, None] | ~eligible[:, :, None, b_idx], float("-inf"))
    best, best_dst = sim.max(-1)  # (B, nW, La)
    order = best.argsort(-1, descending=True)
    src, unmerged = order[..., :r], order[..., r:]  # positions within A
    dst = best_dst.gather(-1, src)  # positions within B

    def split(v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return v[:, :, a_idx], v[:, :, b_idx]

    size_a, size_b = split(t.size)
    x_a, x_b = split(t.x * t.size[..., None].to(t.x.dtype))
    c = t.x.shape[-1]
    src_x = x_a.gather(2, src[..., None].expand(-1, -1, -1, c))
    x_b = x_b.scatter_add(2, dst[..., None].expand(-1, -1, -1, c), src_x)
    size_b = size_b.scatter_add(2, dst, size_a.gather(2, src))
    new_x = torch.cat([x_a.gather(2, unmerged[..., None].expand(-1, -1, -1, c)), x_b], 2)
    new_size = torch.cat([size_a.gather(2, unmerged), size_b], 2)
    new_x = new_x / new_size.clamp(min=1e-6)[..., None].to(new_x.dtype)
    # padding keeps its zero value (size 0): its x is whatever the block made of it, as in SAM
    keep_plain = new_size == 0
    plain = torch.cat([t.x[:, :, a_idx].gather(2, unmerged[..., None].expand(-1, -1, -1, c)), t.x[:, :, b_idx]], 2)
    new_x = torch.where(keep_plain[..., None], plain, new_x)

    def merged(v: torch.Tensor) -> torch.Tensor:
        va, vb = split(v)
        return torch.cat([va.gather(2, unmerged), vb], 2)

    new = WindowTokens(new_x, merged(t.row), merged(t.col), merged(t.pad), new_size)
    # new index of every old token: A's unmerged in order, A's merged -> their destination, B after A
    n_unmerged = unmerged.shape[-1]
    new_index_a = torch.empty(b, nw, a_idx.numel(), dtype=torch.long, device=t.x.device)
    new_index_a.scatter_(2, unmerged, torch.arange(n_unmerged, device=t.x.device).expand(b, nw, -1).contiguous())
    new_index_a.scatter_(2, src, dst + n_unmerged)
    new_index = torch.empty(b, nw, length, dtype=torch.long, device=t.x.device)
    new_index[:, :, a_idx] = new_index_a
    new_index[:, :, b_idx] = torch.arange(b_idx.numel(), device=t.x.device) + n_unmerged
    return new, new_index


class TokenReductionImageEncoder(BigLittleImageEncoder):
    """SAM image encoder with EViT, Evo-ViT or ToMe token reduction (module docstring).

    (B, 3, S, S) normalised, padded images -> (B, out_chans, S/16, S/16), like segment-anything's
    ``ImageEncoderViT`` and with its parameter names: the dense layout of ``BigLittleImageEncoder``
    (no big.LITTLE layers, no predictors), run by a reducing forward. ``last_selections`` holds,
    per layer, the (B, H*W) bool map of the grid positions the layer processed.
    """

    def __init__(self, config: BigLittleSamConfig) -> None:
        if config.reduction not in REDUCTIONS:
            raise ValueError(f"TokenReductionImageEncoder: reduction {config.reduction!r} not one of {REDUCTIONS}")
        super().__init__(config)

    @property
    def first_reduced_layer(self) -> int:
        return min(self.config.reduction_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        self.check_input(x)
        x = self.patch_embed(x) + self.pos_embed
        b, h, w, c = x.shape
        grid = (h, w)
        x = x.reshape(b, h * w, c)
        start = self.first_reduced_layer
        for block in self.blocks[: max(0, start - (cfg.reduction == "evovit"))]:
            x = block(x, grid)
        run = {"evit": self._evit, "evovit": self._evovit, "tome": self._tome}[cfg.reduction]
        x = run(x, grid)
        return self.neck(x.view(b, h, w, c).permute(0, 3, 1, 2))

    def forward_with_selections(self, x: torch.Tensor):
        raise NotImplementedError(f"{self.config.reduction} reduces tokens without a predictor's selection; "
                                  "use forward and record_selections")

    def forward_intermediates(self, x: torch.Tensor, layers):
        raise NotImplementedError(f"intermediate token maps of the {self.config.reduction} encoder are not "
                                  "defined (reduced tokens are not in the map until the end): unset loss.distill_layers")

    def _checkpointed(self, fn, *args, **kwargs):
        """``fn`` (a block's attention or MLP half), its activations recomputed in backward when
        ``grad_checkpointing`` is on (training memory)."""
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False, **kwargs)
        return fn(*args, **kwargs)

    def _record(self, layer: int, t: WindowTokens, grid: Tuple[int, int]) -> None:
        if self.record_selections:  # grid positions the layer processes (a merged token: its position)
            marks = write_back(replace(t, x=torch.ones_like(t.x[..., :1])), t.x.new_zeros(t.x.shape[0], grid[0] * grid[1], 1), grid)
            self.last_selections[layer] = marks[..., 0] > 0

    def _evit(self, x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        cfg = self.config
        ws = cfg.window_size
        t = window_tokens(x, grid, ws)
        frozen = x
        stage, extras = 0, 0  # extras: position-less tokens per window (the fused token, once there is one)
        for i in range(self.first_reduced_layer, cfg.depth):
            block = self.blocks[i]
            if i not in cfg.reduction_layers:
                t = self._checkpointed(block_mlp, block, self._checkpointed(block_attention, block, t, grid, ws).tokens)
                continue
            stage += 1
            k = tokens_per_window(cfg.keep_ratio**stage, ws)
            out = self._checkpointed(block_attention, block, t, grid, ws, scores=True)
            t = out.tokens
            real = t.has_position & ~t.pad
            if k < t.x.shape[2] - extras:  # static: the same in every window and every batch
                kept = _top_real(out.received, t, k)
                is_kept = torch.zeros_like(real).scatter(2, kept, True)
                frozen = write_back(replace(t, row=torch.where(is_kept, -1, t.row)), frozen, grid)  # leavers
                fuse = (~is_kept & (real | ~t.has_position)).to(out.received.dtype) * out.received
                fused = _weighted_mean(t.x, fuse)
                t = append_token(gather_windows(t, kept), fused)
                extras = 1
            self._record(i, t, grid)
            t = self._checkpointed(block_mlp, block, t)
        return write_back(t, frozen, grid)

    def _evovit(self, x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        cfg = self.config
        ws = cfg.window_size
        start = self.first_reduced_layer
        t = window_tokens(x, grid, ws)
        # the running attentiveness starts from the last full layer (run here with scores)
        out = self._checkpointed(block_attention, self.blocks[start - 1], t, grid, ws, scores=True) if start > 0 else None
        if out is not None:
            t = self._checkpointed(block_mlp, self.blocks[start - 1], out.tokens)
            score = out.received
        else:
            score = torch.ones_like(t.size)
        k = tokens_per_window(cfg.keep_ratio, ws)
        full = k >= ws * ws
        m = cfg.score_momentum
        for i in range(start, cfg.depth):
            block = self.blocks[i]
            if full:
                out = self._checkpointed(block_attention, block, t, grid, ws)
                t = self._checkpointed(block_mlp, block, out.tokens)
                continue
            slow = _top_real(score, t, k)
            is_slow = torch.zeros_like(t.pad).scatter(2, slow, True)
            fast = ~is_slow & ~t.pad
            representative = _weighted_mean(t.x, fast.to(score.dtype) * score.clamp(min=1e-6))
            compact = append_token(gather_windows(t, slow), representative)
            self._record(i, compact, grid)
            out = self._checkpointed(block_attention, block, compact, grid, ws, scores=True)
            compact = self._checkpointed(block_mlp, block, out.tokens)
            update = compact.x[:, :, -1] - representative.to(compact.x.dtype)  # (B, nW, C)
            x_new = torch.where(fast[..., None], t.x + update[:, :, None], t.x)
            x_new = x_new.scatter(2, slow[..., None].expand(-1, -1, -1, t.x.shape[-1]), compact.x[:, :, :-1])
            t = replace(t, x=x_new)
            score = score.scatter(2, slow, m * score.gather(2, slow) + (1 - m) * out.received[:, :, :-1])
        return write_back(t, x, grid)

    def _tome(self, x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        cfg = self.config
        ws = cfg.window_size
        t = window_tokens(x, grid, ws)
        b, nw, length, _ = t.x.shape
        # source_to_token[b, w, j]: where grid slot j of window w lives now
        source_to_token = torch.arange(length, device=x.device).expand(b, nw, -1)
        for i in range(self.first_reduced_layer, cfg.depth):
            block = self.blocks[i]
            r = min(cfg.merge_r, t.x.shape[2] // 2)
            out = self._checkpointed(block_attention, block, t, grid, ws, keys=r > 0, proportional=True)
            t = out.tokens
            if r > 0:
                t, new_index = bipartite_merge(t, out.keys, r)
                source_to_token = new_index.gather(2, source_to_token)
            self._record(i, t, grid)
            t = self._checkpointed(block_mlp, block, t)
        # unmerge: every grid slot takes the value of the token it was merged into
        full = t.x.gather(2, source_to_token[..., None].expand(-1, -1, -1, t.x.shape[-1]))
        return window_unpartition(full.reshape(b * nw, length, -1), grid, ws)
