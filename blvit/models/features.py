"""timm's feature API for this toolkit's token models: ``forward_intermediates``,
``prune_intermediate_layers``, ``feature_info`` and so ``features_only=True``.

Every block's output is a sequence of tokens. For the NCHW format the image tokens go back to
their patch grid: in place for bLViT (no token is ever dropped) and Vim without merging; for
EViT and DynamicViT, whose later blocks hold fewer tokens, each kept token is scattered to the
patch it came from and the positions of dropped tokens are zero (EViT's fused token has no
patch: it is left out of the grid). Vision Mamba with R-MeeTo merging has no per-patch tokens
after a merge: NCHW there is an error that says so; NLC (the tokens as they are) works for all.
"""
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from timm.models._features import feature_take_indices

__all__ = ["TakenTokens", "TokenFeatures", "feature_info", "format_intermediates", "intermediates_result", "refuse_script", "take_indices"]

# (tokens (B, L, C), index of the prefix (class) token, patch index of each other token (B, L - 1)
# with -1 for a token without a patch (EViT's fused token), or None when all are in grid order)
TakenTokens = Tuple[torch.Tensor, int, Optional[torch.Tensor]]


def feature_info(depth: int, num_chs: int, reduction: int, prefix: str) -> List[Dict[str, Any]]:
    """One entry per block, as timm's ViTs list them."""
    return [dict(module=f"{prefix}.{i}", num_chs=num_chs, reduction=reduction) for i in range(depth)]


def take_indices(depth: int, indices: Optional[Union[int, List[int]]]) -> Tuple[List[int], int]:
    """timm's rule: the last ``indices`` blocks for an int, all for None, else the listed ones."""
    return feature_take_indices(depth, indices)


def _to_grid(image: torch.Tensor, positions: Optional[torch.Tensor], grid: Tuple[int, int], where: str) -> torch.Tensor:
    """(B, M, C) image tokens -> (B, C, H, W)."""
    b, m, c = image.shape
    h, w = grid
    if positions is None:
        if m != h * w:
            raise RuntimeError(f"{where}: {m} image tokens do not fill the {h}x{w} patch grid")
        return image.reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous()
    # one spare slot takes the tokens that have no patch; it is cut off afterwards
    slots = torch.where(positions < 0, torch.full_like(positions, h * w), positions)
    out = image.new_zeros(b, h * w + 1, c).scatter(1, slots.unsqueeze(-1).expand(-1, -1, c), image)
    return out[:, : h * w].reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous()


def format_intermediates(
    taken: Sequence[TakenTokens],
    grid: Tuple[int, int],
    output_fmt: str,
    merged_from: Optional[int] = None,
    indices: Sequence[int] = (),
) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """(image features, prefix tokens) of the taken blocks in ``output_fmt``.

    NCHW: (B, C, H, W) on the patch grid; NLC: (B, L - 1, C), the image tokens as they are.
    ``merged_from``: the first block whose tokens are merged (Vim + R-MeeTo): NCHW is refused
    from there on.
    """
    if output_fmt not in ("NCHW", "NLC"):
        raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
    features, prefixes = [], []
    for (tokens, cls_pos, positions), index in zip(taken, list(indices) + [None] * len(taken)):
        prefixes.append(tokens[:, cls_pos : cls_pos + 1])
        image = torch.cat([tokens[:, :cls_pos], tokens[:, cls_pos + 1 :]], dim=1)
        if output_fmt == "NLC":
            features.append(image)
            continue
        if merged_from is not None and index is not None and index >= merged_from:
            raise ValueError(
                f"block {index}: its tokens are merged (R-MeeTo, from block {merged_from}), so they have no patch "
                "grid; ask for output_fmt='NLC', blocks before the first merge, or remove the merging "
                "(blvit.tokens.remove_rmeeto)")
        features.append(_to_grid(image, positions, grid, f"block {index}"))
    return features, prefixes


def intermediates_result(
    final: torch.Tensor,
    features: List[torch.Tensor],
    prefixes: List[torch.Tensor],
    return_prefix_tokens: bool,
    intermediates_only: bool,
):
    """timm's return convention: the list, or (final normalised tokens, list); with
    ``return_prefix_tokens`` each entry is (features, prefix tokens)."""
    out: List[Any] = list(zip(features, prefixes)) if return_prefix_tokens else features
    return out if intermediates_only else (final, out)


class TokenFeatures:
    """Mixin: timm's ``forward_intermediates`` for a token model that provides
    ``_feature_depth()`` (number of blocks), ``patch_embed.grid_size`` and
    ``_intermediate_run(x, take, stop, norm) -> (final normalised tokens, taken, merged_from)``
    (blocks 0..``stop`` run; ``taken``: :data:`TakenTokens` of the blocks in ``take``)."""

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """The outputs of blocks ``indices`` (an int: the last that many; None: all) as
        (B, C, H, W) on the patch grid (``output_fmt="NCHW"``; see the module's docstring for
        dropped and merged tokens) or (B, L - 1, C) image tokens ("NLC"); ``norm``: through the
        final norm. Returns the list (``intermediates_only``) or (final normalised tokens, list);
        with ``return_prefix_tokens`` each entry is (features, class token (B, 1, C))."""
        depth = self._feature_depth()
        take, max_index = take_indices(depth, indices)
        stop = max_index if (stop_early or intermediates_only) else depth - 1
        final, taken, merged_from = self._intermediate_run(x, take, stop, norm)
        features, prefixes = format_intermediates(taken, self.patch_embed.grid_size, output_fmt, merged_from, take)
        return intermediates_result(final, features, prefixes, return_prefix_tokens, intermediates_only)


def refuse_script(model) -> None:
    """``torch.jit.script`` on these models: one clear error with what works instead."""
    raise RuntimeError(
        f"torch.jit.script does not compile {type(model).__name__}: its token routing / merging is Python code "
        "(config dataclasses, per-layer dicts, data-dependent token counts) that TorchScript's compiler "
        "cannot type, and torch.jit.script is deprecated in PyTorch 2. What works: torch.jit.trace(model, "
        "example) (TorchScript by tracing: fixed input size and keep ratio), torch.fx.symbolic_trace(model), "
        "torch.compile(model). See docs/method.md, 'timm's model API'.")
