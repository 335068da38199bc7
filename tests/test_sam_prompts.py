"""The SAM trainer's prompts: the same frame as SamPredictor, and SAM's corrective clicks."""
import numpy as np
import pytest
import torch
from segment_anything import SamPredictor

from blvit.data.sa1b import SA1BDataset, find_samples
from blvit.data.synthetic import write_sa1b
from blvit.train.losses import mask_iou
from blvit.train.sam_prompts import (NOT_A_POINT, decode_per_prompt, interactive_losses, mask_only_rounds,
                                     sample_error_clicks)
from sam_adapter import build_sam_blvit

from conftest import TINY

WEIGHTS = {"focal_weight": 1.0, "dice_weight": 1.0, "iou_weight": 1.0}


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    root = tmp_path_factory.mktemp("sa1b_prompts")
    write_sa1b(root, 1, seed=7)
    ref = find_samples(root)[0]
    ds = SA1BDataset([ref], img_size=256, max_masks=8, box_noise=0.0, seed=0)
    image, masks = ds.load(ref)
    item = ds.prepare(image, masks, np.random.default_rng(0))
    # which mask went to which slot: the one whose low-resolution target matches
    order = np.random.default_rng(0).permutation(len(masks))[:8]
    return image, [masks[j] for j in order], item


def _capture(module):
    seen = []
    handle = module.register_forward_pre_hook(lambda mod, args, kwargs: seen.append((args, kwargs)), with_kwargs=True)
    return seen, handle


def test_trainer_feeds_the_decoder_what_sam_predictor_would(sample):
    """Image tensor, boxes, points and target masks: the trainer's frame is SamPredictor's."""
    image, masks, item = sample
    torch.manual_seed(0)
    sam = build_sam_blvit("vit_b", keep_ratio=1.0, **TINY, out_chans=64)
    predictor = SamPredictor(sam)
    h, w = image.shape[:2]
    n = int(item["valid"].sum())
    assert n >= 2

    seen_image, handle = _capture(sam.image_encoder)
    predictor.set_image(image)
    handle.remove()
    torch.testing.assert_close(seen_image[0][0][0][0], item["image"], atol=1e-5, rtol=0)
    assert tuple(item["input_hw"].tolist()) == predictor.input_size

    seen, handle = _capture(sam.prompt_encoder)
    for slot in range(n):
        ys, xs = np.nonzero(masks[slot])
        gt_box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64)  # COCO x, y, x+w, y+h
        predictor.predict(box=gt_box, multimask_output=False)
        # the trainer's point is a pixel of the mask; SamPredictor given that pixel sends the same
        pixel = item["points"][slot, 0].numpy() * max(h, w) / 256
        assert np.allclose(pixel, np.round(pixel), atol=1e-4)
        x, y = np.round(pixel).astype(int)
        assert masks[slot][y, x]
        predictor.predict(point_coords=np.array([[x, y]]), point_labels=np.array([1]), multimask_output=True)
    predictor_calls = list(seen)
    seen.clear()
    with torch.no_grad():
        embedding = sam.image_encoder(item["image"][None])
        pe = sam.prompt_encoder.get_dense_pe()
        for slot in range(n):
            target = item["masks"][slot : slot + 1]
            interactive_losses(sam, embedding, pe, target, item["input_hw"], item["boxes"][slot : slot + 1], None, 0, 0, WEIGHTS)
            interactive_losses(sam, embedding, pe, target, item["input_hw"], None, item["points"][slot : slot + 1], 0, 0, WEIGHTS)
    handle.remove()
    assert len(seen) == len(predictor_calls) == 2 * n
    for (_, trainer), (_, stock) in zip(seen, predictor_calls):
        assert (trainer["boxes"] is None) == (stock["boxes"] is None)
        if stock["boxes"] is not None:
            # SamPredictor sends (1, 1, 4), the trainer (M, 4); the prompt encoder reads both as boxes
            torch.testing.assert_close(trainer["boxes"].reshape(-1, 4).float(), stock["boxes"].reshape(-1, 4).float(),
                                       atol=1e-4, rtol=0)
        else:
            torch.testing.assert_close(trainer["points"][0].float(), stock["points"][0].float(), atol=1e-4, rtol=0)
            assert torch.equal(trainer["points"][1].int(), stock["points"][1].int())
        assert trainer["masks"] is None and stock["masks"] is None

    # targets: the decoder's low-res frame. Turned into logits and through SamPredictor's own
    # post-processing they give back the object at full resolution, in place.
    for slot in range(n):
        logits = item["masks"][slot][None, None] * 20.0 - 10
        back = sam.postprocess_masks(logits, predictor.input_size, predictor.original_size)[0, 0].numpy() > 0
        gt = masks[slot]
        iou = (back & gt).sum() / (back | gt).sum()
        centre_gt, centre_back = np.argwhere(gt).mean(0), np.argwhere(back).mean(0)
        assert np.abs(centre_gt - centre_back).max() < 1.5, (slot, centre_gt, centre_back)
        if gt.sum() > 2000:
            assert iou > 0.9, (slot, iou)


