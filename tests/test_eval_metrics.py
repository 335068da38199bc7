"""The model-independent evaluation core: annotations, prompts, mIoU and COCO / LVIS mask AP.

Real shapes come from the LVIS v0.5 fixture (100 images, 977 polygon objects); known answers
and agreement with the official evaluators called directly are checked on it and on a
synthetic COCO-format split.
"""
import copy
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from blvit.data.synthetic import write_instances
from eval import (
    AnnotationError,
    AnnotationSet,
    ResultsError,
    annotation_mask,
    area_bucket,
    box_prompt,
    clicks_to_arrays,
    distance_to_boundary,
    evaluate_instances,
    first_click,
    image_path,
    load_annotations,
    load_results,
    lvis_numpy_compat,
    mask_iou,
    mask_to_rle,
    next_click,
    summarize_miou,
    xywh_to_xyxy,
)
from eval.metrics import COCO_AP_KEYS, LVIS_AP_KEYS

def _find_fixture(name: str) -> Path:
    """``$BLVIT_FIXTURES/name``, else ``shared/fixtures/name`` beside the checkout or one of its parents."""
    import os

    if os.environ.get("BLVIT_FIXTURES"):
        return Path(os.environ["BLVIT_FIXTURES"]) / name
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "shared" / "fixtures" / name
        if candidate.exists():
            return candidate
    return Path("/work/shared/fixtures") / name


FIXTURE = _find_fixture("lvis_v0.5_val_100.json")
needs_fixture = pytest.mark.skipif(not FIXTURE.is_file(), reason=f"LVIS fixture not found at {FIXTURE}")


# ---------------------------------------------------------------------------------------------
# fixtures and helpers
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lvis_gt() -> AnnotationSet:
    if not FIXTURE.is_file():
        pytest.skip(f"LVIS fixture not found at {FIXTURE}")
    return load_annotations(FIXTURE)


@pytest.fixture(scope="module")
def lvis_masks(lvis_gt):
    """annotation id -> (H, W) bool mask, for all 977 objects."""
    return {a["id"]: lvis_gt.annotation_mask(a) for a in lvis_gt.annotations}


@pytest.fixture(scope="module")
def coco_split(tmp_path_factory):
    """Synthetic held-out split: images/ + instances_coco.json + instances_lvis.json."""
    return write_instances(tmp_path_factory.mktemp("split"), 10)


@pytest.fixture(scope="module")
def lvis_as_coco(lvis_gt, tmp_path_factory):
    """The LVIS fixture stripped of its LVIS fields: a plain COCO-format file with real shapes."""
    data = copy.deepcopy(lvis_gt.dataset)
    for im in data["images"]:
        im.pop("neg_category_ids"), im.pop("not_exhaustive_category_ids")
    data["categories"] = [{"id": c["id"], "name": c["name"], "supercategory": "object"} for c in data["categories"]]
    for a in data["annotations"]:
        a["iscrowd"] = 0
    path = tmp_path_factory.mktemp("coco") / "lvis_as_coco.json"
    path.write_text(json.dumps(data))
    return path


def gt_as_results(gt: AnnotationSet):
    """Every ground-truth mask submitted as a detection with score 1.0."""
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "score": 1.0,
             "segmentation": mask_to_rle(gt.annotation_mask(a))} for a in gt.annotations]


