"""blvit-eval end to end: synthetic held-out split, quick-start checkpoints, stock SAM, bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from blvit.data.make_synthetic import ensure_synthetic
from blvit.train.config import load_config
from sam_adapter.trainer import train
from eval.cli import run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Synthetic data plus quick-start teacher and student checkpoints (two training steps each)."""
    tmp = tmp_path_factory.mktemp("evalcli")
    data = ensure_synthetic(tmp / "data", train=8, val=4, heldout=6)
    common = [f"data.root={data['sa1b_train']}", "data.val_root=null", "train.max_steps=2"]
    teacher = train(load_config(ROOT / "configs/sam/quickstart_teacher.yaml", common + [f"output_dir={tmp / 'teacher'}"]))
    student = train(load_config(ROOT / "configs/sam/quickstart.yaml", common + [
        f"output_dir={tmp / 'student'}", f"teacher.checkpoint={teacher['best_checkpoint']}",
        f"model.sam_checkpoint={teacher['best_checkpoint']}"]))
    return tmp, data, teacher["best_checkpoint"], student["best_checkpoint"]


def _prompts(data, out, model, ckpt, *extra):
    return run(["prompts", "--annotations", data["heldout_coco"], "--images", data["heldout_images"], "--model", model,
                "--checkpoint", str(ckpt), "--out", str(out), *extra])


def test_prompts_with_quickstart_checkpoints(setup):
    tmp, data, teacher, student = setup
    point = _prompts(data, tmp / "r/student_point.json", "b+t", student, "--prompt", "point", "--clicks", "3", "--vis", "2")
    box = _prompts(data, tmp / "r/teacher_box.json", "dense_vit_b", teacher, "--prompt", "box")
    annotations = json.loads(Path(data["heldout_coco"]).read_text())["annotations"]
    for report in (point, box):
        assert report["objects"] == len(annotations) and report["images"] == 6
        assert 0.0 <= report["mIoU"] <= 1.0 and report["encoder_gmacs"] > 0 and report["images_per_s"] > 0
    assert {"mIoU@1click", "mIoU@2click", "mIoU@3click", "mIoU_small", "mIoU_large"} <= set(point)
    assert point["layout"] == "b+t" and box["layout"] == "vit_b"
    from blvit.flops import analytic_sam_encoder_macs
    from sam_adapter.build import build_sam_from_checkpoint

    config = build_sam_from_checkpoint(student).image_encoder.config
    assert point["encoder_gmacs"] == pytest.approx(analytic_sam_encoder_macs(config)["total"] / 1e9)
    assert json.loads((tmp / "r/student_point.json").read_text())["mIoU"] == pytest.approx(point["mIoU"])
    assert (tmp / "r/student_point.md").read_text().startswith("| model | mIoU")
    assert len(list((tmp / "r/student_point_vis").glob("*.png"))) == 2


def test_interrupted_run_resumes_from_cache(setup):
    tmp, data, _, student = setup
    out = tmp / "resume/box.json"
    full = _prompts(data, out, "b+t", student, "--prompt", "box")
    cache = out.with_suffix(".cache") / "rank0.jsonl"
    lines = cache.read_text().splitlines()
    assert len(lines) == 1 + 6
    cache.write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])  # killed while writing image 3
    again = _prompts(data, out, "b+t", student, "--prompt", "box")
    assert again["mIoU"] == pytest.approx(full["mIoU"], abs=1e-9)
    assert len(cache.read_text().splitlines()) >= 7
    with pytest.raises(ValueError, match="cached predictions were made with"):
        _prompts(data, out, "b+t", student, "--prompt", "box", "--keep-ratio", "0.5")


