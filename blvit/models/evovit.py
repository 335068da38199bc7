"""Evo-ViT (Xu et al., "Evo-ViT: Slow-Fast Token Evolution for Dynamic Vision Transformer",
AAAI 2022) on DeiT, registered with timm as ``evovit_small_patch16_224`` / ``evovit_base_patch16_224``.

What the released code (``deit/evo_deit.py`` of YifanXu74/Evo-ViT) does, and this module with it:

- **Global class attention.** Every layer computes the class token's attention to the image
  tokens (summed over heads; the released code's ``cls_attn``). In the first ``prune_start``
  layers (4) it replaces the running score; from there on the score is updated with momentum:
  ``score = (1 - m) * score + m * new`` (``tradeoff`` 0.5), for the slow tokens only.
- **Slow and fast tokens.** From layer ``prune_start`` on, the image tokens are sorted by the
  score and the first ``int(keep_rate * N)`` of them (98 of 196 at keep 0.5) plus the class
  token are the slow tokens: only they go through the layer (attention among themselves, MLP).
  ``schedule="stage"`` (what the released models are evaluated with, and trained with in the last
  third of the epochs) sorts at the stage starts (layers 4 and 8) only; ``schedule="layer"``
  (the first 200 of 300 epochs) sorts before every layer.
- **Fast tokens.** In the released DeiT code they are placeholders: they keep their value and
  rejoin the sequence at the end of the stage ("only preserving the placeholder tokens presents
  enough good results on DeiT"), ``fast_update="none"``. The paper's representative token is
  ``fast_update="representative"``: the fast tokens' score-weighted mean goes through the layer
  with the slow tokens and its residual update is added to every fast token.
- **Head.** The released model classifies from the mean of the image tokens, normalised
  (``global_pool="avg"``), and trains a second head on the class token (``head_cls``,
  ``norm_cls``; loss ``0.5 CE(avg) + 0.5 CE(cls)``: :meth:`EvoViT.auxiliary_logits`). DeiT's
  head reads the class token (``global_pool="token"``, the default here): then at keep rate 1.0
  the model computes exactly what the DeiT it is initialised from computes (the property this
  toolkit checks every baseline by). Released Evo-ViT checkpoints need ``global_pool="avg"``.

Shapes are static: the slow-token count is a function of the keep rate and the grid. Parameter
names are ``blvit.blocks.DenseBlock``'s, so DeiT files load through
:func:`blvit.models.blvit_vit.checkpoint_filter_fn`; released Evo-ViT files (``qks``, ``vs``,
``norms``, ``projs``) through :func:`checkpoint_filter_fn` here.
"""
import logging
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm.models import generate_default_cfgs, register_model
from torch.utils.checkpoint import checkpoint

from ..utils.io import CheckpointError
from .blvit_vit import ClassTokenViT, _cfg, checkpoint_filter_fn as deit_filter_fn, create_deit_variant
from .evit import EViTBlock, drop_path
from .features import TakenTokens

logger = logging.getLogger(__name__)

__all__ = ["EvoViT", "checkpoint_filter_fn", "evovit_slow_tokens"]

SCHEDULES = ("stage", "layer")
FAST_UPDATES = ("none", "representative")
POOLS = ("token", "avg")


def evovit_slow_tokens(num_image_tokens: int, keep_rate: float) -> int:
    """Image tokens that take the slow (full) path: ``int(keep_rate * N)`` as the released code
    counts them, at least one."""
    return max(1, min(num_image_tokens, int(keep_rate * num_image_tokens)))


def rank_tokens(score: torch.Tensor) -> torch.Tensor:
    """(B, N) running class attention -> (B, N) image-token order, most attended first."""
    return score.argsort(dim=1, descending=True)