def perturbed_results(gt: AnnotationSet, seed: int = 0):
    """A realistic imperfect detector: eroded / dilated / shifted masks, dropped objects,
    duplicates, wrong categories, pure false positives and random scores."""
    rng = np.random.default_rng(seed)
    kernel = np.ones((3, 3), np.uint8)
    cat_ids = sorted(gt.categories)
    results = []
    for a in gt.annotations:
        if rng.random() < 0.15:  # missed object
            continue
        m = gt.annotation_mask(a).astype(np.uint8)
        op = int(rng.integers(4))
        if op == 0:
            m = cv2.erode(m, kernel, iterations=int(rng.integers(1, 3)))
        elif op == 1:
            m = cv2.dilate(m, kernel, iterations=int(rng.integers(1, 4)))
        elif op == 2:
            m = np.roll(m, tuple(int(v) for v in rng.integers(-4, 5, 2)), axis=(0, 1))
        cat = a["category_id"]
        if rng.random() < 0.1:  # wrong class: a known-absent one (LVIS scores it) or any
            neg = gt.images[a["image_id"]].get("neg_category_ids") or cat_ids
            cat = int(rng.choice(neg))
        results.append({"image_id": a["image_id"], "category_id": cat, "score": float(rng.random()),
                        "segmentation": mask_to_rle(m.astype(bool))})
        if rng.random() < 0.1:  # duplicate detection
            results.append(dict(results[-1], score=float(rng.random()) * 0.5))
    for image_id in rng.choice(sorted(gt.images), size=min(20, len(gt.images)), replace=False):
        img = gt.images[int(image_id)]
        present = [a["category_id"] for a in gt.anns_by_image[int(image_id)]] or cat_ids
        m = np.zeros((img["height"], img["width"]), bool)
        y, x = int(rng.integers(0, img["height"] - 20)), int(rng.integers(0, img["width"] - 20))
        m[y:y + int(rng.integers(3, 20)), x:x + int(rng.integers(3, 20))] = True
        results.append({"image_id": int(image_id), "category_id": int(rng.choice(present)),
                        "score": float(rng.random()), "segmentation": mask_to_rle(m)})
    return results


def direct_cocoeval(gt_path, results):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    coco_gt = COCO(str(gt_path))
    ev = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(results)), iouType="segm")
    ev.evaluate(), ev.accumulate(), ev.summarize()
    return dict(zip(COCO_AP_KEYS, (float(v) for v in ev.stats[:6])))


def direct_lvis_eval(gt_path, results, monkeypatch):
    from lvis import LVIS, LVISEval, LVISResults

    monkeypatch.setattr(np, "float", float, raising=False)  # the test's own np.float fix
    lvis_gt = LVIS(str(gt_path))
    ev = LVISEval(lvis_gt, LVISResults(lvis_gt, copy.deepcopy(results)), iou_type="segm")
    ev.run()
    return {k: float(ev.results[k]) for k in LVIS_AP_KEYS}


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------

def test_load_fixture_and_detect_kind(lvis_gt, coco_split, lvis_as_coco):
    assert lvis_gt.kind == "lvis"
    assert (len(lvis_gt.images), len(lvis_gt.annotations), len(lvis_gt.categories)) == (100, 977, 1230)
    assert sum(len(v) for v in lvis_gt.anns_by_image.values()) == 977
    assert load_annotations(lvis_as_coco).kind == "coco"
    assert load_annotations(coco_split["coco"]).kind == "coco"
    assert load_annotations(coco_split["lvis"]).kind == "lvis"
    assert load_annotations(FIXTURE, kind="coco").kind == "coco"  # override
    with pytest.raises(AnnotationError, match="frequency"):  # a COCO file cannot pass for LVIS
        load_annotations(coco_split["coco"], kind="lvis")


def test_masks_from_polygons_and_both_rle_forms(lvis_gt, lvis_masks):
    # Multi-part polygons: our mask is the union of the parts, as pycocotools' annToMask.
    from lvis import LVIS
    ref = LVIS(str(FIXTURE))
    multi = [a for a in lvis_gt.annotations if len(a["segmentation"]) > 1][:10]
    assert multi
    for a in multi:
        np.testing.assert_array_equal(lvis_masks[a["id"]], ref.ann_to_mask(a).astype(bool))
    a = multi[0]
    m = lvis_masks[a["id"]]
    h, w = m.shape
    compressed = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    # uncompressed RLE: column-major run lengths starting with background
    flat = m.flatten(order="F")
    bounds = np.concatenate([[0], np.flatnonzero(flat[1:] != flat[:-1]) + 1, [flat.size]])
    counts = ([0] if flat[0] else []) + np.diff(bounds).tolist()
    for segm in ({"size": [h, w], "counts": compressed["counts"]},
                 {"size": [h, w], "counts": compressed["counts"].decode()},
                 {"size": [h, w], "counts": counts}):
        np.testing.assert_array_equal(annotation_mask({"id": 5, "segmentation": segm}, h, w), m)


