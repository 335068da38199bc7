"""DynamicViT (Rao et al., NeurIPS 2021): learned token pruning on DeiT, the second baseline the
bLViT paper compares with. Registered with timm as ``dynamicvit_base_patch16_224`` /
``dynamicvit_small_patch16_224``.

Before the pruning layers (0-based 3, 6, 9) a small predictor scores every image token from its
own features and a policy-weighted mean of all of them ("local + global"). Stage s keeps
``int(M * keep_ratio**s)`` of the M image tokens: 196 -> 137 -> 96 -> 67 at keep_ratio 0.7.

- **Inference** (``model.eval()``): the top-scoring tokens are gathered (static k), the class
  token always kept; the rest of the network runs on the shorter sequence with SDPA.
- **Training**: every token stays in the tensor; a binary keep decision is sampled per token by
  Gumbel-softmax (straight-through) and multiplied into a running ``policy`` (B, N). Attention
  then only lets a token see kept tokens and itself (DynamicViT's "softmax with policy", which
  also passes gradients to the decisions). ``pruning_loss()`` returns the ratio loss
  ``mean_s mean_b (mean(policy_{s,b}) - keep_ratio**s)^2`` that pulls every image's kept
  fraction to the schedule (the released ``DistillDiffPruningLoss`` with its default
  ``dynamic=False``; ``dynamic_ratio=True``: the batch's mean fraction instead); the
  classification trainer adds it with weight ``loss.ratio_weight``.

At keep_ratio 1.0 no token is pruned and the model is DeiT (same weights, same logits). Blocks
use ``blvit.blocks.DenseBlock`` names, so DeiT checkpoints load through
:func:`blvit.models.blvit_vit.checkpoint_filter_fn`; only ``predictors.*`` are new.
"""
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model

from ..blocks import DenseBlock
from .blvit_vit import ClassTokenViT, _cfg, create_deit_variant
from .blvit_vit import checkpoint_filter_fn  # noqa: F401  (the loaders look the filter up in the model's module)
from .evit import EViTBlock, drop_path
from .features import TakenTokens

__all__ = ["DynamicViT", "PruningPredictor", "dynamicvit_kept_tokens"]


def dynamicvit_kept_tokens(num_image_tokens: int, keep_ratio: float, stage: int) -> int:
    """Image tokens kept after pruning stage ``stage`` (1-based): int(M * keep_ratio**stage)."""
    return max(1, min(num_image_tokens, int(num_image_tokens * keep_ratio**stage)))


