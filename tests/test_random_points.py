"""Issue 17, item 4: the bLViT paper's prompt protocol, N points drawn uniformly from the mask
with a seed (the same points for every model), beside RITM's clicks and the ground-truth box."""
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_dense_checkpoint
from eval.prompts import random_points, random_points_problem


def test_random_points_lie_inside_are_reproducible_and_differ_across_seeds():
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = np.zeros((40, 50), bool)
        y, x = rng.integers(0, 30), rng.integers(0, 40)
        mask[y:y + rng.integers(2, 10), x:x + rng.integers(2, 10)] = True
        pts = random_points(mask, 3, (7, 1, 2))
        assert pts.shape == (3, 2) and mask[pts[:, 1], pts[:, 0]].all()  # (x, y), inside
        assert len({tuple(p) for p in pts.tolist()}) == 3  # distinct pixels
        np.testing.assert_array_equal(pts, random_points(mask, 3, (7, 1, 2)))  # the same seed: the same points
    big = np.ones((60, 60), bool)
    draws = {tuple(map(tuple, random_points(big, 3, (seed, 1, 2)).tolist())) for seed in range(10)}
    assert len(draws) == 10  # other seeds, other points
    assert not np.array_equal(random_points(big, 3, (0, 1, 2)), random_points(big, 3, (0, 1, 3)))  # per object
    # uniform: over many seeds every pixel of a small mask is drawn about equally often
    small = np.zeros((5, 5), bool)
    small[1:3, 1:4] = True
    counts = np.zeros((5, 5))
    for seed in range(3000):
        x, y = random_points(small, 1, (seed, 0, 0))[0]
        counts[y, x] += 1
    assert counts[~small].sum() == 0 and counts[small].min() > 400 and counts[small].max() < 600


def test_tiny_and_empty_masks_are_refused_with_a_reason():
    empty, one = np.zeros((8, 8), bool), np.zeros((8, 8), bool)
    one[3, 4] = True
    two = one.copy()
    two[3, 5] = True
    assert random_points_problem(empty, 1) == "empty mask"
    assert random_points_problem(one, 1) == "mask of one pixel"
    assert random_points_problem(two, 3) == "mask of 2 pixels, fewer than the 3 points asked"
    assert random_points_problem(two, 2) is None
    with pytest.raises(ValueError, match="mask of one pixel"):
        random_points(one, 1, (0, 0, 0))


def test_eval_cli_random_points_same_points_for_every_model_and_skips_counted(tmp_path):
    from blvit.data.make_synthetic import ensure_synthetic
    from eval.cli import run

    data = ensure_synthetic(tmp_path / "data", train=1, val=1, heldout=3)
    coco = json.loads(Path(data["heldout_coco"]).read_text())
    first = coco["annotations"][0]
    h, w = next((im["height"], im["width"]) for im in coco["images"] if im["id"] == first["image_id"])
    one_pixel = dict(first, id=99001, segmentation={"size": [h, w], "counts": _rle_one_pixel(h, w)}, area=1.0)
    coco["annotations"].append(one_pixel)
    ann_path = tmp_path / "ann.json"
    ann_path.write_text(json.dumps(coco))
    a = tiny_dense_checkpoint(tmp_path / "a.pth")

    def report(out, *extra):
        return run(["prompts", "--annotations", str(ann_path), "--images", data["heldout_images"], "--model",
                    "dense_vit_b", "--checkpoint", str(a), "--prompt", "random-points", "--out", str(tmp_path / out),
                    *extra])

    three = report("p3.json", "--points", "3", "--seed", "5")
    assert three["points"] == 3 and three["seed"] == 5 and "uniform" in three["sampling"]
    assert three["annotations_skipped"] == {"99001": "mask of one pixel"}
    assert three["objects"] == len(coco["annotations"]) - 1 and 0 <= three["mIoU"] <= 1
    # another model, the same seed: the same points (the digest), another seed: other points
    import torch

    from sam_adapter.checkpoint import FORMAT, FORMAT_VERSION

    state = torch.load(a, weights_only=True)
    state["model"] = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in state["model"].items()}
    b = tmp_path / "b.pth"
    torch.save(dict(state, format=FORMAT, version=FORMAT_VERSION), b)
    other_model = run(["prompts", "--annotations", str(ann_path), "--images", data["heldout_images"], "--model",
                       "dense_vit_b", "--checkpoint", str(b), "--prompt", "random-points", "--points", "3", "--seed",
                       "5", "--out", str(tmp_path / "b3.json")])
    assert other_model["points_sha256"] == three["points_sha256"]
    assert report("p3s6.json", "--points", "3", "--seed", "6")["points_sha256"] != three["points_sha256"]
    one = report("p1.json", "--points", "1")
    assert one["points"] == 1 and one["objects"] == three["objects"]


def _rle_one_pixel(h: int, w: int) -> str:
    from pycocotools import mask as mask_utils

    m = np.zeros((h, w), np.uint8)
    m[h // 2, w // 2] = 1
    return mask_utils.encode(np.asfortranarray(m))["counts"].decode()