def test_box_conversion():
    np.testing.assert_allclose(xywh_to_xyxy([10.5, 20, 30, 40.25]), [10.5, 20, 40.5, 60.25])
    with pytest.raises(ValueError, match="4 numbers"):
        xywh_to_xyxy([1, 2, 3])


def test_image_path_resolution(tmp_path, coco_split):
    # synthetic split: file_name exists
    gt = load_annotations(coco_split["coco"])
    image_id = next(iter(gt.images))
    assert gt.image_path(image_id, coco_split["coco"].parent / "images").is_file()
    # LVIS v1: only coco_url; LVIS v0.5: file_name COCO_val2014_... but the val2017 copy exists
    (tmp_path / "000000397133.jpg").write_bytes(b"jpg")
    v1 = {"id": 397133, "coco_url": "http://images.cocodataset.org/val2017/000000397133.jpg"}
    v05 = dict(v1, file_name="COCO_val2014_000000397133.jpg")
    assert image_path(v1, tmp_path) == tmp_path / "000000397133.jpg"
    assert image_path(v05, tmp_path) == tmp_path / "000000397133.jpg"
    (tmp_path / "COCO_val2014_000000397133.jpg").write_bytes(b"jpg")
    assert image_path(v05, tmp_path) == tmp_path / "COCO_val2014_000000397133.jpg"  # file_name first
    # LVIS v1 val takes most images from COCO's train2017: --images the COCO root finds both splits
    coco = tmp_path / "coco"
    for split, name in (("train2017", "000000000009.jpg"), ("val2017", "000000397133.jpg")):
        (coco / split).mkdir(parents=True)
        (coco / split / name).write_bytes(b"jpg")
    from_train = {"id": 9, "coco_url": "http://images.cocodataset.org/train2017/000000000009.jpg"}
    assert image_path(from_train, coco) == coco / "train2017/000000000009.jpg"
    assert image_path(v1, coco) == coco / "val2017/000000397133.jpg"
    with pytest.raises(FileNotFoundError, match="train2017/000000000009.jpg"):
        image_path(from_train, coco / "val2017")  # a split folder alone: the error names what it tried


# ---------------------------------------------------------------------------------------------
# known answers and agreement with the official evaluators
# ---------------------------------------------------------------------------------------------

@needs_fixture
def test_lvis_ground_truth_as_predictions_scores_one(lvis_gt, lvis_masks):
    results = gt_as_results(lvis_gt)
    ap = evaluate_instances(FIXTURE, results)
    assert set(ap) == set(LVIS_AP_KEYS)
    for key, value in ap.items():  # precision is tp / (tp + fp + eps): 1 - 2e-16, not exactly 1
        assert value == pytest.approx(1.0, abs=1e-12), key
    # mIoU of every ground-truth mask scored against itself (through its RLE)
    records = [{"iou": mask_iou(lvis_masks[a["id"]], mask_utils.decode(r["segmentation"])), "area": a["area"]}
               for a, r in zip(lvis_gt.annotations, results)]
    summary = summarize_miou(records)
    assert summary["mIoU"] == 1.0 and summary["count"] == 977.0
    assert all(summary[f"mIoU_{b}"] == 1.0 for b in ("small", "medium", "large"))


def test_coco_ground_truth_as_predictions_scores_one(coco_split, lvis_as_coco):
    for path in (coco_split["coco"], lvis_as_coco):
        gt = load_annotations(path)
        ap = evaluate_instances(gt, gt_as_results(gt))
        assert set(ap) == set(COCO_AP_KEYS)
        for key, value in ap.items():
            # -1 = no ground truth in that size range (the synthetic shapes are never small)
            assert value == pytest.approx(1.0, abs=1e-12) or (value == -1.0 and key == "APs"), (path.name, key, value)


