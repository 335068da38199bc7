"""Builders in the style of segment-anything's ``sam_model_registry``."""
import dataclasses
import logging
from functools import partial
from typing import Any, Callable, Dict, Optional

import torch
from segment_anything import sam_model_registry as stock_registry
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from blvit.utils.io import CheckpointError, PathLike, read_checkpoint, unwrap_state_dict

from .checkpoint import (FORMAT, load_blvit_sam_checkpoint, load_checked, load_e_blocks_from_sam, load_sam_checkpoint,
                         stored_config)
from .config import DENSE_SOURCE, RUNTIME_FIELDS, BigLittleSamConfig, make_config
from .image_encoder import BigLittleImageEncoder
from .token_reduction import TokenReductionImageEncoder

logger = logging.getLogger(__name__)

PIXEL_MEAN = [123.675, 116.28, 103.53]
PIXEL_STD = [58.395, 57.12, 57.375]


def sam_from_encoder(image_encoder: torch.nn.Module, prompt_embed_dim: int = 256, prompt_pe_scale: float = 1.0) -> Sam:
    """A ``Sam`` with segment-anything's own prompt encoder and mask decoder around any
    encoder that maps (B, 3, S, S) to (B, D, S/p, S/p) and has an ``img_size`` (and, if it is
    not 16, a ``patch_size`` p). D = ``prompt_embed_dim``.

    At D = 256 the decoder is exactly SAM's (two-way transformer of depth 2, MLP 2048, 8 heads,
    IoU head 256 wide). A narrower D scales it down in proportion (MLP 8 D, heads of 32 like
    SAM's, IoU head D wide): the same modules and the same API, for small models such as the
    quick start's, whose decoder would otherwise cost far more than their encoder.

    ``prompt_pe_scale`` scales the std of the prompt encoder's random Fourier frequencies (SAM:
    1). It only shapes a model trained from scratch: the frequencies are a buffer of the state
    dict, so a loaded checkpoint brings its own.
    """
    if prompt_pe_scale <= 0:
        raise ValueError(f"prompt_pe_scale must be positive, got {prompt_pe_scale}")
    grid = image_encoder.img_size // getattr(image_encoder, "patch_size", 16)
    if prompt_embed_dim % 32:
        raise ValueError(f"prompt_embed_dim (the encoder's out_chans) must be a multiple of 32, got {prompt_embed_dim}")
    sam = Sam(
        image_encoder=image_encoder,
        prompt_encoder=PromptEncoder(
            embed_dim=prompt_embed_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(image_encoder.img_size, image_encoder.img_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=prompt_embed_dim, mlp_dim=8 * prompt_embed_dim,
                                          num_heads=prompt_embed_dim // 32),
            transformer_dim=prompt_embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=prompt_embed_dim,
        ),
        pixel_mean=PIXEL_MEAN,
        pixel_std=PIXEL_STD,
    )
    # PositionEmbeddingRandom draws scale * N(0, 1); the stock PromptEncoder fixes scale at 1
    sam.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.mul_(prompt_pe_scale)
    return sam


def stock_encoder(family: str, img_size: int = 1024) -> ImageEncoderViT:
    """segment-anything's ``ImageEncoderViT`` of ``family`` (vit_b / vit_l / vit_h) at any
    ``img_size`` (the stock registry builds 1024 only), random weights."""
    cfg = make_config(family, img_size=img_size)
    return ImageEncoderViT(img_size=img_size, patch_size=16, embed_dim=cfg.embed_dim, depth=cfg.depth,
                           num_heads=cfg.num_heads, mlp_ratio=4.0, out_chans=256, qkv_bias=True,
                           norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_abs_pos=True, use_rel_pos=True,
                           rel_pos_zero_init=True, window_size=14, global_attn_indexes=cfg.global_attn_indexes)


def build_sam_from_config(config: BigLittleSamConfig, prompt_pe_scale: float = 1.0) -> Sam:
    """A Sam whose encoder is the one ``config`` describes: bLViT or dense (``BigLittleImageEncoder``),
    or a token-reduction baseline (``TokenReductionImageEncoder``, ``config.reduction`` set);
    ``prompt_pe_scale``: see :func:`sam_from_encoder`."""
    encoder = TokenReductionImageEncoder(config) if config.reduction else BigLittleImageEncoder(config)
    return sam_from_encoder(encoder, config.out_chans, prompt_pe_scale)


def build_sam_blvit(
    variant: str = "b+t",
    checkpoint: Optional[PathLike] = None,
    sam_checkpoint: Optional[PathLike] = None,
    keep_ratio: Optional[float] = None,
    e_checkpoint: Optional[PathLike] = None,
    prompt_pe_scale: float = 1.0,
    **overrides: Any,
) -> Sam:
    """Build a SAM whose image encoder is a bLViT encoder.

    Args:
        variant: "b+t", "h+b", or a dense layout "vit_b" / "vit_l" / "vit_h" (this toolkit's
            SDPA encoder); see ``sam_adapter.config.VARIANTS``.
        checkpoint: a bLViT-SAM checkpoint written by this toolkit (loaded last, strictly).
        sam_checkpoint: an official SAM file (``sam_vit_b_01ec64.pth`` for b+t,
            ``sam_vit_h_4b8939.pth`` for h+b): its encoder initialises the dense layers and
            P-blocks; its prompt encoder and mask decoder are kept.
        keep_ratio: fraction of tokens per window the P-blocks process (EViT / Evo-ViT: kept
            per stage / slow tokens); None: the ratio stored in ``checkpoint`` (as are its
            other runtime fields, ``RUNTIME_FIELDS``), else the variant's default (0.25 for b+t and h+b).
        e_checkpoint: a SAM file of the E-block width (ViT-B for h+b) to initialise E-blocks.
        prompt_pe_scale: std of the prompt encoder's random Fourier frequencies when it starts
            from scratch (SAM: 1); a checkpoint's own frequencies replace them.
        **overrides: any ``BigLittleSamConfig`` field (unknown names are an error).
    Returns:
        a ``segment_anything.modeling.Sam`` in eval mode, on the CPU.
    """
    if keep_ratio is not None:
        overrides["keep_ratio"] = keep_ratio
    saved = read_checkpoint(checkpoint) if checkpoint is not None else None
    config = None
    if saved is not None:
        # the runtime knobs it was trained with (keep ratio, ToMe's r), unless the call sets them
        stored = stored_config(saved, checkpoint)
        try:
            config = make_config(variant, **{**{k: getattr(stored, k) for k in RUNTIME_FIELDS}, **overrides})
        except ValueError:
            config = None  # a checkpoint of another layout: loading it below names the difference
    config = config or make_config(variant, **overrides)
    sam = build_sam_from_config(config, prompt_pe_scale)
    if sam_checkpoint is not None:
        kept = load_sam_checkpoint(sam, sam_checkpoint, DENSE_SOURCE.get(variant))
        logger.info("loaded %s; %d new encoder tensors keep their initialisation", sam_checkpoint, len(kept))
    if e_checkpoint is not None:
        load_e_blocks_from_sam(sam.image_encoder, e_checkpoint)
    if checkpoint is not None:
        load_blvit_sam_checkpoint(sam, checkpoint, saved)
    return sam.eval()


def build_sam_from_checkpoint(checkpoint: PathLike, keep_ratio: Optional[float] = None) -> Sam:
    """A SAM with the encoder layout stored in a checkpoint of this toolkit (bLViT or dense),
    its weights loaded; ``keep_ratio`` overrides the stored one."""
    obj = read_checkpoint(checkpoint)
    if obj.get("format") != FORMAT:
        raise CheckpointError(f"{checkpoint}: not a checkpoint of this toolkit (no format={FORMAT!r} field); "
                              "official SAM files go to build_sam_stock / sam_model_registry")
    config = stored_config(obj, checkpoint)
    if keep_ratio is not None:
        config = dataclasses.replace(config, keep_ratio=keep_ratio)
    sam = build_sam_from_config(config)
    load_checked(sam, unwrap_state_dict(obj, checkpoint), checkpoint, f"{config.name!r} model")
    return sam.eval()


def build_sam_stock(model_type: str = "vit_b", checkpoint: Optional[PathLike] = None) -> Sam:
    """segment-anything's own model, loaded on any device (the stock builder's
    ``torch.load`` has no ``map_location``) and with key/shape checks."""
    if model_type not in ("vit_b", "vit_l", "vit_h"):
        raise ValueError(f"unknown stock SAM type {model_type!r}; choose vit_b, vit_l or vit_h")
    sam = stock_registry[model_type]()
    if checkpoint is not None:
        load_sam_checkpoint(sam, checkpoint, model_type)
    return sam.eval()


def _stock_builder(model_type: str) -> Callable[..., Sam]:
    return partial(build_sam_stock, model_type)


def _blvit_builder(variant: str) -> Callable[..., Sam]:
    def build(checkpoint: Optional[PathLike] = None, **kwargs: Any) -> Sam:
        return build_sam_blvit(variant, checkpoint=checkpoint, **kwargs)

    build.__doc__ = f"build_sam_blvit({variant!r}, ...)"
    return build


def _dense_builder(model_type: str) -> Callable[..., Sam]:
    def build(checkpoint: Optional[PathLike] = None, **kwargs: Any) -> Sam:
        return build_sam_blvit(model_type, sam_checkpoint=checkpoint, keep_ratio=1.0, **kwargs)

    build.__doc__ = f"this toolkit's dense SDPA encoder in the SAM {model_type} layout; checkpoint: an official SAM file"
    return build


# Model names users pass to --model. "checkpoint" means: stock and dense_* take an official SAM
# file; b+t / h+b take a bLViT-SAM checkpoint (use sam_checkpoint= for the official file).
sam_model_registry: Dict[str, Callable[..., Sam]] = {
    "vit_b": _stock_builder("vit_b"),
    "vit_l": _stock_builder("vit_l"),
    "vit_h": _stock_builder("vit_h"),
    "dense_vit_b": _dense_builder("vit_b"),
    "dense_vit_l": _dense_builder("vit_l"),
    "dense_vit_h": _dense_builder("vit_h"),
    "b+t": _blvit_builder("b+t"),
    "h+b": _blvit_builder("h+b"),
    **{name: _blvit_builder(name) for name in ("evit-b", "evit-h", "evovit-b", "evovit-h", "tome-b", "tome-h")},
}
