"""``BigLittleImageEncoder``: a drop-in for segment-anything's ``ImageEncoderViT``."""
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.image_encoder import PatchEmbed

from blvit.blocks import layout_block
from blvit.routing import TokenPredictor, TokenSelection, select_windowed

from .config import BigLittleSamConfig


class BigLittleImageEncoder(nn.Module):
    """SAM image encoder with big.LITTLE layers.

    (B, 3, img_size, img_size) normalised, padded images -> (B, out_chans, img_size/16, img_size/16).
    Dense layers, P-blocks, the patch embedding, position embedding and neck use
    segment-anything's parameter names, so a SAM encoder state dict loads into them directly;
    new parameters live under ``blocks.{i}.e_block``, ``blocks.{i}.gamma_*`` and
    ``predictors.{i}``. Token selection is per window (the same k in every window, padding
    never selected) and is reused in global-attention layers, where the selected tokens of all
    windows are the queries.
    """

    def __init__(self, config: BigLittleSamConfig) -> None:
        super().__init__()
        self.config = config
        self.img_size = config.img_size  # read by SamPredictor / Sam.preprocess
        self.patch_size = config.patch_size
        # Set True to keep the last forward's selections in ``last_selections`` (demo, plots).
        self.record_selections = False
        self.last_selections: Dict[int, TokenSelection] = {}
        self.grad_checkpointing = False  # recompute block activations in backward (training memory)
        grid = (config.grid_size, config.grid_size)
        self.patch_embed = PatchEmbed(
            kernel_size=(config.patch_size, config.patch_size),
            stride=(config.patch_size, config.patch_size),
            in_chans=config.in_chans,
            embed_dim=config.embed_dim,
        )
        self.pos_embed = nn.Parameter(torch.zeros(1, *grid, config.embed_dim))
        self.blocks = nn.ModuleList()
        for i in range(config.depth):
            common = dict(
                dim=config.embed_dim,
                num_heads=config.num_heads,
                mlp_ratio=config.mlp_ratio,
                use_rel_pos=True,
                window_size=0 if i in config.global_attn_indexes else config.window_size,
                grid=grid,
            )
            self.blocks.append(layout_block(config, i, **common))
        self.predictors = nn.ModuleDict({str(i): TokenPredictor(config.embed_dim) for i in config.predictor_layers})
        self.neck = nn.Sequential(
            nn.Conv2d(config.embed_dim, config.out_chans, kernel_size=1, bias=False),
            LayerNorm2d(config.out_chans),
            nn.Conv2d(config.out_chans, config.out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(config.out_chans),
        )

    def check_input(self, x: torch.Tensor) -> None:
        size, chans = self.config.img_size, self.config.in_chans
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"image encoder input must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(
                f"image encoder input must be a float tensor of normalised pixels, got dtype {x.dtype} "
                "(use Sam.preprocess or SamPredictor.set_image for uint8 images)"
            )
        if x.dim() != 4 or x.shape[1] != chans or x.shape[2] != size or x.shape[3] != size:
            raise ValueError(
                f"image encoder input must have shape (B, {chans}, {size}, {size}), got {tuple(x.shape)} "
                "(resize the long side to img_size and pad, as Sam.preprocess does)"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, selections = self.forward_with_selections(x)
        if self.record_selections:
            self.last_selections = selections
        return out

    def forward_with_selections(self, x: torch.Tensor) -> Tuple[torch.Tensor, Dict[int, TokenSelection]]:
        """Like ``forward``, also returning the selection made at each predictor layer."""
        out, selections, _ = self._run(x, ())
        return out, selections

    def forward_intermediates(self, x: torch.Tensor, layers: Sequence[int]) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Like ``forward``, also returning the (B, H/16, W/16, C) token maps after each of the
        given blocks (0-based), in the order given: what intermediate-layer distillation compares."""
        out, _, intermediates = self._run(x, layers)
        return out, intermediates

    def _run(self, x: torch.Tensor, layers: Sequence[int]):
        self.check_input(x)
        bad = [i for i in layers if not 0 <= i < len(self.blocks)]
        if bad:
            raise ValueError(f"intermediate layers {bad} out of range: the encoder has blocks 0..{len(self.blocks) - 1}")
        x = self.patch_embed(x) + self.pos_embed  # (B, H, W, C)
        b, h, w, c = x.shape
        grid = (h, w)
        x = x.reshape(b, h * w, c).contiguous()  # the conv output is channels-last strided
        selection = None
        selections: Dict[int, TokenSelection] = {}
        kept: Dict[int, torch.Tensor] = {}
        for i, block in enumerate(self.blocks):
            predictor = self.predictors[str(i)] if str(i) in self.predictors else None
            if predictor is not None:
                selection = select_windowed(
                    predictor(x), grid, self.config.window_size, self.config.keep_ratio, self.config.router_score
                )
                selections[i] = selection
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, grid, selection, use_reentrant=False)
            else:
                x = block(x, grid, selection)
            if i in layers:
                kept[i] = x.view(b, h, w, c)
        x = self.neck(x.view(b, h, w, c).permute(0, 3, 1, 2))
        return x, selections, [kept[i] for i in layers]