def test_coco_ap_equals_cocoeval(coco_split, lvis_as_coco, tmp_path):
    for path in (coco_split["coco"], lvis_as_coco):
        results = perturbed_results(load_annotations(path), seed=1)
        ours = evaluate_instances(path, results, dataset="coco")
        theirs = direct_cocoeval(path, results)
        assert ours == theirs, path.name  # exact float equality
        assert 0.05 < ours["AP"] < 0.95  # a real, imperfect score
    # a results file gives the same numbers as the list
    res_path = tmp_path / "results.json"
    res_path.write_text(json.dumps(results))
    assert evaluate_instances(path, res_path, dataset="coco") == ours


@needs_fixture
@pytest.mark.filterwarnings("ignore:The 'warn' method is deprecated:DeprecationWarning")  # lvis' own, direct call
def test_lvis_ap_equals_lvis_eval(lvis_gt, monkeypatch):
    results = perturbed_results(lvis_gt, seed=0)
    ours = evaluate_instances(lvis_gt, results)
    assert 0.05 < ours["AP"] < 0.95 and 0.05 < ours["APr"] < 1.0
    theirs = direct_lvis_eval(FIXTURE, results, monkeypatch)
    assert ours == theirs  # exact float equality


def test_segm_ap_uses_mask_area_even_when_results_carry_boxes(tmp_path):
    """COCO.loadRes takes the *box* area as a detection's area whenever a result has a bbox,
    which un-counts a small false positive with a big box from APs. We drop the box for mask AP."""
    h = w = 200
    anns, results = [], []
    for i, (y, x) in enumerate([(10, 10), (10, 100), (100, 10)]):
        m = np.zeros((h, w), bool)
        m[y:y + 20, x:x + 20] = True  # 400 px: small
        rle = mask_to_rle(m)
        anns.append({"id": i + 1, "image_id": 1, "category_id": 1, "segmentation": rle, "area": 400.0,
                     "bbox": [x, y, 20, 20], "iscrowd": 0})
        results.append({"image_id": 1, "category_id": 1, "score": 0.5, "segmentation": rle, "bbox": [x, y, 20, 20]})
    fp = np.zeros((h, w), bool)
    fp[150:160, 150:160] = True  # unmatched 100 px mask, top score, with a 60 x 60 box
    results.append({"image_id": 1, "category_id": 1, "score": 0.9, "segmentation": mask_to_rle(fp),
                    "bbox": [130, 130, 60, 60]})
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps({"images": [{"id": 1, "height": h, "width": w, "file_name": "a.jpg"}],
                                "annotations": anns, "categories": [{"id": 1, "name": "square"}]}))
    ours = evaluate_instances(path, results)
    without_box = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    assert ours == direct_cocoeval(path, without_box)
    assert ours["APs"] == pytest.approx(0.75)  # 3 hits ranked below one small false positive
    assert direct_cocoeval(path, results)["APs"] == pytest.approx(1.0)  # the quirk we avoid


def test_empty_results_warn_and_score_zero(coco_split, lvis_gt):
    for gt, keys in ((load_annotations(coco_split["coco"]), COCO_AP_KEYS), (lvis_gt, LVIS_AP_KEYS)):
        with pytest.warns(RuntimeWarning, match="no results"):
            ap = evaluate_instances(gt, [])
        assert ap == {k: 0.0 for k in keys}


def test_lvis_numpy_shim_is_scoped():
    import lvis.eval as lvis_eval_module

    with lvis_numpy_compat():
        assert lvis_eval_module.np.float is float
        assert lvis_eval_module.np.cumsum is np.cumsum
    assert lvis_eval_module.np is np
    assert "float" not in vars(np)  # numpy itself was never touched


# ---------------------------------------------------------------------------------------------
# prompts on all 977 real objects
# ---------------------------------------------------------------------------------------------