def test_caches_follow_the_checkpoint_file_and_only_this_runs_processes(setup, tmp_path):
    """A checkpoint rewritten in place (a training run's best.pth) is another model to the cache,
    and an earlier run's cache of a process this run does not have is not merged in."""
    import shutil

    _, data, _, student = setup
    ckpt = tmp_path / "best.pth"
    shutil.copy(student, ckpt)
    out = tmp_path / "box.json"
    first = _prompts(data, out, "b+t", ckpt, "--prompt", "box")
    stat = ckpt.stat()
    os.utime(ckpt, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # rewritten: a new modification time
    with pytest.raises(ValueError, match="cached predictions were made with"):
        _prompts(data, out, "b+t", ckpt, "--prompt", "box")
    # a leftover rank1.jsonl (an earlier two-process run) whose masks were all wrong
    cache = out.with_suffix(".cache")
    lines = (cache / "rank0.jsonl").read_text().splitlines()
    wrong = [json.loads(line) for line in lines[1:]]
    for row in wrong:
        for rec in row["records"]:
            rec["iou"] = [0.0] * len(rec.get("iou", []))
    (cache / "rank1.jsonl").write_text("\n".join([lines[0]] + [json.dumps(r) for r in wrong]) + "\n")
    again = _prompts(data, out, "b+t", ckpt, "--prompt", "box", "--fresh")
    assert again["mIoU"] == pytest.approx(first["mIoU"], abs=1e-9) and again["mIoU"] > 0


def test_attention_backends_give_the_same_report(setup, tmp_path):
    """--attn-backend changes the kernels, not the masks; it is refused for stock SAM models."""
    _, data, _, student = setup
    reports = {b: _prompts(data, tmp_path / f"{b}.json", "b+t", student, "--prompt", "box", "--attn-backend", b)
               for b in ("sdpa", "folded", "flex")}
    assert reports["sdpa"]["attn_backend"] == "sdpa" and reports["flex"]["attn_backend"] == "flex"
    for b in ("folded", "flex"):
        assert reports[b]["mIoU"] == pytest.approx(reports["sdpa"]["mIoU"], abs=1e-3), b
    with pytest.raises(ValueError, match="--attn-backend applies to this toolkit's encoders"):
        _prompts(data, tmp_path / "stock.json", "vit_b", student, "--attn-backend", "folded")


def test_instances_from_detections_and_predictions(setup, tmp_path):
    tmp, data, teacher, _ = setup
    gt = json.loads(Path(data["heldout_lvis"]).read_text())
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
            for a in gt["annotations"]]
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    report = run(["instances", "--annotations", data["heldout_lvis"], "--images", data["heldout_images"],
                  "--detections", str(tmp_path / "dets.json"), "--model", "dense_vit_b", "--checkpoint", str(teacher),
                  "--save-predictions", str(tmp_path / "preds.json"), "--out", str(tmp_path / "inst.json")])
    assert report["dataset"] == "lvis" and {"AP", "AP50", "APr", "APc", "APf"} <= set(report)
    assert report["results"] == len(dets) and report["encoder_gmacs"] > 0
    # the saved masks score the same when given back as --predictions
    again = run(["instances", "--annotations", data["heldout_lvis"], "--predictions", str(tmp_path / "preds.json"),
                 "--out", str(tmp_path / "again.json")])
    assert again["AP"] == pytest.approx(report["AP"])
    # ground-truth masks as predictions: AP 1 on the COCO file as well
    coco = json.loads(Path(data["heldout_coco"]).read_text())
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "segmentation": a["segmentation"], "score": 1.0}
               for a in coco["annotations"]]
    (tmp_path / "perfect.json").write_text(json.dumps(perfect))
    ap = run(["instances", "--annotations", data["heldout_coco"], "--predictions", str(tmp_path / "perfect.json"),
              "--out", str(tmp_path / "perfect_report.json")])
    assert ap["AP"] == pytest.approx(1.0)
    # --max-images: the first N images of the file are scored on their own; the others' objects
    # are not counted as missed
    part = run(["instances", "--annotations", data["heldout_lvis"], "--images", data["heldout_images"],
                "--detections", str(tmp_path / "dets.json"), "--model", "dense_vit_b", "--checkpoint", str(teacher),
                "--max-images", "2", "--save-predictions", str(tmp_path / "part.json"), "--out", str(tmp_path / "part_r.json")])
    first_two = sorted(im["id"] for im in gt["images"])[:2]
    saved = json.loads((tmp_path / "part.json").read_text())
    assert part["images_scored"] == 2 and {r["image_id"] for r in saved} <= set(first_two)
    from eval.metrics import evaluate_instances

    assert part["AP"] == pytest.approx(evaluate_instances(data["heldout_lvis"], saved, image_ids=first_two)["AP"])
    perfect_two = [r for r in perfect if r["image_id"] in first_two]
    assert evaluate_instances(data["heldout_coco"], perfect_two, image_ids=first_two)["AP"] == pytest.approx(1.0)
    assert evaluate_instances(data["heldout_coco"], perfect_two)["AP"] < 0.9  # the other images' objects missed
    with pytest.raises(ValueError, match="outside image_ids"):
        evaluate_instances(data["heldout_coco"], perfect, image_ids=first_two)


