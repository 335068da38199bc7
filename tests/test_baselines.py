"""The filled-box baseline (eval.baselines) and the generated data it is measured on."""
import json
import math

import numpy as np
from pycocotools import mask as mask_utils

from blvit.data.make_synthetic import ensure_synthetic
from blvit.data.synthetic import _sa1b_sample, render_image, write_sa1b
from eval.baselines import filled_box, filled_box_mask


def _coco(objects, height=100, width=120):
    anns = []
    for i, mask in enumerate(objects):
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        anns.append({"id": i + 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": float(mask.sum()),
                     "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                     "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}})
    return {"images": [{"id": 1, "file_name": "a.jpg", "height": height, "width": width}], "annotations": anns,
            "categories": [{"id": 1, "name": "thing"}]}


def test_filled_box_known_answers(tmp_path):
    yy, xx = np.mgrid[0:100, 0:120]
    rectangle = (yy >= 10) & (yy < 30) & (xx >= 5) & (xx < 45)
    ellipse = ((yy - 60) / 30.0) ** 2 + ((xx - 80) / 30.0) ** 2 < 1
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(_coco([rectangle, ellipse])))
    report = filled_box(path)
    assert report["objects"] == 2
    ellipse_iou = ellipse.sum() / (59 * 59)  # a disc of radius 30 on the pixel grid in its box
    assert math.isclose(report["mIoU"], (1.0 + ellipse_iou) / 2, rel_tol=1e-6)
    assert 0.75 < ellipse_iou < 0.83  # about pi / 4 (a 59-pixel box around a disc of radius 30)
    assert report["AP"] > 0 and report["AP"] < 1  # the ellipse's box fails the stricter IoU thresholds
    assert filled_box_mask([5, 10, 40, 20], 100, 120).sum() == rectangle.sum()


def test_parallel_rendering_is_the_sequential_data(tmp_path):
    write_sa1b(tmp_path, 70, seed=4)  # >= 64 images: rendered by a process pool
    for image_id in (4_000_001, 4_000_050, 4_000_070):
        jpg, js = _sa1b_sample(image_id, 240, 320, (1, 2, 3))
        assert (tmp_path / f"sa_{image_id}.jpg").read_bytes() == jpg
        assert (tmp_path / f"sa_{image_id}.json").read_bytes() == js


def test_shape_kinds_and_unchanged_default_stream():
    image, objects = render_image(1_000_001)
    again, _ = render_image(1_000_001, kinds=(1, 2, 3))
    assert np.array_equal(image, again)
    for seed in range(5):
        _, objects = render_image(seed, kinds=(2, 3))
        assert objects and all(o["category_id"] in (2, 3) for o in objects)


def test_regenerating_with_other_settings_leaves_no_stale_samples(tmp_path):
    ensure_synthetic(tmp_path, train=6, val=2, heldout=2)
    ensure_synthetic(tmp_path, train=3, val=2, heldout=2)
    assert len(list((tmp_path / "sa1b_train").glob("sa_*.jpg"))) == 3