@needs_fixture
def test_first_click_and_box_on_every_fixture_object(lvis_gt, lvis_masks):
    anns = lvis_gt.annotations
    multi = [a for a in anns if len(a["segmentation"]) > 1]
    small = [a for a in anns if a["area"] < 32 ** 2]
    tiny = [a for a in anns if lvis_masks[a["id"]].sum() <= 4]
    assert len(multi) > 0 and len(small) > 0 and len(tiny) > 0
    for a in anns:
        m = lvis_masks[a["id"]]
        x, y = first_click(m)
        assert m[y, x], a["id"]
        # the click is a true maximum of the full-image distance transform (the crop is exact)
        dist = distance_to_boundary(m)
        assert dist[y, x] == pytest.approx(float(dist.max()), rel=1e-6), a["id"]
        bx, by, bw, bh = a["bbox"]
        np.testing.assert_array_equal(box_prompt(a), [bx, by, bx + bw, by + bh])


def test_first_click_geometry():
    square = np.zeros((30, 30), bool)
    square[5:16, 5:16] = True
    assert first_click(square) == (10, 10)
    rect = np.zeros((30, 60), bool)
    rect[10:21, 5:46] = True  # a ridge along row 15: its first pixel in row-major order, as RITM
    assert first_click(rect) == (10, 15) == first_click(rect.copy())
    dot = np.zeros((5, 5), bool)
    dot[4, 0] = True  # one pixel in the corner
    assert first_click(dot) == (0, 4)
    line = np.eye(40, dtype=bool)  # 1-px diagonal
    x, y = first_click(line)
    assert line[y, x]
    edge = np.zeros((20, 40), bool)
    edge[:, :10] = True  # touching the frame: the frame is boundary too
    assert first_click(edge)[0] in (4, 5)
    with pytest.raises(ValueError, match="empty"):
        first_click(np.zeros((4, 4), bool))


@needs_fixture
def test_next_click_on_fixture_objects(lvis_gt, lvis_masks):
    objects = [lvis_masks[a["id"]] for a in lvis_gt.annotations if a["area"] >= 32 ** 2]
    assert len(objects) > 100
    for gt in objects:
        assert next_click(gt, gt) == (0, 0, 0)  # nothing left to correct: RITM clicks (0, 0), negative
        # prediction missing the left part of the object -> positive click in the missed part
        cols = np.nonzero(gt)[1]
        pred = gt.copy()
        pred[:, : int(np.median(cols))] = False
        x, y, label = next_click(gt, pred)
        assert label == 1 and gt[y, x] and not pred[y, x]
        # prediction with a false-positive blob away from the object -> negative click in it
        far = distance_to_boundary(~gt)
        by, bx = np.unravel_index(np.argmax(far), far.shape)
        radius = int(max(1, min(12, far[by, bx] - 2)))
        blob = np.zeros_like(gt)
        cv2.circle(blob.view(np.uint8), (int(bx), int(by)), radius, 1, -1)
        blob &= ~gt
        x, y, label = next_click(gt, gt | blob)
        assert label == 0 and blob[y, x]
    # both errors: the one deeper inside its own region wins
    gt = np.zeros((100, 100), bool)
    gt[10:60, 10:60] = True
    pred = gt.copy()
    pred[10:14, 10:60] = False  # a thin 4-px miss
    pred[70:95, 70:95] = True  # a thick 25-px false positive
    x, y, label = next_click(gt, pred)
    assert label == 0 and 70 <= x < 95 and 70 <= y < 95
    coords, labels = clicks_to_arrays([first_click(gt), (x, y, label)])
    assert coords.shape == (2, 2) and labels.tolist() == [1, 0]


def _ritm_click(gt: np.ndarray, pred: np.ndarray, not_clicked: np.ndarray):
    """A transcription of RITM's ``Clicker._get_next_click`` (isegm/inference/clicker.py,
    padding=True, no ignore label), on the full image: (x, y, label)."""
    fn = np.pad(np.logical_and(gt, np.logical_not(pred)), ((1, 1), (1, 1)), "constant")
    fp = np.pad(np.logical_and(np.logical_not(gt), pred), ((1, 1), (1, 1)), "constant")
    fn_dt = cv2.distanceTransform(fn.astype(np.uint8), cv2.DIST_L2, 0)[1:-1, 1:-1] * not_clicked
    fp_dt = cv2.distanceTransform(fp.astype(np.uint8), cv2.DIST_L2, 0)[1:-1, 1:-1] * not_clicked
    fn_max, fp_max = np.max(fn_dt), np.max(fp_dt)
    positive = fn_max > fp_max
    ys, xs = np.where(fn_dt == fn_max) if positive else np.where(fp_dt == fp_max)
    return int(xs[0]), int(ys[0]), int(positive)


