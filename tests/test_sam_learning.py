"""The SAM trainer learns promptable segmentation (issue 14).

One short training of the quick start's dense teacher recipe on generated SA-1B images, then
blvit-eval on other generated images (COCO format): the trained model beats the filled-box
baseline computed on the same objects, a third click helps, and its masks follow the prompt
instead of returning one prompt-independent foreground blob.
"""
from pathlib import Path

import cv2
import numpy as np
import pytest
from segment_anything import SamPredictor

from blvit.data.synthetic import write_instances, write_sa1b
from blvit.train.config import load_config
from sam_adapter.trainer import train
from eval.annotations import load_annotations
from eval.baselines import filled_box
from eval.cli import run as eval_run
from eval.metrics import mask_iou
from eval.prompts import first_click
from eval.sam_eval import read_image
from sam_adapter.build import build_sam_from_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "configs/sam/quickstart_teacher.yaml"
# Data a short CI run can learn: triangles (a shape their box does not fit: the filled box scores
# about 0.5 on them, a rectangle would make it exact) in plain colours, up to 3 per image, at
# 160 x 120 px. The quick start's own data and table show the full-size comparison.
DATA = dict(height=120, width=160, kinds=(3,), flat=True, max_objects=3)
# The quick-start teacher recipe (SAM's prompts, one click round), at 128 px, for 700 steps of 4
# images on one thread (about 55 s on this project's 2-core machine).
OVERRIDES = ["model.overrides={img_size: 128, embed_dim: 64, depth: 4, num_heads: 4, global_attn_indexes: [1, 3], "
             "window_size: 4, out_chans: 64}", "train.max_steps=700", "train.epochs=100", "train.lr=1e-3",
             "train.batch_size=4", "data.val_root=null"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("sam_learning")
    write_sa1b(root / "train", 200, seed=10, **DATA)
    # 40 held-out images (about 100 objects): on 10 (25 objects) the gain of two more clicks was
    # within the noise of one run (0.627 -> 0.632 once, 0.594 -> 0.629 on 40 images, same model)
    paths = write_instances(root / "heldout", 40, seed=11, **DATA)
    cfg = load_config(TEACHER, [f"data.root={root / 'train'}", f"output_dir={root / 'run'}", *OVERRIDES])
    checkpoint = Path(train(cfg)["best_checkpoint"])
    common = ["--annotations", str(paths["coco"]), "--images", str(root / "heldout/images"),
              "--model", "dense_vit_b", "--checkpoint", str(checkpoint)]
    box = eval_run(["prompts", *common, "--prompt", "box", "--out", str(root / "box.json")])
    clicks = eval_run(["prompts", *common, "--prompt", "point", "--clicks", "3", "--out", str(root / "clicks.json")])
    return {"root": root, "coco": paths["coco"], "checkpoint": checkpoint, "box": box, "clicks": clicks,
            "baseline": filled_box(paths["coco"])}


@pytest.mark.heavy(seconds=130)  # the module fixture trains the model
def test_trained_sam_beats_the_filled_box(trained):
    box, baseline = trained["box"], trained["baseline"]
    print(f"held-out box mIoU: trained {box['mIoU']:.3f}, filled box {baseline['mIoU']:.3f} "
          f"({baseline['objects']} objects); clicks {trained['clicks']['mIoU@1click']:.3f} / "
          f"{trained['clicks']['mIoU@3click']:.3f}")
    assert box["objects"] == baseline["objects"] > 20
    assert box["mIoU"] > baseline["mIoU"] + 0.05


@pytest.mark.heavy
def test_more_clicks_help(trained):
    clicks = trained["clicks"]
    assert clicks["mIoU@3click"] > clicks["mIoU@1click"] + 0.01


def _background_point(masks):
    """(x, y) of the background pixel farthest from every object."""
    background = ~np.any(masks, axis=0)
    dist = cv2.distanceTransform(np.pad(background.astype(np.uint8), 1), cv2.DIST_L2, 5)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return x, y


@pytest.mark.heavy
def test_masks_follow_the_prompt(trained):
    """Clicks and boxes on two objects of a held-out image give two different masks (IoU < 0.3),
    each on its own object far more than on the other; a click on empty background returns none
    of the objects. A prompt-independent model (one foreground blob for every prompt) fails all
    three. A one-minute run still merges or misses some objects, so each holds for most pairs,
    not for all: on the 40 held-out images 55 of 80 pairs below 0.3 (16 of 20 on the first 10),
    126 of 160 masks on their own object, 1 of 40 background clicks on an object; a blob model
    scores about 0, 0.5 and 1 on these."""
    anns = load_annotations(trained["coco"])
    predictor = SamPredictor(build_sam_from_checkpoint(trained["checkpoint"]))
    pair_ious, on_own_object, background_hits = [], [], []
    for image_id, objects in anns.anns_by_image.items():
        gts = [anns.annotation_mask(a) for a in objects]
        # two objects of the image that do not overlap
        pairs = [(i, j) for i in range(len(gts)) for j in range(i + 1, len(gts))
                 if gts[i].sum() > 300 and gts[j].sum() > 300 and mask_iou(gts[i], gts[j]) == 0]
        if not pairs:
            continue
        i, j = pairs[0]
        predictor.set_image(read_image(anns.image_path(image_id, trained["root"] / "heldout/images")))
        for kind in ("click", "box"):
            masks = []
            for k in (i, j):
                if kind == "click":
                    out, scores, _ = predictor.predict(point_coords=np.array([first_click(gts[k])]),
                                                       point_labels=np.array([1]), multimask_output=True)
                    masks.append(out[int(np.argmax(scores))])
                else:
                    x, y, w, h = objects[k]["bbox"]
                    masks.append(predictor.predict(box=np.array([x, y, x + w, y + h]), multimask_output=False)[0][0])
            pair_ious.append(mask_iou(masks[0], masks[1]))
            for mask, own, other in ((masks[0], gts[i], gts[j]), (masks[1], gts[j], gts[i])):
                on_own_object.append(mask_iou(mask, own) > 0.2 and mask_iou(mask, own) > 2 * mask_iou(mask, other))
        out, scores, _ = predictor.predict(point_coords=np.array([_background_point(gts)]), point_labels=np.array([1]),
                                           multimask_output=True)
        background = out[int(np.argmax(scores))]
        background_hits.append(max(mask_iou(background, g) for g in gts) >= 0.5)
    print(f"{len(background_hits)} images: IoU between the two objects' masks {np.round(pair_ious, 2).tolist()}; "
          f"on their own object {sum(on_own_object)}/{len(on_own_object)}; background click returned an object "
          f"{sum(background_hits)}/{len(background_hits)}")
    assert len(background_hits) >= 3
    assert np.median(pair_ious) < 0.1 and np.mean(np.array(pair_ious) < 0.3) >= 0.6  # a blob model: all near 1
    assert np.mean(on_own_object) >= 0.7
    assert np.mean(background_hits) <= 0.25