def test_bad_input_messages(setup, tmp_path, capsys):
    tmp, data, teacher, student = setup
    from eval.cli import main

    (tmp_path / "not_coco.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(SystemExit) as exit_info:
        main(["instances", "--annotations", str(tmp_path / "not_coco.json"), "--predictions", str(tmp_path / "x.json"),
              "--out", str(tmp_path / "r.json")])
    assert exit_info.value.code == 2 and "not_coco.json" in capsys.readouterr().err
    # a missing image is named
    broken = json.loads(Path(data["heldout_coco"]).read_text())
    broken["images"][0]["file_name"] = "missing.jpg"
    broken["images"][0]["coco_url"] = "http://images.cocodataset.org/val2017/missing.jpg"
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        _prompts({**data, "heldout_coco": str(tmp_path / "broken.json")}, tmp_path / "m.json", "b+t", student)
    # detections of images the annotation file does not have
    (tmp_path / "dets.json").write_text(json.dumps([{"image_id": 999, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 1}]))
    with pytest.raises(ValueError, match="image ids not in"):
        run(["instances", "--annotations", data["heldout_coco"], "--images", data["heldout_images"], "--detections",
             str(tmp_path / "dets.json"), "--model", "b+t", "--checkpoint", str(student), "--out", str(tmp_path / "d.json")])
    # an empty result set is AP 0 with a warning, not a crash
    (tmp_path / "empty.json").write_text("[]")
    with pytest.warns(RuntimeWarning, match="no results"):
        empty = run(["instances", "--annotations", data["heldout_coco"], "--predictions", str(tmp_path / "empty.json"),
                     "--out", str(tmp_path / "e.json")])
    assert empty["AP"] == 0.0
    # a checkpoint of the wrong kind for --model
    with pytest.raises(ValueError, match="holds a dense encoder"):
        _prompts(data, tmp_path / "w.json", "b+t", teacher)


@pytest.mark.heavy
def test_stock_sam_vit_b_in_official_layout(setup, tmp_path):
    """A randomly initialised segment-anything ViT-B saved as an official .pth, one image at 1024."""
    from segment_anything import sam_model_registry

    _, data, _, _ = setup
    torch.manual_seed(0)
    torch.save(sam_model_registry["vit_b"]().state_dict(), tmp_path / "sam_vit_b_random.pth")
    report = _prompts(data, tmp_path / "stock.json", "vit_b", tmp_path / "sam_vit_b_random.pth", "--prompt", "box",
                      "--max-images", "1")
    assert report["encoder"] == "ImageEncoderViT" and report["input_size"] == 1024
    assert report["encoder_gmacs"] == pytest.approx(486.0, rel=1e-3)
    assert 0.0 <= report["mIoU"] <= 1.0


@pytest.mark.heavy
def test_torchrun_two_processes_give_the_one_process_report(setup, tmp_path):
    tmp, data, _, student = setup
    one = _prompts(data, tmp_path / "one.json", "b+t", student, "--prompt", "point", "--clicks", "2")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tools/eval.py"), "prompts", "--annotations", data["heldout_coco"], "--images",
           data["heldout_images"], "--model", "b+t", "--checkpoint", str(student), "--prompt", "point", "--clicks", "2",
           "--out", str(tmp_path / "two.json")]
    result = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["processes"] == 2 and len(list((tmp_path / "two.cache").glob("rank*.jsonl"))) == 2
    for key in ("mIoU", "mIoU@1click", "mIoU@2click", "objects"):
        assert two[key] == pytest.approx(one[key], abs=1e-6), key


def test_table_of_the_paper_resumes_from_its_caches(setup, tmp_path):
    """blvit-eval table: dense and B+T rows with 1 / 3 random points, box and detector-box AP."""
    _, data, teacher, student = setup
    gt = json.loads(Path(data["heldout_coco"]).read_text())
    detections = tmp_path / "dets.json"  # an oracle detector: the ground-truth boxes
    detections.write_text(json.dumps([{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
                                       "score": 1.0} for a in gt["annotations"]]))
    argv = ["table", "--annotations", data["heldout_coco"], "--images", data["heldout_images"], "--model",
            f"dense_vit_b:{teacher}", "--model", f"b+t:{student}", "--detections", str(detections),
            "--out", str(tmp_path / "table.json")]
    table = run(argv)
    rows = table["rows"]
    assert [r["model"] for r in rows] == ["dense_vit_b", "b+t"]
    for r in rows:
        for key in ("mIoU 1 point", "mIoU 3 points", "mIoU box", "AP", "encoder_gflops"):
            assert r[key] is not None and r[key] >= 0, key
    assert rows[1]["encoder_gflops"] < rows[0]["encoder_gflops"]  # B+T is the cheaper encoder
    assert rows[0]["keep_ratio"] is None and rows[1]["keep_ratio"] == 0.25  # a dense encoder routes nothing
    md = (tmp_path / "table.md").read_text()
    assert md.startswith("| model | layout | keep | GFLOPs") and "mIoU 3 points" in md and md.count("\n") == 4
    # every cell has its report and cache: a second run resumes (same figures, no image recomputed)
    caches = sorted((tmp_path / "table_runs").rglob("rank0.jsonl"))
    assert len(caches) == 8
    contents = [c.read_text() for c in caches]
    again = run(argv)
    assert again["rows"] == rows
    assert [c.read_text() for c in caches] == contents  # nothing appended: every image came from a cache
