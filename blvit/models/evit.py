"""EViT (Liang et al., "Not All Patches are What You Need", ICLR 2022): the token-reorganisation
baseline on DeiT, registered with timm as ``evit_base_patch16_224`` / ``evit_small_patch16_224``.

At the reorganisation layers (0-based 3, 6, 9: the paper's blocks 4, 7, 10), after the block's
attention sub-block, the image tokens are ranked by the class token's attention to them
(averaged over heads); the top ``ceil(keep_rate * M)`` of the M image tokens are kept and the
rest are fused into one token, their sum weighted by that attention (as EViT's released code
does: the weights are not renormalised), appended after the kept tokens. The MLP sub-block and
every later layer then run on the shorter sequence; a fused token of an earlier layer is an
ordinary token later. At keep_rate 0.7 and 224 x 224 the sequence goes 197 -> 140 -> 100 -> 72.

The class-token attention row is computed explicitly (one query row per head: O(N C)) in the
reorganisation layers only; the attention itself is SDPA everywhere. At keep_rate 1.0 no token
is dropped and the model is DeiT (same weights, same output). Parameter names are those of
``blvit.blocks.DenseBlock``, so DeiT checkpoints load through
:func:`blvit.models.blvit_vit.checkpoint_filter_fn`.

Keep-rate warm-up (youweiliang/evit helpers.py ``adjust_keep_rate``, run_code.sh
``--shrink_start_epoch 10 --shrink_epochs 100`` of 300 epochs): training runs at keep rate 1
until ``shrink_start_epoch``, then the rate falls from 1 to ``keep_rate`` along a half cosine over
``shrink_epochs`` epochs and stays there. :meth:`EViT.set_epoch` (which the classification trainer
calls before every epoch) sets it; it is applied in training mode only: evaluation always runs at
``keep_rate``. Difference: the released code steps the rate every iteration, here it is set once
per epoch, to the mean of the released rates over the epoch's iterations.
"""
import math
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model
from torch.utils.checkpoint import checkpoint

from ..blocks import DenseBlock
from .blvit_vit import ClassTokenViT, _cfg, class_token_attention, create_deit_variant
from .blvit_vit import checkpoint_filter_fn  # noqa: F401  (the loaders look the filter up in the model's module)
from .features import TakenTokens

__all__ = ["EViT", "EViTBlock", "evit_keep_rate_schedule", "evit_kept_tokens", "reorganize_tokens"]

# youweiliang/evit run_code.sh: --shrink_start_epoch 10 --shrink_epochs 100 --epochs 300
RELEASED_SHRINK_START, RELEASED_SHRINK_EPOCHS, RELEASED_EPOCHS = 10, 100, 300


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Per-sample stochastic depth on a residual branch: (B, L, C) -> (B, L, C)."""
    if rate <= 0.0 or not training:
        return x
    keep = 1.0 - rate
    return x * (x.new_empty(x.shape[0], 1, 1).bernoulli_(keep) / keep)


def evit_keep_rate_schedule(epoch: float, start: float, length: float, base_keep_rate: float) -> float:
    """EViT's training keep rate at (possibly fractional) ``epoch``: 1 before ``start``, then a
    half cosine from 1 down to ``base_keep_rate`` over ``length`` epochs, ``base_keep_rate`` from
    ``start + length`` on (youweiliang/evit helpers.py ``adjust_keep_rate``, max_keep_rate 1)."""
    if epoch < start:
        return 1.0
    if epoch >= start + length:
        return base_keep_rate
    return base_keep_rate + (1.0 - base_keep_rate) * (math.cos((epoch - start) / length * math.pi) + 1) * 0.5


def evit_kept_tokens(num_image_tokens: int, keep_rate: float) -> int:
    """Attentive image tokens EViT keeps: ceil(keep_rate * M)."""
    return min(num_image_tokens, math.ceil(keep_rate * num_image_tokens))


def reorganize_tokens(x: torch.Tensor, cls_attn: torch.Tensor, keep_rate: float, fuse: bool = True,
                      return_index: bool = False, num_tokens: Optional[int] = None):
    """Keep the attentive image tokens, fuse the others into one.

    Args:
        x: (B, 1 + M, C) tokens, class token first.
        cls_attn: (B, M) the class token's attention to each image token, averaged over heads.
        keep_rate: fraction of the M image tokens kept (k = ceil(keep_rate * M)).
        fuse: append the attention-weighted sum of the dropped tokens as one token.
        return_index: also return the (B, k) indices of the kept tokens among the M (None when
            nothing is dropped).
        num_tokens: 1 + M when known statically (k is then a constant: traceable).
    Returns:
        (B, 1 + k + 1, C) with ``fuse`` (class token, kept tokens by decreasing attention, fused
        token), (B, 1 + k, C) without; ``x`` itself when k = M.
    """
    b, n, c = x.shape
    m = (n if num_tokens is None else num_tokens) - 1
    k = evit_kept_tokens(m, keep_rate)
    if k >= m:
        return (x, None) if return_index else x
    tokens = x[:, 1:]
    index = cls_attn.topk(k, dim=1, largest=True, sorted=True).indices  # (B, k)
    kept = tokens.gather(1, index.unsqueeze(-1).expand(-1, -1, c))
    parts = [x[:, :1], kept]
    if fuse:
        weights = cls_attn.scatter(1, index, 0.0).to(tokens.dtype)  # the dropped tokens' attention
        parts.append(torch.bmm(weights.unsqueeze(1), tokens))  # (B, 1, C)
    out = torch.cat(parts, dim=1)
    return (out, index) if return_index else out


class EViTBlock(DenseBlock):
    """A DeiT block (``DenseBlock`` names) with per-branch stochastic depth that, if
    ``reorganize`` and keep_rate < 1, reorganises the tokens between its attention and MLP.

    (B, L, C) -> (B, L', C): L' = L, or 1 + k + 1 after a reorganisation.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        reorganize: bool = False,
    ) -> None:
        super().__init__(dim, num_heads, mlp_ratio, qkv_bias)
        self.drop_path = drop_path
        self.reorganize = reorganize

    def attention_with_cls_attn(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """x (B, L, C) normalised -> (attention output (B, L, C), class attention (B, L - 1)).

        SDPA for the output; the class token's softmax row, explicitly, for the ranking.
        """
        attn = self.attn
        b, length, _ = x.shape
        qkv = attn.qkv(x).view(b, length, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, h, L, d)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, length, -1)
        return attn.proj(out), class_token_attention(q[:, :, :1], k)[:, 1:]  # (B, L - 1)

    def forward(self, x: torch.Tensor, keep_rate: float = 1.0, fuse_token: bool = True, return_index: bool = False,
                num_tokens: Optional[int] = None):
        """(B, L, C) -> (B, L', C); with ``return_index`` also the (B, k) indices among the L - 1
        image tokens of the ones kept (None when this block keeps all). ``num_tokens``: L when
        known statically (``EViT.token_counts``), so no decision reads the tensor's shape."""
        xn = self.norm1(x)
        index = None
        length = x.shape[1] if num_tokens is None else num_tokens
        if self.reorganize and evit_kept_tokens(length - 1, keep_rate) < length - 1:
            out, cls_attn = self.attention_with_cls_attn(xn)
            x = x + drop_path(out, self.drop_path, self.training)
            x, index = reorganize_tokens(x, cls_attn, keep_rate, fuse_token, return_index=True, num_tokens=length)
        else:
            x = x + drop_path(self.attn(xn), self.drop_path, self.training)
        x = x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)
        return (x, index) if return_index else x


