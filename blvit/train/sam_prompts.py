"""SAM's interactive training prompts: a first box or point, then corrective clicks.

As in Segment Anything's training (Kirillov et al. 2023, appendix A): each mask starts from its
ground-truth box (with noise) or one point drawn uniformly from the mask; every further round
adds one point drawn uniformly from the error region of the previous prediction (positive where
the object was missed, negative where the prediction spilled over) and feeds the previous
low-resolution mask logits back as the mask prompt. Some rounds add no point and only refine
from the mask prompt. Every round is supervised, so the decoder learns to use extra clicks.

All coordinates are in the padded input frame, exactly as ``SamPredictor`` passes them to the
prompt encoder (pixel indices of the resized image; the prompt encoder adds the half pixel).
Prompts of all images of a batch are decoded together (:func:`decode_per_prompt`).
"""
from typing import Dict, Optional, Set, Tuple

import torch
import torch.nn as nn

from .losses import sam_mask_loss, upsample_logits

# The mask decoder's logits are at a quarter of the input resolution.
MASK_STRIDE = 4
# Label of "no point" in segment-anything's prompt encoder (its padding point).
NOT_A_POINT = -1


def decode_per_prompt(decoder: nn.Module, embeddings: torch.Tensor, image_pe: torch.Tensor, sparse: torch.Tensor,
                      dense: torch.Tensor, multimask_output: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """segment-anything's ``MaskDecoder.forward`` for prompts that each bring their own image
    embedding, so that the prompts of several images run in one call (the stock forward repeats
    one image's embedding for all its prompts). The decoder's own modules, the same computation.

    Args:
        embeddings: (M, C, h, w) the image embedding of each prompt's image.
        image_pe: (1, C, h, w); sparse: (M, T, C); dense: (M, C, h, w) from the prompt encoder.
    Returns:
        masks (M, K, 4h, 4w) logits and iou_pred (M, K); K = 3 with ``multimask_output``, else 1.
    """
    m, c, h, w = embeddings.shape
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat([output_tokens[None].expand(m, -1, -1), sparse], dim=1)
    hs, src = decoder.transformer(embeddings + dense, image_pe.expand(m, -1, -1, -1), tokens)
    mask_tokens_out = hs[:, 1 : 1 + decoder.num_mask_tokens]
    upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(m, c, h, w))
    hyper_in = torch.stack([mlp(mask_tokens_out[:, i]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], 1)
    masks = (hyper_in @ upscaled.flatten(2)).view(m, -1, *upscaled.shape[2:])
    iou_pred = decoder.iou_prediction_head(hs[:, 0])
    keep = slice(1, None) if multimask_output else slice(0, 1)
    return masks[:, keep], iou_pred[:, keep]


def sample_error_clicks(logits: torch.Tensor, target: torch.Tensor, input_hw: torch.Tensor,
                        generator: Optional[torch.Generator] = None,
                        stride: int = MASK_STRIDE) -> Tuple[torch.Tensor, torch.Tensor]:
    """One corrective click per mask, uniform over the error region of the prediction.

    Args:
        logits: (M, h, w) previous low-resolution mask logits (h = w = S / stride; SAM: S / 4).
        target: (M, h, w) {0, 1} ground truth at the same resolution.
        input_hw: (2,) or (M, 2) height and width of the resized image inside the padded
            (S, S) input; clicks never land on the padding.
        stride: input pixels per low-resolution cell (4 for 16-pixel patches, 2 for 8-pixel ones).
    Returns:
        coords (M, 1, 2) float (x, y) in the input frame and labels (M, 1) int: 1 in a missed
        region, 0 in a false-positive region, -1 (no point) where the prediction is exact.
    """
    m, h, w = target.shape
    device = target.device
    size = input_hw.to(device).reshape(-1, 2).expand(m, 2)
    cells = -(-size // stride)  # cells holding any image pixel
    inside = ((torch.arange(h, device=device)[None, :, None] < cells[:, 0, None, None])
              & (torch.arange(w, device=device)[None, None, :] < cells[:, 1, None, None]))
    truth = target > 0.5
    error = ((logits > 0) != truth) & inside
    flat = error.flatten(1)
    has_error = flat.any(1)
    weights = torch.where(has_error[:, None], flat, inside.flatten(1)).float()
    cell = torch.multinomial(weights, 1, generator=generator).squeeze(1)  # (M,)
    r, c = cell // w, cell % w
    offset = torch.randint(0, stride, (m, 2), device=device, generator=generator)
    x = torch.minimum(c * stride + offset[:, 0], size[:, 1] - 1)
    y = torch.minimum(r * stride + offset[:, 1], size[:, 0] - 1)
    labels = truth[torch.arange(m, device=device), r, c].long()
    labels = torch.where(has_error, labels, torch.full_like(labels, NOT_A_POINT))
    return torch.stack([x, y], -1).float()[:, None], labels[:, None].int()


def mask_only_rounds(click_rounds: int, refine_rounds: int, generator: Optional[torch.Generator] = None) -> Set[int]:
    """Which of rounds 1..click_rounds + refine_rounds add no point: the last one and the others
    at random (SAM: "one at the last iteration and one randomly interleaved")."""
    total = click_rounds + refine_rounds
    if refine_rounds <= 0:
        return set()
    others = torch.randperm(total - 1, generator=generator)[: refine_rounds - 1] + 1
    return {total, *others.tolist()}


def interactive_losses(sam: nn.Module, embeddings: torch.Tensor, image_pe: torch.Tensor, targets: torch.Tensor,
                       input_hw: torch.Tensor, boxes: Optional[torch.Tensor], points: Optional[torch.Tensor],
                       click_rounds: int, refine_rounds: int, weights: Dict[str, float],
                       multimask_points: bool = True) -> Dict[str, torch.Tensor]:
    """SAM's loss for M masks that all start from the same kind of prompt, per mask.

    Args:
        embeddings: (M, C, h', w') the image embedding of each mask's image (or (1, ...) for
            masks of one image); image_pe: the prompt encoder's dense PE.
        targets: (M, R, R) ground truth (float or bool) at the decoder's resolution (R = S/4) or finer (up to the
            input size S: the logits are upsampled to R for the loss and the clicks); input_hw:
            (2,) or (M, 2), see :func:`sample_error_clicks`.
        boxes: (M, 4) xyxy first prompts, or None; points: (M, 1, 2) first points, or None
            (exactly one of the two). A single point is ambiguous and trains the best of the
            three multimask outputs (unless ``multimask_points`` is False); a box, and every
            later round, the single-mask output.
        click_rounds / refine_rounds: corrective-click rounds and mask-only rounds after the first.
        weights: the options of :func:`sam_mask_loss` named in ``MASK_LOSS_OPTIONS``.
    Returns:
        "mask", "iou", "mask_iou": (M,) each averaged over the rounds; "mask_iou_rounds": (R, M)
        the IoU of every round (no gradient), to watch extra clicks pay off.
    """
    m = targets.shape[0]
    targets = targets.float()  # binary targets come as bool (SA1BDataset)
    embeddings = embeddings.expand(m, -1, -1, -1)
    if points is not None:
        coords, labels = points, torch.ones(m, points.shape[1], dtype=torch.int, device=points.device)
    else:
        coords = targets.new_zeros(m, 0, 2)
        labels = torch.zeros(m, 0, dtype=torch.int, device=targets.device)
    refine_only = mask_only_rounds(click_rounds, refine_rounds)
    mask_input = previous = None
    rounds = []
    for round_ in range(1 + click_rounds + refine_rounds):
        if round_ > 0 and round_ not in refine_only:
            new_coords, new_labels = sample_error_clicks(previous, targets, input_hw,
                                                         stride=sam.image_encoder.img_size // targets.shape[-1])
            coords, labels = torch.cat([coords, new_coords], 1), torch.cat([labels, new_labels], 1)
        sparse, dense = sam.prompt_encoder(points=(coords, labels) if coords.shape[1] else None, boxes=boxes,
                                           masks=mask_input)
        dense = dense.expand(m, -1, -1, -1)
        logits, iou_pred = decode_per_prompt(sam.mask_decoder, embeddings, image_pe, sparse, dense,
                                             multimask_output=round_ == 0 and boxes is None and multimask_points)
        # targets finer than the decoder's output (data.mask_size): the loss sees the logits upsampled
        supervised = upsample_logits(logits, targets.shape[-1])
        out = sam_mask_loss(supervised, iou_pred, targets, **weights, reduce=False)
        rounds.append(out)
        # the supervised mask's low-resolution logits go back in as the next round's mask prompt
        # (no gradient through them); the next click comes from its error at the targets' resolution
        pick = out["best"][:, None, None, None]
        mask_input = logits.gather(1, pick.expand(-1, 1, *logits.shape[2:])).detach().float()
        previous = supervised.gather(1, pick.expand(-1, 1, *supervised.shape[2:]))[:, 0].detach()
    result = {k: torch.stack([r[k] for r in rounds]).mean(0) for k in ("mask", "iou", "mask_iou")}
    result["mask_iou_rounds"] = torch.stack([r["mask_iou"] for r in rounds]).detach()
    return result
