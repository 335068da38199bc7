"""Loading official SAM checkpoints into bLViT-SAM, and this toolkit's own checkpoints."""
import dataclasses
import logging
from typing import Dict, List, Mapping, Optional

import torch
import torch.nn as nn

from blvit.layers import resize_rel_pos
from blvit.utils.io import CheckpointError, PathLike, atomic_save, listing, load_checked, read_checkpoint, unwrap_state_dict

from .config import BigLittleSamConfig

logger = logging.getLogger(__name__)

FORMAT = "blvit-sam"
FORMAT_VERSION = 1


def _is_new_parameter(key: str) -> bool:
    """Parameters a dense SAM checkpoint cannot provide: E-blocks, gammas, predictors."""
    return ".e_block." in key or ".gamma_" in key or key.startswith("predictors.")


def e_block_name(layer: int, name: str) -> str:
    return f"blocks.{layer}.e_block.{name}"


def describe_encoder_state(encoder_state: Mapping[str, torch.Tensor]) -> str:
    """'embed_dim 768, depth 12' from an encoder state dict (for error messages)."""
    pos = encoder_state.get("pos_embed")
    width = pos.shape[-1] if pos is not None else "?"
    indices = {int(k.split(".")[1]) for k in encoder_state if k.startswith("blocks.")}
    return f"embed_dim {width}, depth {max(indices) + 1 if indices else 0}"


def split_sam_state(state: Mapping[str, torch.Tensor], path: PathLike) -> Dict[str, Dict[str, torch.Tensor]]:
    """Split a ``Sam`` state dict into image_encoder / prompt_encoder / mask_decoder parts."""
    parts: Dict[str, Dict[str, torch.Tensor]] = {"image_encoder": {}, "prompt_encoder": {}, "mask_decoder": {}}
    other = []
    for key, value in state.items():
        prefix, _, rest = key.partition(".")
        if prefix in parts:
            parts[prefix][rest] = value
        else:
            other.append(key)
    if not parts["image_encoder"]:
        raise CheckpointError(
            f"{path}: not a SAM checkpoint: no 'image_encoder.*' keys (first keys: {listing(list(state)[:5])})"
        )
    if other:
        raise CheckpointError(f"{path}: unexpected keys outside image_encoder/prompt_encoder/mask_decoder: {listing(other)}")
    return parts


def read_sam_state(path: PathLike) -> Dict[str, Dict[str, torch.Tensor]]:
    """Read an official SAM ``.pth`` (or any Sam state dict) on the CPU, split into parts."""
    return split_sam_state(unwrap_state_dict(read_checkpoint(path), path), path)


def load_sam_checkpoint(sam: nn.Module, path: PathLike, dense_source: Optional[str] = None) -> List[str]:
    """Initialise a Sam (stock or bLViT encoder) from an official SAM checkpoint.

    The encoder's dense layers and P-blocks take the SAM encoder weights; E-blocks, gammas and
    predictors keep their initialisation. Prompt encoder and mask decoder load strictly.
    Returns the encoder keys left at initialisation.
    """
    parts = read_sam_state(path)
    found = describe_encoder_state(parts["image_encoder"])
    expected = describe_encoder_state(sam.image_encoder.state_dict())
    hint = f" (checkpoint encoder: {found}; model encoder: {expected}"
    hint += f"; this model needs SAM {dense_source})" if dense_source else ")"
    kept = load_checked(sam.image_encoder, parts["image_encoder"], path, "image encoder", _is_new_parameter, hint)
    for name in ("prompt_encoder", "mask_decoder"):
        load_checked(getattr(sam, name), parts[name], path, name.replace("_", " "))
    return kept