class EViT(ClassTokenViT):
    """DeiT with EViT token reorganisation (timm interface).

    (B, in_chans, img_size, img_size) -> (B, num_classes). ``forward_features``:
    -> (B, L, C) normalised tokens, L = ``token_counts()[-1]`` (72 for DeiT-B at 0.7, 224).
    ``keep_rate`` (the rate evaluated with) may be changed at any time; in training mode the rate
    of the warm-up schedule set by :meth:`set_epoch` is used, if it was called.
    """

    def __init__(
        self,
        img_size: Any = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        keep_rate: float = 0.7,
        reorganize_layers: Sequence[int] = (3, 6, 9),
        fuse_token: bool = True,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        global_pool: str = "token",
        shrink_start_epoch: Optional[float] = None,
        shrink_epochs: Optional[float] = None,
    ) -> None:
        """
        Args:
            keep_rate: fraction of image tokens kept at each reorganisation layer, in (0, 1];
                the rate of evaluation and the end of the training warm-up.
            reorganize_layers: 0-based layers that reorganise (EViT's blocks 4, 7, 10).
            fuse_token: fuse the inattentive tokens into one (EViT) or drop them.
            drop_path_rate: stochastic depth, rising linearly to this rate at the last layer.
            shrink_start_epoch: training epochs at keep rate 1 before the warm-up. None: the
                released 10 of 300 epochs, scaled down by epochs / 300 for shorter runs.
            shrink_epochs: epochs of the cosine from 1 down to ``keep_rate`` (0: a step). None:
                the released 100 of 300 epochs, scaled down likewise (1/3 of a shorter run).
        """
        img_size = self.checked_image_size("EViT", img_size, patch_size, global_pool)
        bad = [i for i in reorganize_layers if not 0 <= i < depth]
        if bad:
            raise ValueError(f"reorganize_layers {bad} outside 0..{depth - 1}")
        for arg, value in (("shrink_start_epoch", shrink_start_epoch), ("shrink_epochs", shrink_epochs)):
            if value is not None and value < 0:
                raise ValueError(f"{arg} {value} must be >= 0")
        super().__init__(img_size, patch_size, in_chans, embed_dim)
        self.keep_rate = keep_rate
        self.shrink_start_epoch, self.shrink_epochs = shrink_start_epoch, shrink_epochs
        self.train_keep_rate: Optional[float] = None  # set by set_epoch; used in training mode only
        self.fuse_token = fuse_token
        self.reorganize_layers = tuple(sorted(int(i) for i in reorganize_layers))
        rates = [drop_path_rate * i / max(1, depth - 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            EViTBlock(embed_dim, num_heads, mlp_ratio, qkv_bias, rates[i], i in self.reorganize_layers)
            for i in range(depth)
        )
        self._set_feature_info(patch_size)
        self._init_head(num_classes, drop_rate)
        self.init_weights()

    @property
    def keep_rate(self) -> float:
        return self._keep_rate

    @keep_rate.setter
    def keep_rate(self, value: float) -> None:
        if not 0.0 < value <= 1.0:
            raise ValueError(f"keep_rate {value} must be in (0, 1]")
        self._keep_rate = float(value)

    def shrink_schedule(self, epochs: int) -> Tuple[float, float]:
        """(start epoch, length in epochs) of the keep-rate warm-up for a run of ``epochs``: the
        configured ones, else the released 10 and 100 epochs of 300, scaled by epochs / 300 when
        the run is shorter (a 30-epoch fine-tune: 1 and 10), so the rate reaches ``keep_rate``
        after the same share of training."""
        scale = min(1.0, epochs / RELEASED_EPOCHS)
        start = RELEASED_SHRINK_START * scale if self.shrink_start_epoch is None else self.shrink_start_epoch
        length = RELEASED_SHRINK_EPOCHS * scale if self.shrink_epochs is None else self.shrink_epochs
        return float(start), float(length)

    def set_epoch(self, epoch: int, epochs: int, steps_per_epoch: int = 64) -> None:
        """The training keep rate of epoch ``epoch`` (0-based) of ``epochs``: the mean of
        :func:`evit_keep_rate_schedule` over ``steps_per_epoch`` iterations of the epoch (the
        released code sets it every iteration; one rate per epoch, its mean, keeps a short run's
        warm-up: a one-epoch fine-tune trains at 0.76 on its way to 0.7, not at 1 throughout)."""
        start, length = self.shrink_schedule(epochs)
        rates = [evit_keep_rate_schedule(epoch + i / steps_per_epoch, start, length, self.keep_rate)
                 for i in range(steps_per_epoch)]
        self.train_keep_rate = sum(rates) / len(rates)

    def active_keep_rate(self) -> float:
        """The rate the next forward uses: the warm-up's in training mode, ``keep_rate`` in eval."""
        if self.training and self.train_keep_rate is not None:
            return self.train_keep_rate
        return self.keep_rate

    def token_counts(self, keep_rate: Optional[float] = None) -> List[int]:
        """Tokens (class token included) after each layer; static for a given keep rate."""
        keep_rate = self.keep_rate if keep_rate is None else keep_rate
        n = 1 + self.patch_embed.num_patches
        counts = []
        for i in range(len(self.blocks)):
            if i in self.reorganize_layers:
                k = evit_kept_tokens(n - 1, keep_rate)
                if k < n - 1:
                    n = 1 + k + int(self.fuse_token)
            counts.append(n)
        return counts

    def _blocks_taking(self, x: torch.Tensor, take: Sequence[int], stop: int) -> Tuple[torch.Tensor, List[TakenTokens]]:
        """Blocks 0..``stop``; the patch index of every image token is tracked while blocks are
        taken (a fused token has none: -1)."""
        taken: List[TakenTokens] = []
        positions: Optional[torch.Tensor] = None  # (B, L - 1); None: all patches, in order
        keep_rate = self.active_keep_rate()
        entering = [1 + self.patch_embed.num_patches] + self.token_counts(keep_rate)[:-1]  # static token counts
        for i, block in enumerate(self.blocks):
            if i > stop:
                break
            track = bool(take)  # the kept indices only when taking (the block returns a plain tensor otherwise)
            if self.grad_checkpointing and torch.is_grad_enabled():
                out = checkpoint(block, x, keep_rate, self.fuse_token, track, entering[i], use_reentrant=False)
            else:
                out = block(x, keep_rate, self.fuse_token, track, entering[i])
            x, index = out if track else (out, None)
            if index is not None and take:
                if positions is None:
                    positions = torch.arange(self.patch_embed.num_patches, device=x.device).expand(x.shape[0], -1)
                positions = positions.gather(1, index)
                if self.fuse_token:
                    positions = torch.cat([positions, positions.new_full((x.shape[0], 1), -1)], dim=1)
            if i in take:
                taken.append((x, 0, positions))
        return x, taken


# _cfg's crop_pct 0.875 is DeiT's released eval, which the released baseline code uses too
default_cfgs = generate_default_cfgs({
    "evit_base_patch16_224": _cfg(),
    "evit_small_patch16_224": _cfg(),
})

@register_model
def evit_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> EViT:
    """EViT on DeiT-B: keep_rate 0.7 by default (0.6 and others by keyword)."""
    return create_deit_variant(EViT, "evit_base_patch16_224", "deit_base_patch16_224", pretrained, **kwargs)


@register_model
def evit_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> EViT:
    """EViT on DeiT-S: keep_rate 0.7 by default."""
    return create_deit_variant(EViT, "evit_small_patch16_224", "deit_small_patch16_224", pretrained, **kwargs)