def test_error_clicks_land_in_the_error_region_with_its_label(sample):
    """Missed object -> positive clicks on it; spill-over -> negative clicks off it; exact -> no
    point; never on the padding. Checked in the original image through SamPredictor's scale."""
    image, masks, item = sample
    h, w = image.shape[:2]
    scale = max(h, w) / 256
    n = int(item["valid"].sum())
    targets = item["masks"][:n].float()
    torch.manual_seed(0)
    for kind in ("missed", "spilled", "exact"):
        logits = {"missed": -torch.ones_like(targets), "spilled": torch.ones_like(targets),
                  "exact": targets * 2 - 1}[kind]
        hits, total = 0, 0
        for _ in range(50):
            coords, labels = sample_error_clicks(logits, targets, item["input_hw"])
            assert coords.shape == (n, 1, 2) and labels.shape == (n, 1)
            for slot in range(n):
                if kind == "exact":
                    assert labels[slot, 0] == NOT_A_POINT
                    continue
                x, y = (coords[slot, 0].numpy() * scale).astype(int)
                assert 0 <= x < w and 0 <= y < h  # inside the image, never on the padding
                assert labels[slot, 0] == (1 if kind == "missed" else 0)
                hits += bool(masks[slot][y, x]) == (kind == "missed")
                total += 1
        if total:
            assert hits / total > 0.9, (kind, hits, total)


def test_mask_only_rounds_follow_sam():
    assert mask_only_rounds(8, 0) == set()
    for seed in range(5):
        chosen = mask_only_rounds(8, 2, torch.Generator().manual_seed(seed))
        assert len(chosen) == 2 and 10 in chosen and all(1 <= r <= 10 for r in chosen)


def test_interactive_rounds_add_clicks_and_feed_back_the_mask(sample):
    _, _, item = sample
    torch.manual_seed(0)
    sam = build_sam_blvit("vit_b", keep_ratio=1.0, **TINY, out_chans=64)
    seen, handle = _capture(sam.prompt_encoder)
    n = int(item["valid"].sum())
    embedding = sam.image_encoder(item["image"][None])
    out = interactive_losses(sam, embedding, sam.prompt_encoder.get_dense_pe(), item["masks"][:n], item["input_hw"],
                             None, item["points"][:n], 3, 1, WEIGHTS)
    handle.remove()
    assert len(seen) == 5 and out["mask_iou_rounds"].shape == (5, n) and out["mask"].shape == (n,)
    counts = [kw["points"][0].shape[1] for _, kw in seen]
    assert counts == [1, 2, 3, 4, 4]  # one click per round, none in the mask-only (last) round
    assert seen[0][1]["masks"] is None and all(kw["masks"].shape == (n, 1, 64, 64) for _, kw in seen[1:])
    out["mask"].sum().backward()
    assert sam.mask_decoder.output_upscaling[0].weight.grad is not None