def _gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, N, C) gathered along dim 1 by (B, M) indices -> (B, M, C)."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class EvoViT(ClassTokenViT):
    """DeiT with Evo-ViT slow-fast token evolution (timm interface).

    (B, in_chans, img_size, img_size) -> (B, num_classes). ``forward_features``: (B, 1 + N, C)
    tokens (class token first; the image tokens in the order of the last sort, all N of them:
    Evo-ViT drops none), normalised for ``global_pool="token"``, before the pooled norm for "avg".
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
        keep_rate: float = 0.5,
        prune_start: int = 4,
        stage_starts: Sequence[int] = (4, 8),
        momentum: float = 0.5,
        schedule: str = "stage",
        fast_update: str = "none",
        global_pool: str = "token",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        """
        Args:
            keep_rate: fraction of the image tokens on the slow path, in (0, 1].
            prune_start: first layer (0-based) with slow and fast tokens; the score is the plain
                class attention before it.
            stage_starts: layers where ``schedule="stage"`` re-sorts (the first must be
                ``prune_start``).
            momentum: weight of a layer's new class attention in the running score (the
                released ``tradeoff`` 0.5).
            schedule: "stage" (sort at ``stage_starts``) or "layer" (sort before every layer).
            fast_update: "none" (released DeiT code) or "representative" (the paper).
            global_pool: "token" (DeiT's class-token head) or "avg" (the released Evo-ViT head:
                normalised mean of the image tokens, plus the auxiliary class-token head).
        """
        problems = []
        if schedule not in SCHEDULES:
            problems.append(f"schedule {schedule!r} not in {SCHEDULES}")
        if fast_update not in FAST_UPDATES:
            problems.append(f"fast_update {fast_update!r} not in {FAST_UPDATES}")
        if global_pool not in POOLS:
            problems.append(f"global_pool {global_pool!r} not in {POOLS}")
        if not 0 <= prune_start <= depth:
            problems.append(f"prune_start {prune_start} outside 0..{depth}")
        stage_starts = tuple(sorted(int(s) for s in stage_starts))
        if schedule == "stage" and (not stage_starts or stage_starts[0] != prune_start
                                    or any(not 0 <= s < depth for s in stage_starts)):
            problems.append(f"stage_starts {stage_starts} must start at prune_start {prune_start} and lie in 0..{depth - 1}")
        if not 0.0 <= momentum <= 1.0:
            problems.append(f"momentum {momentum} must be in [0, 1]")
        if problems:
            raise ValueError("invalid Evo-ViT settings: " + "; ".join(problems))
        img_size = self.checked_image_size("Evo-ViT", img_size, patch_size, "token")
        super().__init__(img_size, patch_size, in_chans, embed_dim)
        self.keep_rate = keep_rate
        self.prune_start, self.stage_starts, self.momentum = int(prune_start), stage_starts, float(momentum)
        self.schedule, self.fast_update = schedule, fast_update
        self.global_pool = global_pool
        rates = [drop_path_rate * i / max(1, depth - 1) for i in range(depth)]
        self.blocks = nn.ModuleList(EViTBlock(embed_dim, num_heads, mlp_ratio, qkv_bias, rates[i]) for i in range(depth))
        self._set_feature_info(patch_size)
        self._init_head(num_classes, drop_rate)
        if global_pool == "avg":  # the released model's auxiliary class-token head
            self.norm_cls = nn.LayerNorm(embed_dim, eps=1e-6)
            self.head_cls = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    @property
    def keep_rate(self) -> float:
        return self._keep_rate

    @keep_rate.setter
    def keep_rate(self, value: float) -> None:
        if not 0.0 < value <= 1.0:
            raise ValueError(f"keep_rate {value} must be in (0, 1]")
        self._keep_rate = float(value)

    @staticmethod
    def is_new_parameter(key: str) -> bool:
        """The auxiliary head: a DeiT file cannot provide it."""
        return key.startswith(("head_cls.", "norm_cls."))

    def set_epoch(self, epoch: int, epochs: int) -> None:
        """The released training schedule: layer-wise sorting for the first two thirds of the
        epochs (200 of 300), stage-wise after (what the model is evaluated with)."""
        self.schedule = "layer" if epoch < (2 * epochs) // 3 else "stage"

    def slow_token_counts(self, keep_rate: Optional[float] = None) -> List[int]:
        """Tokens (class token included) each layer runs its attention and MLP on."""
        n = self.patch_embed.num_patches
        k = evovit_slow_tokens(n, self.keep_rate if keep_rate is None else keep_rate)
        extra = int(self.fast_update == "representative")
        return [1 + n if i < self.prune_start or k >= n else 1 + k + extra for i in range(len(self.blocks))]

    def _layer(self, block: EViTBlock, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """One DeiT layer on (B, L, C) -> (tokens (B, L, C), class attention (B, L - 1), summed over heads)."""
        out, cls_attn = block.attention_with_cls_attn(block.norm1(x))  # mean over heads
        x = x + drop_path(out, block.drop_path, self.training)
        x = x + drop_path(block.mlp(block.norm2(x)), block.drop_path, self.training)
        return x, cls_attn * block.attn.num_heads

    def _run_layer(self, block: EViTBlock, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(self._layer, block, x, use_reentrant=False)
        return self._layer(block, x)

    def _blocks_taking(self, x: torch.Tensor, take: Sequence[int], stop: int) -> Tuple[torch.Tensor, List[TakenTokens]]:
        """Blocks 0..``stop`` on (B, 1 + N, C); while blocks are taken, the image tokens' patch
        positions are tracked (the sorts reorder the sequence) and taken tokens are in patch order."""
        taken: List[TakenTokens] = []
        n = self.patch_embed.num_patches
        k = evovit_slow_tokens(n, self.keep_rate)
        positions: Optional[torch.Tensor] = None
        score: Optional[torch.Tensor] = None  # (B, N) running global class attention
        m = self.momentum
        for i, block in enumerate(self.blocks):
            if i > stop:
                break
            if i < self.prune_start or k >= n:
                x, attn = self._run_layer(block, x)
                score = attn if score is None or i < self.prune_start else (1 - m) * score + m * attn
            else:
                if self.schedule == "layer" or i in self.stage_starts:
                    order = rank_tokens(score)
                    x = torch.cat([x[:, :1], _gather_tokens(x[:, 1:], order)], dim=1)
                    score = score.gather(1, order)
                    if take:
                        if positions is None:
                            positions = torch.arange(n, device=x.device).expand(x.shape[0], -1)
                        positions = positions.gather(1, order)
                x, score = self._slow_fast(block, x, score, k)
            if i in take:  # in patch order again (Evo-ViT keeps every token: the sorts are a permutation)
                if positions is not None:
                    image = x[:, 1:].scatter(1, positions.unsqueeze(-1).expand(-1, -1, x.shape[-1]), x[:, 1:])
                    taken.append((torch.cat([x[:, :1], image], dim=1), 0, None))
                else:
                    taken.append((x, 0, None))
        return x, taken

    def _slow_fast(self, block: EViTBlock, x: torch.Tensor, score: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """One layer with the first 1 + k tokens (sorted) on the slow path."""
        slow, fast = x[:, : 1 + k], x[:, 1 + k:]
        if self.fast_update == "representative":
            weights = score[:, k:].clamp(min=1e-6)
            weights = (weights / weights.sum(1, keepdim=True)).to(x.dtype)
            representative = torch.bmm(weights.unsqueeze(1), fast)  # (B, 1, C)
            out, attn = self._run_layer(block, torch.cat([slow, representative], dim=1))
            fast = fast + (out[:, -1:] - representative)
            slow, attn = out[:, :-1], attn[:, :k]
        else:
            slow, attn = self._run_layer(block, slow)
        m = self.momentum
        score = torch.cat([(1 - m) * score[:, :k] + m * attn, score[:, k:]], dim=1)
        return torch.cat([slow, fast], dim=1), score

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, 1 + N, C) tokens (see the class docstring)."""
        x, _ = self._blocks_taking(self._embed(x), (), len(self.blocks) - 1)
        return self.norm(x) if self.global_pool == "token" else x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, L, C) -> (B, num_classes): the class token ("token") or the normalised mean of
        the image tokens ("avg", the released head)."""
        pooled = x[:, 0] if self.global_pool == "token" else self.norm(x[:, 1:].mean(1))
        pooled = self.head_drop(pooled)
        return pooled if pre_logits else self.head(pooled)

    def auxiliary_logits(self, features: torch.Tensor) -> Optional[torch.Tensor]:
        """The released training's second head on the class token ("avg" only; else None):
        the trainer's loss is then ``0.5 CE(forward_head) + 0.5 CE(auxiliary_logits)``."""
        if self.global_pool != "avg":
            return None
        return self.head_cls(self.norm_cls(features[:, 0]))

    def _intermediate_run(self, x: torch.Tensor, take: Sequence[int], stop: int, norm: bool):
        x, taken = self._blocks_taking(self._embed(x), take, stop)
        if norm:
            taken = [(self.norm(t), c, p) for t, c, p in taken]
        return (self.norm(x) if self.global_pool == "token" else x), taken, None

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Also takes a released Evo-ViT state dict (timm's ``checkpoint_path=`` comes here)."""
        if any(k.startswith(_RELEASED) or k.startswith(("head_cls.", "norm_cls.")) for k in state_dict):
            state_dict = checkpoint_filter_fn(state_dict, self)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None and global_pool != self.global_pool:
            raise ValueError(f"global_pool is fixed at build time ({self.global_pool!r}); got {global_pool!r}")
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if self.global_pool == "avg":
            self.head_cls = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()


_RELEASED = ("qks.", "vs.", "norms.", "projs.")


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: EvoViT) -> Dict[str, torch.Tensor]:
    """A released Evo-ViT file (``qks.{i}.qk`` (2C, C), ``vs.{i}.v`` (C, C), ``norms.{i}``,
    ``projs.{i}``, ``blocks.{i}.norm2`` / ``mlp``, ``head``, ``head_cls``, ``norm_cls``) or a DeiT
    file -> this model's keys. The released q, k and v projections become one ``attn.qkv``
    (rows q, k, v as DeiT's). The auxiliary head is dropped for a class-token model (it has none);
    a class-token model refuses a released file, whose ``head`` was trained on the averaged tokens."""
    for key in ("model", "state_dict"):
        if isinstance(state_dict.get(key), Mapping):
            state_dict = state_dict[key]
            break
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    if any(k.startswith(_RELEASED) for k in state):
        if model.global_pool != "avg":
            raise CheckpointError(
                "a released Evo-ViT checkpoint: its head classifies the averaged image tokens; build the "
                "model with global_pool='avg' to load it"
            )
        out: Dict[str, torch.Tensor] = {}
        for key, value in state.items():
            parts = key.split(".")
            if parts[0] == "qks" and parts[2] == "qk":
                v_key = f"vs.{parts[1]}.v.{parts[3]}"
                if v_key not in state:
                    raise CheckpointError(f"released Evo-ViT checkpoint: {key} without {v_key}")
                out[f"blocks.{parts[1]}.attn.qkv.{parts[3]}"] = torch.cat([value, state[v_key]], dim=0)
            elif parts[0] == "vs":
                continue
            elif parts[0] == "norms":
                out[f"blocks.{parts[1]}.norm1.{parts[2]}"] = value
            elif parts[0] == "projs":
                out[f"blocks.{parts[1]}.attn.proj.{parts[2]}"] = value
            else:
                out[key] = value
        state = out
    elif model.global_pool != "avg":
        for key in [k for k in state if k.startswith(("head_cls.", "norm_cls."))]:
            state.pop(key)
    return deit_filter_fn(state, model)


default_cfgs = generate_default_cfgs({
    "evovit_base_patch16_224": _cfg(),
    "evovit_small_patch16_224": _cfg(),
})


@register_model
def evovit_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> EvoViT:
    """Evo-ViT on DeiT-B: keep rate 0.5 from layer 4, stage-wise (the released DeiT-B model)."""
    return create_deit_variant(EvoViT, "evovit_base_patch16_224", "deit_base_patch16_224", pretrained,
                               filter_fn=checkpoint_filter_fn, **kwargs)


@register_model
def evovit_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> EvoViT:
    """Evo-ViT on DeiT-S: keep rate 0.5 from layer 4, stage-wise."""
    return create_deit_variant(EvoViT, "evovit_small_patch16_224", "deit_small_patch16_224", pretrained,
                               filter_fn=checkpoint_filter_fn, **kwargs)