class PruningPredictor(nn.Module):
    """Per-token keep/drop log-probabilities from local and policy-weighted global features.

    x (B, M, C) image tokens, policy (B, M, 1) in [0, 1] -> (B, M, 2) log-probabilities,
    channel 0 = keep.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.in_conv = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, dim // 4), nn.GELU(), nn.Linear(dim // 4, 2)
        )

    def forward(self, x: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
        x = self.in_conv(x)
        half = x.shape[-1] // 2
        local, glob = x[..., :half], x[..., half:]
        glob = (glob * policy).sum(dim=1, keepdim=True) / policy.sum(dim=1, keepdim=True).clamp(min=1e-6)
        x = torch.cat([local, glob.expand(-1, x.shape[1], -1)], dim=-1)
        return F.log_softmax(self.out_conv(x).float(), dim=-1)


def attention_with_policy(block: DenseBlock, x: torch.Tensor, policy: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """A DenseBlock's attention sub-block (B, N, C) -> (B, N, C) where token i attends to token
    j with weight proportional to exp(logit_ij) * (policy_j, or 1 if i == j)."""
    attn = block.attn
    b, n, _ = x.shape
    q, k, v = attn.qkv(x).view(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    logits = (q * attn.head_dim**-0.5) @ k.transpose(-2, -1)  # (B, h, N, N)
    eye = torch.eye(n, device=x.device, dtype=policy.dtype)
    allowed = policy[:, None, None, :] * (1 - eye) + eye  # (B, 1, N, N)
    weights = (logits.float() - logits.float().amax(dim=-1, keepdim=True)).exp() * allowed
    weights = (weights + eps / n) / (weights.sum(dim=-1, keepdim=True) + eps)
    out = (weights.to(v.dtype) @ v).transpose(1, 2).reshape(b, n, -1)
    return attn.proj(out)


class DynamicViT(ClassTokenViT):
    """DeiT with DynamicViT token pruning (timm interface).

    (B, in_chans, img_size, img_size) -> (B, num_classes). ``forward_features`` in eval mode:
    -> (B, L, C), L = ``token_counts()[-1]`` (68 for 224 px at keep_ratio 0.7); in training mode
    all 1 + M tokens come back (the pruned ones masked out of attention).
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
        keep_ratio: float = 0.7,
        prune_layers: Sequence[int] = (3, 6, 9),
        gumbel_tau: float = 1.0,
        dynamic_ratio: bool = False,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        global_pool: str = "token",
    ) -> None:
        """
        Args:
            keep_ratio: rho; stage s keeps int(M * rho**s) image tokens, rho in (0, 1].
            prune_layers: 0-based layers before which a predictor prunes (DynamicViT: 3, 6, 9).
            gumbel_tau: temperature of the training-time Gumbel-softmax decisions.
            dynamic_ratio: the ratio loss on the batch's mean kept fraction (the released loss's
                ``dynamic=True``) instead of each image's (its default, ``dynamic=False``).
            drop_path_rate: stochastic depth of both residual branches, rising linearly from 0
                at the first layer to this rate at the last (timm's VisionTransformer).
        """
        img_size = self.checked_image_size("DynamicViT", img_size, patch_size, global_pool)
        bad = [i for i in prune_layers if not 0 < i < depth]
        if bad:
            raise ValueError(f"prune_layers {bad} outside 1..{depth - 1}")
        if not 0.0 < keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio {keep_ratio} must be in (0, 1]")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate {drop_path_rate} must be in [0, 1)")
        super().__init__(img_size, patch_size, in_chans, embed_dim)
        self.keep_ratio = float(keep_ratio)
        self.gumbel_tau = gumbel_tau
        self.dynamic_ratio = bool(dynamic_ratio)
        self.prune_layers = tuple(sorted(int(i) for i in prune_layers))
        # DenseBlock names and function plus per-branch stochastic depth (EViTBlock, never reorganising),
        # rising as timm's VisionTransformer does: torch.linspace(0, drop_path_rate, depth)
        rates = [drop_path_rate * i / max(1, depth - 1) for i in range(depth)]
        self.blocks = nn.ModuleList(EViTBlock(embed_dim, num_heads, mlp_ratio, qkv_bias, rate) for rate in rates)
        self.predictors = nn.ModuleDict({str(i): PruningPredictor(embed_dim) for i in self.prune_layers})
        self._set_feature_info(patch_size)
        self._init_head(num_classes, drop_rate)
        self.init_weights()
        self._keep_fractions: List[torch.Tensor] = []

    @staticmethod
    def is_new_parameter(key: str) -> bool:
        return key.startswith("predictors.")

    def token_counts(self) -> List[int]:
        """Tokens (class token included) entering each layer at inference."""
        m = self.patch_embed.num_patches
        counts, stage = [], 0
        for i, block in enumerate(self.blocks):
            if i in self.prune_layers:
                stage += 1
                m = dynamicvit_kept_tokens(self.patch_embed.num_patches, self.keep_ratio, stage)
            counts.append(1 + m)
        return counts

    def pruning_loss(self) -> torch.Tensor:
        """Ratio loss of the last training forward: the mean over stages s of
        mean_b (kept fraction of image b - keep_ratio**s)^2, as raoyongming/DynamicViT losses.py
        ``DistillDiffPruningLoss`` computes it (``score.mean(1)``, ``dynamic=False``, the default
        its main.py builds); with ``dynamic_ratio`` the batch's mean fraction (``dynamic=True``).
        Zero outside training."""
        if not self._keep_fractions:
            return self.pos_embed.new_zeros(())
        terms = []
        for s, fractions in enumerate(self._keep_fractions):  # fractions: (B,)
            kept = fractions.mean() if self.dynamic_ratio else fractions
            terms.append(((kept - self.keep_ratio ** (s + 1)) ** 2).mean())
        return torch.stack(terms).mean()

    def _forward_pruned(self, x: torch.Tensor, take: Sequence[int] = (), stop: int = -1
                        ) -> Tuple[torch.Tensor, List[TakenTokens]]:
        stage = 0
        taken: List[TakenTokens] = []
        positions: Optional[torch.Tensor] = None  # patch index of each image token, tracked when taking
        image_tokens = self.patch_embed.num_patches  # known statically (traceable)
        for i, block in enumerate(self.blocks):
            if stop >= 0 and i > stop:
                break
            if i in self.prune_layers:
                stage += 1
                k = dynamicvit_kept_tokens(self.patch_embed.num_patches, self.keep_ratio, stage)
                image = x[:, 1:]
                if k < image_tokens:
                    image_tokens = k
                    ones = image.new_ones(image.shape[0], image.shape[1], 1)
                    score = self.predictors[str(i)](image, ones)[..., 0]  # (B, M') keep log-prob
                    index = score.topk(k, dim=1, sorted=False).indices.sort(dim=1).values  # keep patch order
                    image = image.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
                    x = torch.cat([x[:, :1], image], dim=1)
                    if take:
                        if positions is None:
                            positions = torch.arange(self.patch_embed.num_patches, device=x.device).expand(x.shape[0], -1)
                        positions = positions.gather(1, index)
            x = block(x)
            if i in take:
                taken.append((x, 0, positions))
        return x, taken

    def _forward_masked(self, x: torch.Tensor, take: Sequence[int] = (), stop: int = -1
                        ) -> Tuple[torch.Tensor, List[TakenTokens]]:
        """Training: every token stays (masked in attention), so all stay in place."""
        b, n, _ = x.shape
        policy = x.new_ones(b, n - 1, 1)
        self._keep_fractions = []
        taken: List[TakenTokens] = []
        for i, block in enumerate(self.blocks):
            if stop >= 0 and i > stop:
                break
            if i in self.prune_layers:
                log_probs = self.predictors[str(i)](x[:, 1:], policy)
                decision = F.gumbel_softmax(log_probs, tau=self.gumbel_tau, hard=True)[..., :1]  # (B, M, 1)
                policy = (decision * policy).to(x.dtype)
                self._keep_fractions.append(policy.float().mean(dim=(1, 2)))
            if self._keep_fractions:
                full = torch.cat([policy.new_ones(b, 1, 1), policy], dim=1)[..., 0]  # class token kept
                x = x + drop_path(attention_with_policy(block, block.norm1(x), full), block.drop_path, self.training)
                x = x + drop_path(block.mlp(block.norm2(x)), block.drop_path, self.training)
            else:
                x = block(x)
            if i in take:
                taken.append((x, 0, None))
        return x, taken

    def _blocks_taking(self, x: torch.Tensor, take: Sequence[int], stop: int) -> Tuple[torch.Tensor, List[TakenTokens]]:
        if self.training and self.keep_ratio < 1.0:
            return self._forward_masked(x, take, stop)
        self._keep_fractions = []
        return self._forward_pruned(x, take, stop)


# _cfg's crop_pct 0.875 is DeiT's released eval, which the released baseline code uses too
default_cfgs = generate_default_cfgs({
    "dynamicvit_base_patch16_224": _cfg(),
    "dynamicvit_small_patch16_224": _cfg(),
})

@register_model
def dynamicvit_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> DynamicViT:
    """DynamicViT on DeiT-B: keep_ratio 0.7 by default."""
    return create_deit_variant(DynamicViT, "dynamicvit_base_patch16_224", "deit_base_patch16_224", pretrained, **kwargs)


@register_model
def dynamicvit_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> DynamicViT:
    """DynamicViT on DeiT-S: keep_ratio 0.7 by default."""
    return create_deit_variant(DynamicViT, "dynamicvit_small_patch16_224", "deit_small_patch16_224", pretrained, **kwargs)