def load_e_blocks_from_sam(encoder: nn.Module, path: PathLike) -> Dict[str, List[str]]:
    """Initialise the E-blocks of an encoder from a dense SAM checkpoint of the E width
    (SAM ViT-B for h+b): the j-th E-block takes the j-th layer's MLP (lin1, lin2) and its
    relative-position tables (resampled when the window/global table lengths differ).

    The E-block's qkv (C -> 3c), output projection (c -> C) and MLP mappings have no
    counterpart in a dense model of width c and keep their initialisation; they are listed.
    """
    config: BigLittleSamConfig = encoder.config
    source = read_sam_state(path)["image_encoder"]
    pos = source.get("pos_embed")
    if pos is None or pos.shape[-1] != config.e_embed_dim:
        raise CheckpointError(
            f"{path}: E-blocks are {config.e_embed_dim} wide but this checkpoint's encoder is "
            f"{describe_encoder_state(source)}"
        )
    layers = list(config.e_block_layers)
    depth = len({int(k.split(".")[1]) for k in source if k.startswith("blocks.")})
    if depth < len(layers):
        raise CheckpointError(f"{path}: has {depth} layers, fewer than the {len(layers)} E-blocks to initialise")
    loaded, kept = [], []
    with torch.no_grad():
        for j, layer in enumerate(layers):
            e_block = encoder.blocks[layer].e_block
            for name, param in e_block.named_parameters():
                src_key = f"blocks.{j}.{name}"
                if name.startswith("mlp.lin") and src_key in source and source[src_key].shape == param.shape:
                    param.copy_(source[src_key])
                elif name.startswith("attn.rel_pos") and src_key in source:
                    if source[src_key].shape[1] != param.shape[1]:
                        raise CheckpointError(
                            f"{path}: {src_key} has heads {source[src_key].shape[1]} wide, the E-blocks' "
                            f"{e_block_name(layer, name)} {param.shape[1]} (e_embed_dim / e_num_heads "
                            f"{config.e_embed_dim} / {config.e_num_heads}); give e_num_heads so the widths match")
                    param.copy_(resize_rel_pos(source[src_key].float(), param.shape[0]))
                else:
                    kept.append(e_block_name(layer, name))
                    continue
                loaded.append(f"{e_block_name(layer, name)} <- {src_key}")
    logger.info("E-blocks from %s: %d tensors loaded, %d kept at initialisation", path, len(loaded), len(kept))
    return {"loaded": loaded, "kept": kept}


def save_blvit_sam_checkpoint(sam: nn.Module, path: PathLike, extra: Optional[dict] = None) -> None:
    """Write a bLViT-SAM checkpoint (model state and encoder config) atomically."""
    config: BigLittleSamConfig = sam.image_encoder.config
    payload = {"format": FORMAT, "version": FORMAT_VERSION, "config": config.to_dict(), "model": sam.state_dict()}
    payload.update(extra or {})
    atomic_save(payload, path)


def stored_config(obj: Mapping, path: PathLike) -> BigLittleSamConfig:
    """The encoder config saved in a checkpoint of this toolkit; a config this version cannot
    read (a field it does not know, an invalid layout) is an error naming the file."""
    if obj.get("format") != FORMAT:
        if any(str(k).startswith("image_encoder.") for k in obj):
            raise CheckpointError(f"{path}: a plain SAM state dict, not a bLViT-SAM checkpoint; pass it as sam_checkpoint=")
        raise CheckpointError(f"{path}: not a bLViT-SAM checkpoint (no format={FORMAT!r} field)")
    saved = obj.get("config")
    if not isinstance(saved, Mapping):
        raise CheckpointError(f"{path}: a bLViT-SAM checkpoint without its encoder config")
    known = {f.name for f in dataclasses.fields(BigLittleSamConfig)}
    unknown = sorted(set(saved) - known)
    if unknown:
        raise CheckpointError(f"{path}: its encoder config has fields this blvit version does not know: {unknown} "
                              "(written by another version of the toolkit?)")
    try:
        return BigLittleSamConfig(**saved)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: its saved encoder config is invalid: {err}") from err


def load_blvit_sam_checkpoint(sam: nn.Module, path: PathLike, obj: Optional[Mapping] = None) -> Dict:
    """Load a checkpoint written by :func:`save_blvit_sam_checkpoint` into a matching model
    (``obj``: the file's contents if already read)."""
    obj = read_checkpoint(path) if obj is None else obj
    config: BigLittleSamConfig = sam.image_encoder.config
    stored = stored_config(obj, path)
    diff = [
        f"{k}: checkpoint {v!r} vs requested {config.architecture()[k]!r}"
        for k, v in stored.architecture().items()
        if config.architecture()[k] != v
    ]
    if diff:
        raise CheckpointError(
            f"{path}: saved for bLViT-SAM {stored.name!r}, which differs from the requested {config.name!r}: "
            + "; ".join(diff)
        )
    load_checked(sam, unwrap_state_dict(obj, path), path, f"bLViT-SAM {config.name!r} model")
    return obj