def _wrong_predictions(gt: np.ndarray):
    """A fixed sequence of four wrong predictions after clicks 1-4 (click 1 sees an empty one)."""
    empty = np.zeros_like(gt)
    shifted = np.roll(gt, (3, 5), axis=(0, 1))
    cols = np.nonzero(gt)[1]
    half = gt.copy()
    half[:, : int(np.median(cols))] = False
    grown = cv2.dilate(gt.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
    return [empty, empty, shifted, half, grown]


@needs_fixture
def test_clicks_are_ritm_pixels_on_the_lvis_fixture(lvis_gt, lvis_masks):
    """Clicks 1-5 land on RITM's pixel, for every fixture object, never twice on one pixel; the
    second prediction is empty again (RITM's history moves click 2 off click 1)."""
    from eval.prompts import Clicker

    checked = moved = 0
    for a in lvis_gt.annotations[::4]:  # a quarter of the 977 objects keeps the test under 10 s
        gt = lvis_masks[a["id"]]
        if not gt.any():
            continue
        clicker, not_clicked, ours, ritm = Clicker(gt), np.ones_like(gt), [], []
        for pred in _wrong_predictions(gt):
            ours.append(clicker.next_click(pred))
            x, y, label = _ritm_click(gt, pred, not_clicked)
            not_clicked[y, x] = False
            ritm.append((x, y, label))
        assert ours == ritm, (a["id"], ours, ritm)
        assert len({c[:2] for c in ours}) == 5, (a["id"], ours)
        assert ours[0][:2] == first_click(gt) and ours[0][2] == 1
        assert next_click(gt, np.zeros_like(gt), clicked=[ours[0]]) == ours[1]
        checked += 1
        moved += ours[1][:2] != ours[0][:2]
    assert checked > 230 and moved == checked


# ---------------------------------------------------------------------------------------------
# mIoU
# ---------------------------------------------------------------------------------------------

def test_mask_iou_and_buckets():
    a = np.zeros((10, 10), bool)
    b = np.zeros((10, 10), bool)
    assert mask_iou(a, b) == 1.0  # both empty: defined as a perfect match
    a[:5] = True
    assert mask_iou(a, b) == 0.0
    b[:, :5] = True
    assert mask_iou(a, b) == pytest.approx(25 / 75)
    with pytest.raises(ValueError, match="shapes differ"):
        mask_iou(a, np.zeros((5, 5), bool))
    assert [area_bucket(v) for v in (0, 1023.9, 1024, 9215, 9216)] == ["small", "small", "medium", "medium", "large"]


def test_summarize_miou_per_bucket_and_click():
    records = [
        {"iou": 0.2, "area": 100, "click": 1}, {"iou": 0.6, "area": 100, "click": 2},
        {"iou": 0.4, "area": 5000, "click": 1}, {"iou": 0.8, "area": 5000, "click": 2},
    ]
    s = summarize_miou(records)
    assert s["mIoU@1click"] == pytest.approx(0.3) and s["mIoU@2click"] == pytest.approx(0.7)
    assert s["mIoU"] == pytest.approx(0.7) and s["clicks"] == 2.0 and s["count"] == 2.0
    assert s["mIoU_small"] == pytest.approx(0.6) and s["mIoU_medium"] == pytest.approx(0.8)
    assert s["mIoU_small@1click"] == pytest.approx(0.2)
    assert math.isnan(s["mIoU_large"]) and s["count_large"] == 0.0
    assert all(isinstance(v, float) for v in s.values())
    # box prompts: one round, bucket given directly
    assert summarize_miou([{"iou": 0.5, "bucket": "large"}])["mIoU_large"] == 0.5
    with pytest.raises(ValueError, match="record 0 lacks"):
        summarize_miou([{"area": 5}])


# ---------------------------------------------------------------------------------------------
# bad input: messages name the file / id
# ---------------------------------------------------------------------------------------------

def test_bad_annotation_files(tmp_path):
    not_coco = tmp_path / "not_coco.json"
    not_coco.write_text(json.dumps({"info": {}, "licenses": []}))
    with pytest.raises(AnnotationError, match="not_coco.json.*not a COCO/LVIS.*missing 'images'"):
        load_annotations(not_coco)
    a_list = tmp_path / "a_list.json"
    a_list.write_text("[1, 2]")
    with pytest.raises(AnnotationError, match="a_list.json.*top level is a list"):
        load_annotations(a_list)
    wrong_type = tmp_path / "wrong_type.json"
    wrong_type.write_text(json.dumps({"images": {}, "annotations": [], "categories": []}))
    with pytest.raises(AnnotationError, match="wrong_type.json.*'images' is a dict"):
        load_annotations(wrong_type)
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text(FIXTURE.read_text()[:5000] if FIXTURE.is_file() else '{"images": [')
    with pytest.raises(AnnotationError, match="corrupt.json.*not valid JSON"):
        load_annotations(corrupt)
    dangling = tmp_path / "dangling.json"
    dangling.write_text(json.dumps({
        "images": [{"id": 1, "height": 10, "width": 10}], "categories": [{"id": 1}],
        "annotations": [{"id": 7, "image_id": 424242, "category_id": 1, "segmentation": [[0, 0, 5, 0, 5, 5]]}]}))
    with pytest.raises(AnnotationError, match="dangling.json.*unknown image id.*424242"):
        load_annotations(dangling)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_annotations(tmp_path / "nope.json")


def test_rle_size_mismatch_names_annotation():
    rle = mask_to_rle(np.ones((20, 30), bool))
    with pytest.raises(AnnotationError, match=r"annotation 1234: RLE size \[20, 30\].*\[40, 30\]"):
        annotation_mask({"id": 1234, "segmentation": rle}, 40, 30)
    with pytest.raises(AnnotationError, match="annotation 99: uncompressed RLE counts sum"):
        annotation_mask({"id": 99, "segmentation": {"size": [4, 4], "counts": [3, 2]}}, 4, 4)


def test_bad_results(coco_split, tmp_path):
    gt = load_annotations(coco_split["coco"])
    good = gt_as_results(gt)[:3]
    with pytest.raises(ValueError, match=r"2 image id\(s\) are not in .*instances_coco.json: 999999991, 999999992"):
        evaluate_instances(gt, good + [dict(good[0], image_id=999999991), dict(good[0], image_id=999999992)])
    with pytest.raises(ResultsError, match=r"category id\(s\) are not in .*: 77"):
        evaluate_instances(gt, good + [dict(good[0], category_id=77)])
    img = gt.images[good[0]["image_id"]]
    wrong_size = mask_to_rle(np.ones((img["height"] + 1, img["width"]), bool))
    with pytest.raises(ResultsError, match=r"\(result 1\): RLE size"):
        evaluate_instances(gt, [good[0], dict(good[1], segmentation=wrong_size)])
    not_list = tmp_path / "not_list.json"
    not_list.write_text(json.dumps({"image_id": 1}))
    with pytest.raises(ResultsError, match="not_list.json.*must be a list"):
        load_results(not_list)
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps([{"image_id": 1, "segmentation": good[0]["segmentation"]}]))
    with pytest.raises(ResultsError, match="missing.json: result 0 lacks category_id, score"):
        load_results(missing)
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('[{"image_id": 1,')
    with pytest.raises(ResultsError, match="corrupt.json.*not valid JSON"):
        load_results(corrupt)


def test_missing_image_names_id_and_path(tmp_path, lvis_gt):
    image = lvis_gt.images[266409]
    with pytest.raises(FileNotFoundError, match=r"lvis_v0.5_val_100.json: image id 266409 not found; tried "
                                                 r".*COCO_val2014_000000266409.jpg.*000000266409.jpg"):
        lvis_gt.image_path(266409, tmp_path)
    assert image["file_name"] == "COCO_val2014_000000266409.jpg"