@pytest.mark.parametrize("multimask", [False, True])
def test_decoding_prompts_of_several_images_at_once_equals_the_stock_decoder(multimask):
    """decode_per_prompt on the prompts of two images = segment-anything's MaskDecoder per image."""
    torch.manual_seed(0)
    sam = build_sam_blvit("vit_b", keep_ratio=1.0, **TINY, out_chans=64).eval()
    with torch.no_grad():
        embeddings = sam.image_encoder(torch.randn(2, 3, 256, 256))
        pe = sam.prompt_encoder.get_dense_pe()
        points = torch.rand(5, 2, 2) * 256
        labels = torch.tensor([[1, 0], [1, 1], [0, 1], [1, -1], [1, 0]], dtype=torch.int)
        image_of = torch.tensor([0, 0, 1, 1, 1])
        masks_in = torch.randn(5, 1, 64, 64)
        sparse, dense = sam.prompt_encoder(points=(points, labels), boxes=None, masks=masks_in)
        batched, iou = decode_per_prompt(sam.mask_decoder, embeddings[image_of], pe, sparse, dense, multimask)
        for image in (0, 1):
            rows = image_of == image
            stock, stock_iou = sam.mask_decoder(embeddings[image : image + 1], pe, sparse[rows], dense[rows], multimask)
            torch.testing.assert_close(batched[rows], stock, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(iou[rows], stock_iou, atol=1e-5, rtol=1e-4)
    assert batched.shape == (5, 3 if multimask else 1, 64, 64)


def test_other_patch_sizes_train_at_their_own_mask_resolution(tmp_path):
    """8-pixel patches: the decoder's low-res masks are 4 x the 32 x 32 grid = 128; the dataset's
    targets, the corrective clicks (stride 2) and the loss follow it."""
    write_sa1b(tmp_path, 1, seed=7)
    torch.manual_seed(0)
    sam = build_sam_blvit("vit_b", keep_ratio=1.0, **dict(TINY, patch_size=8), out_chans=64)
    mask_size = 4 * sam.image_encoder.img_size // sam.image_encoder.patch_size
    ds = SA1BDataset(find_samples(tmp_path), img_size=256, max_masks=4, box_noise=0.0, seed=0, mask_size=mask_size)
    item = ds[0]
    n = int(item["valid"].sum())
    assert item["masks"].shape[-2:] == (128, 128)
    with torch.no_grad():
        embedding = sam.image_encoder(item["image"][None])
        pe = sam.prompt_encoder.get_dense_pe()
        sparse, dense = sam.prompt_encoder(points=None, boxes=item["boxes"][:n], masks=None)
        logits, _ = decode_per_prompt(sam.mask_decoder, embedding.expand(n, -1, -1, -1), pe, sparse, dense, False)
    assert logits.shape[-2:] == item["masks"].shape[-2:]
    losses = interactive_losses(sam, embedding, pe, item["masks"][:n], item["input_hw"], item["boxes"][:n], None, 1, 0,
                                WEIGHTS)
    assert all(torch.isfinite(v).all() for v in losses.values())
    # clicks at stride 2 land on the error cell they were drawn from
    targets = item["masks"][:n].float()
    coords, labels = sample_error_clicks(-torch.ones_like(targets), targets, item["input_hw"], stride=2)
    cells = (coords[:, 0] // 2).long()
    assert bool((targets[torch.arange(n), cells[:, 1], cells[:, 0]] == 1).all())
    assert bool((labels == 1).all())
    with pytest.raises(ValueError, match="mask_size"):
        SA1BDataset(find_samples(tmp_path), img_size=256, mask_size=100)


def test_area_targets_are_each_cells_object_share(tmp_path):
    """mask_targets="area": every low-resolution cell holds the share of its 4 x 4 input pixels
    that are the object; thresholded at 0.5 it is the binary target, and mask_iou scores it so."""
    write_sa1b(tmp_path, 1, seed=7)
    refs = find_samples(tmp_path)
    binary, area = (SA1BDataset(refs, img_size=256, max_masks=4, box_noise=0.0, seed=0, mask_targets=kind)[0]
                    for kind in ("binary", "area"))
    n = int(binary["valid"].sum())
    soft, hard = area["masks"][:n], binary["masks"][:n]
    assert ((soft > 0) & (soft < 1)).any()  # edge cells are fractions
    # exact area shares: each object's cells hold its area in the resized image (4 x 4 pixels a cell)
    dataset = SA1BDataset(refs, img_size=256, max_masks=4)
    image, masks = dataset.load(refs[0])
    scale = (int(area["input_hw"][0]) / image.shape[0]) * (int(area["input_hw"][1]) / image.shape[1])
    if len(masks) <= 4:
        expected = sorted(float(m.sum()) * scale for m in masks)
        got = sorted(float(x) * 16 for x in soft.sum((1, 2)))
        assert got == pytest.approx(expected, rel=0.01)  # PIL's box filter, to within its rounding
    assert hard.dtype == torch.bool and soft.dtype == torch.float32
    assert torch.equal(hard, soft >= 0.5)
    torch.testing.assert_close(mask_iou(hard * 20.0 - 10, soft), torch.ones(n))
    # at the input resolution every share is 0 or 1: the same bool targets as binary ones
    full_area, full_binary = (SA1BDataset(refs, img_size=256, max_masks=4, box_noise=0.0, seed=0, mask_targets=kind,
                                          mask_size=256)[0]["masks"] for kind in ("area", "binary"))
    assert full_area.dtype == torch.bool and torch.equal(full_area, full_binary)
    with pytest.raises(ValueError, match="mask_targets"):
        SA1BDataset(refs, img_size=256, mask_targets="soft")


def test_thin_and_small_objects_keep_a_target_under_their_prompt(tmp_path):
    """A 2-pixel pole and a 5 x 5 object in a 1500 x 2250 photo trained at 256 px: no 4 x 4 cell
    is half covered, yet the target is not empty (it would teach an empty mask for a prompt on the
    object); it holds the object's most-covered cells, under its point prompt."""
    import numpy as np

    from blvit.data.sa1b import mask_target

    pole = np.zeros((2250, 1500), bool)
    pole[500:1500, 700:702] = True
    speck = np.zeros((2250, 1500), bool)
    speck[100:105, 200:205] = True
    dataset = SA1BDataset([], img_size=256, max_masks=2, box_noise=0.0, box_fraction=0.0, mask_targets="binary")
    image = np.zeros((2250, 1500, 3), np.uint8)
    item = dataset.prepare(image, [pole, speck], np.random.default_rng(0))
    targets, points = item["masks"], item["points"]
    assert bool(item["valid"].all()) and targets.dtype == torch.bool
    for slot in range(2):
        assert int(targets[slot].sum()) >= 1
        x, y = (points[slot, 0] // 4).long().tolist()
        assert bool(targets[slot, y, x])
    # the pole is one cell column over its height (about 114 input pixels: 28-29 cells)
    assert 25 <= int(targets[0].sum()) <= 31 and int(targets[0].any(0).sum()) == 1
    # area targets hold the true share; half-covered cells decide as before for larger objects
    share = mask_target(pole, (256, 171), 256, 64, binary=False)
    assert float(share.sum()) * 16 == pytest.approx(2 * 1000 * (256 / 2250) * (171 / 1500), rel=0.05)
    block = np.zeros((2250, 1500), bool)
    block[:900, :600] = True
    assert np.array_equal(mask_target(block, (256, 171), 256, 64, binary=True),
                          mask_target(block, (256, 171), 256, 64, binary=False) >= 0.5)


def test_box_noise_is_capped_at_20_pixels_of_a_1024_input(tmp_path):
    """SAM's box noise: std 10 % of the side, at most 20 px of its 1024-px input; at 256 px that
    is 5 px of the input frame whatever the image's own size (the old cap, 20 px of a 640-px
    image, was 8 px here)."""
    from blvit.data.sa1b import NOISE_CAP_PX, SAM_INPUT_SIZE

    write_sa1b(tmp_path, 3, seed=7, height=480, width=640)
    refs = find_samples(tmp_path)
    cap = NOISE_CAP_PX * 256 / SAM_INPUT_SIZE
    z, capped = [], []
    for ref in refs:
        exact = SA1BDataset([ref], img_size=256, max_masks=8, box_noise=0.0, seed=0)
        noisy = SA1BDataset([ref], img_size=256, max_masks=8, box_noise=0.1, seed=0)
        image, masks = exact.load(ref)
        for seed in range(100):
            clean = exact.prepare(image, masks, np.random.default_rng(seed))  # same slots, no noise
            box = noisy.prepare(image, masks, np.random.default_rng(seed))["boxes"]
            n = int(clean["valid"].sum())
            sides = (clean["boxes"][:n, 2:] - clean["boxes"][:n, :2]).repeat(1, 2)
            std = torch.minimum(0.1 * sides, torch.tensor(cap))
            away = (clean["boxes"][:n] > 3 * std) & (clean["boxes"][:n] < torch.tensor([256, 192] * 2) - 3 * std)
            z.append(((box[:n] - clean["boxes"][:n]) / std)[away])
            capped.append((0.1 * sides > cap)[away])
    z, capped = torch.cat(z), torch.cat(capped)
    assert capped.sum() > 100 and (~capped).sum() > 100  # both regimes of the rule are tested
    for part in (z[capped], z[~capped]):
        assert 0.9 < float(part.std()) < 1.1, float(part.std())


def test_focal_alpha_weighs_object_against_background_pixels():
    from blvit.train.losses import focal_loss

    logits, target = torch.zeros(1, 2, 2), torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    even = focal_loss(logits, target, alpha=0.5)
    retina = focal_loss(logits, target, alpha=0.25)
    # at p = 0.5 both classes lose the same; alpha 0.25 splits them 1 : 3, 0.5 evenly, same total
    torch.testing.assert_close(retina, even)
    object_only = focal_loss(logits, torch.ones(1, 2, 2), alpha=0.25)
    torch.testing.assert_close(object_only, focal_loss(logits, torch.zeros(1, 2, 2), alpha=0.25) / 3)


def test_supervise_all_iou_trains_every_masks_predicted_iou():
    """SAM: the IoU head learns only the supervised (lowest-loss) mask's IoU; SAM 2's released
    config (supervise_all_iou) all three, which is what picks the mask of a single click."""
    from blvit.train.losses import sam_mask_loss

    target = torch.zeros(1, 4, 4)
    target[0, :2] = 1  # the top half
    logits = torch.full((1, 3, 4, 4), -10.0)
    logits[0, 0, :2] = 10  # exact: IoU 1, the lowest loss
    logits[0, 1, :1] = 10  # a quarter: IoU 0.5
    logits[0, 2] = 10  # everything: IoU 0.5
    iou_pred = torch.tensor([[0.75, 0.0, 0.0]])
    best_only = sam_mask_loss(logits, iou_pred, target, supervise_all_iou=False, reduce=False)
    every = sam_mask_loss(logits, iou_pred, target, supervise_all_iou=True, reduce=False)
    assert int(best_only["best"]) == 0
    torch.testing.assert_close(best_only["iou"], torch.tensor([0.25 ** 2]))
    torch.testing.assert_close(every["iou"], torch.tensor([(0.25 ** 2 + 0.5 ** 2 + 0.5 ** 2) / 3]))
    torch.testing.assert_close(every["mask"], best_only["mask"])  # the mask term is the same


def test_input_resolution_targets_supervise_the_upsampled_logits(sample, monkeypatch):
    """data.mask_size "input" (SAM 2's released training): targets at the input resolution, the
    loss and the corrective clicks on the logits upsampled as Sam.postprocess_masks upsamples them,
    while the low-resolution logits go back in as the mask prompt."""
    import blvit.train.sam_prompts as prompts
    from blvit.train.losses import sam_mask_loss, upsample_logits
    from sam_adapter.trainer import target_size

    image, masks, low_item = sample
    ds = SA1BDataset([], img_size=256, max_masks=8, box_noise=0.0, seed=0, mask_size=256)
    item = ds.prepare(image, masks, np.random.default_rng(0))
    n = int(item["valid"].sum())
    fine = item["masks"][:n]
    # 0/1 targets travel as bool (a quarter of float32's bytes); the losses take them as they are
    assert fine.shape == (n, 256, 256) and fine.dtype == torch.bool and set(fine.unique().tolist()) == {False, True}
    # the same objects as the decoder-resolution targets: each 4 x 4 block's majority, but for
    # edge cells (both are thresholded area shares, one per pixel, one per cell)
    blocks = fine.float().reshape(n, 64, 4, 64, 4).mean((2, 4))
    differ = ((blocks >= 0.5) != low_item["masks"][:n]).sum((1, 2))
    assert bool((differ <= 0.1 * low_item["masks"][:n].sum((1, 2)).clamp(min=10)).all()), differ

    torch.manual_seed(0)
    sam = build_sam_blvit("vit_b", keep_ratio=1.0, **TINY, out_chans=64)
    low = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(upsample_logits(low, 256), sam.postprocess_masks(low, (256, 256), (256, 256)))
    assert upsample_logits(low, 64) is low

    embedding = sam.image_encoder(item["image"][None])
    pe = sam.prompt_encoder.get_dense_pe()
    seen, handle = _capture(sam.prompt_encoder)
    clicks = []
    real_sampler = prompts.sample_error_clicks

    def spy(logits, target, input_hw, generator=None, stride=4):
        coords, labels = real_sampler(logits, target, input_hw, generator, stride)
        clicks.append((logits, target, stride, coords, labels))
        return coords, labels

    monkeypatch.setattr(prompts, "sample_error_clicks", spy)
    out = interactive_losses(sam, embedding, pe, fine, item["input_hw"], item["boxes"][:n], None, 1, 0, WEIGHTS)
    handle.remove()
    # round 0 is the box alone: its loss is SAM's loss of the upsampled single-mask logits
    with torch.no_grad():
        sparse, dense = sam.prompt_encoder(points=None, boxes=item["boxes"][:n], masks=None)
        logits, iou = decode_per_prompt(sam.mask_decoder, embedding.expand(n, -1, -1, -1), pe, sparse, dense, False)
        first = sam_mask_loss(upsample_logits(logits, 256), iou, fine, **WEIGHTS, reduce=False)
    torch.testing.assert_close(out["mask_iou_rounds"][0], first["mask_iou"])
    alone = interactive_losses(sam, embedding, pe, fine, item["input_hw"], item["boxes"][:n], None, 0, 0, WEIGHTS)
    torch.testing.assert_close(alone["mask"], first["mask"])
    torch.testing.assert_close(alone["iou"], first["iou"])
    assert seen[1][1]["masks"].shape == (n, 1, 64, 64)  # the low-resolution logits are the mask prompt
    torch.testing.assert_close(seen[1][1]["masks"], logits)
    (previous, target, stride, coords, labels), = clicks
    assert stride == 1
    torch.testing.assert_close(target, fine.float())
    torch.testing.assert_close(previous, upsample_logits(logits, 256)[:, 0])  # the clicks see the upsampled mask
    x, y = coords[:, 0, 0].long(), coords[:, 0, 1].long()
    rows = labels[:, 0] != NOT_A_POINT
    wrong = (previous[torch.arange(n), y, x] > 0) != (fine[torch.arange(n), y, x] > 0.5)
    assert bool(wrong[rows].all())  # every click lands on a pixel the upsampled mask gets wrong
    assert bool((labels[rows, 0] == fine[torch.arange(n), y, x][rows].long()).all())

    encoder = sam.image_encoder  # 256 px, 16-pixel patches: the decoder's masks are 64 x 64
    assert target_size(None, encoder) == 64 and target_size("input", encoder) == 256 and target_size(128, encoder) == 128
    for bad in (32, 100, 512, "full", True):
        with pytest.raises(ValueError, match="data.mask_size"):
            target_size(bad, encoder)


def test_validation_scores_input_resolution_targets_on_the_upsampled_masks(tmp_path):
    """evaluate_box_miou with data.mask_size "input": the box masks as Sam.postprocess_masks
    upsamples them, scored against the input-resolution targets."""
    from sam_adapter.trainer import evaluate_box_miou, predict_box_masks

    write_sa1b(tmp_path / "data", 2, seed=3)
    refs = find_samples(tmp_path / "data")
    torch.manual_seed(0)
    sam = build_sam_blvit("vit_b", keep_ratio=1.0, **TINY, out_chans=64).eval()
    fine = SA1BDataset(refs, img_size=256, max_masks=8, box_noise=0.0, seed=0, box_fraction=1.0, mask_size=256)
    score = evaluate_box_miou(sam, fine, torch.device("cpu"), amp=False)
    ious = []
    with torch.no_grad():
        pe = sam.prompt_encoder.get_dense_pe()
        for i in range(len(fine)):
            item = fine[i]
            pick = item["valid"]
            logits, _ = predict_box_masks(sam, sam.image_encoder(item["image"][None]), pe, item["boxes"][pick])
            masks = sam.postprocess_masks(logits, (256, 256), (256, 256))[:, 0] > 0
            truth = item["masks"][pick] > 0.5
            ious += ((masks & truth).flatten(1).sum(1) / (masks | truth).flatten(1).sum(1).clamp(min=1)).tolist()
    assert score["val_masks"] == len(ious)
    assert score["val_box_miou"] == pytest.approx(float(np.mean(ious)), abs=1e-6)


def test_prompt_encoder_parts_the_recipe_never_feeds_stay_frozen_and_the_rest_always_get_a_gradient(sample):
    """With loss.train_prompt_encoder, the prompt encoder's parts that no prompt of the recipe
    reaches stay frozen (no rounds: the mask-prompt path; no boxes: the corner embeddings; boxes
    only and no clicks: the point embeddings); every other part gets a gradient in every step, also
    from a batch whose prompts use none of it (zero there), so that all ranks synchronise the same."""
    from pathlib import Path

    from blvit.train.config import load_config
    from sam_adapter.trainer import SamTrainingModule, build_models

    teacher = str(Path(__file__).resolve().parents[1] / "configs/sam/quickstart_teacher.yaml")

    def frozen(*overrides):
        sam, _ = build_models(load_config(teacher, list(overrides)))
        names = {n.rsplit(".", 1)[0] for n, p in sam.prompt_encoder.named_parameters() if not p.requires_grad}
        return sam, {n.split(".")[0] if n.startswith("mask_downscaling") else n for n in names}

    sam, none = frozen()
    assert none == set()
    assert frozen("loss.click_rounds=0")[1] == {"mask_downscaling"}
    assert frozen("loss.click_rounds=0", "loss.refine_rounds=1")[1] == set()
    assert frozen("data.box_fraction=0")[1] == {"point_embeddings.2", "point_embeddings.3"}
    assert frozen("data.box_fraction=1", "loss.click_rounds=0")[1] == {
        "mask_downscaling", "point_embeddings.0", "point_embeddings.1", "not_a_point_embed"}
    assert frozen("data.box_fraction=1")[1] == set()  # the clicks are points
    with pytest.raises(ValueError, match="mask_weight"):
        build_models(load_config(teacher, ["loss.mask_weight=0"]))

    # a batch of point prompts only: the box-corner embeddings take part with a zero gradient
    cfg = load_config(teacher, ["loss.click_rounds=0"])
    sam, _ = build_models(cfg)
    _, _, item = sample
    batch = {k: v[None] for k, v in item.items()}
    batch["use_box"] = torch.zeros_like(batch["use_box"])
    SamTrainingModule(sam, cfg["loss"])(batch)["loss"].backward()
    grads = {n: p.grad for n, p in sam.prompt_encoder.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    assert float(grads["point_embeddings.2.weight"].abs().sum()) == 0
    assert float(grads["point_embeddings.1.weight"].abs().sum()) > 0


def test_sa1b_reads_uncompressed_rle_and_names_exif_turned_images(tmp_path):
    """COCO's uncompressed RLE (counts as a list) is decoded, not called corrupt; a photo whose
    EXIF orientation turns it by 90 degrees, annotated as displayed, is refused with a message
    that names the EXIF tag (the masks would otherwise lie across the stored pixels)."""
    import json

    import numpy as np
    from PIL import Image
    from pycocotools import mask as mask_utils

    from blvit.data.sa1b import SampleError

    write_sa1b(tmp_path, 1, seed=7)
    (jpg,) = sorted(tmp_path.glob("sa_*.jpg"))
    ref = find_samples(tmp_path)[0]
    dataset = SA1BDataset([ref], img_size=256)
    image, masks = dataset.load(ref)
    record = json.loads(jpg.with_suffix(".json").read_text())
    first = mask_utils.decode(record["annotations"][0]["segmentation"])
    counts, run, value = [], 0, 0
    for pixel in first.flatten(order="F"):  # column-major runs, starting with zeros
        if pixel != value:
            counts.append(run)
            run, value = 0, pixel
        run += 1
    counts.append(run)
    record["annotations"][0]["segmentation"] = {"size": list(first.shape), "counts": counts}
    jpg.with_suffix(".json").write_text(json.dumps(record))
    _, again = dataset.load(ref)
    assert len(again) == len(masks) and all(np.array_equal(a, b) for a, b in zip(again, masks))
    # the stored pixels turned by 90 degrees, with the tag that turns them back for display
    turned = Image.fromarray(np.ascontiguousarray(image.transpose(1, 0, 2)))
    exif = Image.Exif()
    exif[0x0112] = 6
    turned.save(jpg, exif=exif)
    with pytest.raises(SampleError, match="EXIF orientation 6 turns it by 90 degrees"):
        dataset.load(ref)
