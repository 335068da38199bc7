"""Issue 16: the probes of a demanding user, each with the answer it must get (at least one
test per probe number, 1 to 18; add the next probe here)."""
import subprocess
import sys
from pathlib import Path

import pytest

from blvit.train.config import ConfigError, load_config
from conftest import tiny_dense_checkpoint

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "configs/sam/quickstart.yaml"


def _run(*args, timeout=120):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_probe_01_train_without_config_is_refused():
    out = _run("tools/train.py", "train.max_steps=5")
    assert out.returncode == 2 and "--config" in out.stderr and "required" in out.stderr


@pytest.mark.parametrize("override, message", [
    ("train.max_steps=-5", "train.max_steps must be a whole number of at least 1, got -5"),
    ("train.epochs=-1", "train.epochs must be a whole number of at least 1, got -1"),
    ("train.batch_size=0", "train.batch_size must be a whole number of at least 1, got 0"),
])
def test_probe_03_meaningless_train_settings_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(QUICK, [override])


@pytest.mark.parametrize("keep", ["0", "1.5"])
def test_probe_03_bad_keep_ratio_is_one_line_exit_2(tmp_path, keep):
    out = _run("tools/train.py", "--config", str(QUICK), f"model.keep_ratio={keep}", f"output_dir={tmp_path}")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error:") and "keep_ratio" in out.stderr
    assert "Traceback" not in out.stderr


def test_probe_07_flops_cli_lists_choices_and_builds_stock_at_any_size():
    out = _run("-m", "blvit_apps.flops_cli", "--variants", "foo")
    assert out.returncode == 2 and "invalid choice: 'foo'" in out.stderr and "'b+t'" in out.stderr
    out = _run("-m", "blvit_apps.flops_cli", "--img-size", "256", "--variants", "b+t")
    assert out.returncode == 0, out.stderr
    assert "| SAM vit_b (segment_anything) | 34.5 |" in out.stdout


def test_probe_11_synthetic_and_quickstart_share_one_default():
    from blvit.data.make_synthetic import DEFAULT_TRAIN_IMAGES

    expected = f"(default: {DEFAULT_TRAIN_IMAGES})"
    for module in ("blvit.data.make_synthetic", "blvit_apps.quickstart"):
        out = _run("-m", module, "--help")
        assert out.returncode == 0 and expected in " ".join(out.stdout.split()), module


def test_probe_14_bad_yaml_override_and_options_after_overrides():
    with pytest.raises(ConfigError, match=r"override 'train.lr=\[1': the value is not valid YAML"):
        load_config(QUICK, ["train.lr=[1"])
    out = _run("tools/train.py", "--config", str(QUICK), "train.lr=[1")
    assert out.returncode == 2 and "not valid YAML" in out.stderr and "Traceback" not in out.stderr
    # an option after the overrides is read as an option (here --strict with a missing data folder)
    out = _run("tools/train.py", "--config", str(QUICK), "data.root=/nonexistent", "--strict")
    assert out.returncode == 2 and "SA-1B data folder not found" in out.stderr


def test_probe_02_quickstart_config_on_another_folder_trains_without_validation(tmp_path, caplog):
    from blvit.data.synthetic import write_sa1b
    from sam_adapter.trainer import train

    write_sa1b(tmp_path / "mine", 4, seed=3)
    cfg = load_config(QUICK, [f"data.root={tmp_path / 'mine'}", f"output_dir={tmp_path / 'run'}", "train.max_steps=1",
                              f"data.val_root={tmp_path / 'no_such_val'}"])
    with caplog.at_level("WARNING"):
        summary = train(cfg)
    assert "training WITHOUT validation" in caplog.text and "no_such_val" in caplog.text
    assert summary["steps"] == 1 and Path(summary["best_checkpoint"]).exists() and "validation" not in summary


def test_probe_12_a_folder_of_bad_samples_stops_with_a_clear_error(tmp_path):
    from blvit.data.synthetic import write_sa1b
    from sam_adapter.trainer import train

    write_sa1b(tmp_path / "bad", 4, seed=3)
    for jpg in (tmp_path / "bad").glob("*.jpg"):
        jpg.write_bytes(b"")
    cfg = load_config(QUICK, [f"data.root={tmp_path / 'bad'}", f"output_dir={tmp_path / 'run'}", "train.epochs=1",
                              "data.val_root=null"])
    with pytest.warns(UserWarning, match="corrupt or unreadable image"):
        with pytest.raises(ValueError, match=r"bad: no usable samples: every sample of epoch 0 was skipped \(4 skipped"):
            train(cfg)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on the garbage bytes, expected
def test_probe_15_damaged_teacher_cache_entry_is_named(tmp_path):
    from blvit.data.sa1b import SA1BDataset, find_samples
    from blvit.data.synthetic import write_sa1b
    from blvit.train.teacher_cache import TeacherEmbeddingCache, entry_name

    write_sa1b(tmp_path / "data", 1, seed=3)
    dataset = SA1BDataset(find_samples(tmp_path / "data"), img_size=256, max_masks=2)
    (tmp_path / "cache").mkdir()
    entry = tmp_path / "cache" / entry_name(dataset.refs[0])
    entry.write_bytes(b"\x80\x04 not a tensor file")
    with pytest.raises(ValueError, match=rf"{entry}: damaged teacher embedding of .*delete .*cache to rebuild"):
        TeacherEmbeddingCache(dataset, tmp_path / "cache")[0]


def test_probe_06_best_checkpoint_holds_weights_and_config_only(tmp_path):
    import torch

    from blvit.data.synthetic import write_sa1b
    from sam_adapter.trainer import train

    write_sa1b(tmp_path / "data", 4, seed=3)
    cfg = load_config(QUICK, [f"data.root={tmp_path / 'data'}", f"output_dir={tmp_path / 'run'}", "train.max_steps=2",
                              "data.val_root=null", "train.save_every=1"])
    summary = train(cfg)
    ckpts = tmp_path / "run/checkpoints"
    best = torch.load(ckpts / "best.pth", weights_only=False)
    assert set(best) == {"format", "version", "config", "model", "best"} and best["best"]["step"] >= 1
    step = torch.load(ckpts / (ckpts / "latest.txt").read_text().strip(), weights_only=False)
    assert "optimizer" in step["train_state"]  # the resume state stays in the step checkpoints
    assert (ckpts / "best.pth").stat().st_size < 0.7 * (ckpts / "step_2.pth").stat().st_size  # no optimizer state
    from sam_adapter.build import build_sam_from_checkpoint

    build_sam_from_checkpoint(summary["best_checkpoint"])  # what eval and the demo read


def test_probe_04_bad_annotation_entries_and_pixel_bombs_are_skipped_with_the_file(tmp_path, monkeypatch):
    import json
    import warnings

    from PIL import Image

    from blvit.data.sa1b import SA1BDataset, SampleError, find_samples
    from blvit.data.synthetic import write_sa1b

    write_sa1b(tmp_path, 2, seed=3)
    first, second = sorted(tmp_path.glob("sa_*.json"))
    record = json.loads(first.read_text())
    record["annotations"] = ["oops"]
    first.write_text(json.dumps(record))
    dataset = SA1BDataset(find_samples(tmp_path), img_size=256, max_masks=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert dataset[0] is None and dataset[1] is not None
    assert f"{first.with_suffix('.jpg')}: annotation 0 is not an object ('oops')" in str(caught[0].message)
    # a decompression bomb: PIL refuses images above twice its pixel limit (lowered here)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert dataset[1] is None
    assert any(f"{second.with_suffix('.jpg')}: image refused, too many pixels" in str(w.message) for w in caught)
    with pytest.raises(SampleError, match="too many pixels"):
        SA1BDataset(find_samples(tmp_path), img_size=256, strict=True)[1]


def test_probe_13_pixel_bomb_in_eval_and_demo_is_one_clear_error(tmp_path, monkeypatch):
    from PIL import Image

    from blvit.data.synthetic import render_image
    from eval.sam_eval import read_image

    path = tmp_path / "big.png"
    Image.fromarray(render_image(1)[0]).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ValueError, match=f"{path}: image refused, too many pixels"):
        read_image(path)
    # the demo's command line: one line, exit status 2 (blvit-eval skips such images: probe 16's test)
    from blvit_apps.demo.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["--image", str(path), "--point", "5,5"])
    assert stop.value.code == 2


def test_probe_09_eval_help_texts_and_the_dense_model_named_as_such(tmp_path):
    import argparse

    from blvit_apps.demo.core import load_demo_model
    from eval.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            assert action.help, (name, action.option_strings)  # every option says what it does
    prompts = subparsers.choices["prompts"].format_help()
    assert "(default: point)" in " ".join(prompts.split()) and "(default: 1)" in prompts
    # a dense checkpoint of this toolkit is reported as dense_vit_b, not as segment-anything's vit_b
    _, info = load_demo_model(checkpoint=str(tiny_dense_checkpoint(tmp_path / "dense.pth")))
    assert info["model"] == "dense_vit_b" and info["dense"]


def test_probe_05_stale_temp_files_ctrl_c_and_redone_steps(tmp_path, monkeypatch):
    import json

    from blvit.data.synthetic import write_sa1b
    from sam_adapter import trainer as sam_trainer
    from sam_adapter.trainer import train

    write_sa1b(tmp_path / "data", 8, seed=3)
    common = [f"data.root={tmp_path / 'data'}", f"output_dir={tmp_path / 'run'}", "data.val_root=null",
              "train.batch_size=2", "train.epochs=2"]
    ckpts = tmp_path / "run/checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / ".step_1.pth.abc123.tmp").write_bytes(b"half a checkpoint")  # what a SIGKILL mid-save leaves
    forward = sam_trainer.SamTrainingModule.forward
    calls = {"n": 0}

    def interrupted(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(sam_trainer.SamTrainingModule, "forward", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(load_config(QUICK, common))
    assert not list(ckpts.glob(".*.tmp"))
    assert (ckpts / "latest.txt").read_text() == "step_3.pth" and (ckpts / "step_3.pth").exists()
    monkeypatch.setattr(sam_trainer.SamTrainingModule, "forward", forward)
    summary = train(load_config(QUICK, common), resume=True)
    assert summary["steps"] == 8
    # resuming from an older checkpoint redoes steps 5-8: their first records are replaced, not repeated
    (ckpts / "latest.txt").write_text("step_4.pth")
    train(load_config(QUICK, common), resume=True)
    steps = [json.loads(line)["step"] for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9)), steps


def test_probe_18_paths_outside_the_images_folder_and_file_modes(tmp_path):
    import os

    from blvit.utils.io import atomic_write_text
    from eval.annotations import image_path

    (tmp_path / "images").mkdir()
    (tmp_path / "secret.jpg").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"names '../secret.jpg', outside the images folder"):
        image_path({"id": 1, "file_name": "../secret.jpg"}, tmp_path / "images")
    with pytest.raises(ValueError, match="outside the images folder"):
        image_path({"id": 1, "file_name": str(tmp_path / "secret.jpg")}, tmp_path / "images")
    old = os.umask(0o022)
    try:
        mode = atomic_write_text(tmp_path / "report.txt", "ok").stat().st_mode & 0o777
        os.umask(0o077)
        private = atomic_write_text(tmp_path / "private.txt", "ok").stat().st_mode & 0o777
    finally:
        os.umask(old)
    assert mode == 0o644 and private == 0o600


def test_probe_10_everything_that_keeps_nothing_says_which_threshold_dropped_what(tmp_path, monkeypatch, capsys):
    from blvit_apps.demo import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BLVIT_QUICKSTART_DIR", raising=False)
    report = cli.run(["--everything", "--points-per-side", "2", "--pred-iou-thresh", "1.01", "--out", "all.png"])
    out = capsys.readouterr().out
    assert report["masks"] == []
    assert "candidate masks:" in out and "below --pred-iou-thresh 1.01" in out and "--stability-thresh 0.95" in out
    assert "blvit-quickstart --train-images 1600 --teacher-epochs 12" in out  # no --checkpoint: the quick start's model


def test_probe_08_bench_progress_spread_and_busy_warning(tmp_path, capsys, monkeypatch):
    import json
    import warnings

    from blvit_apps import sam_benchmark as benchmark

    benchmark.main(["--img-size", "128", "--encoders", "dense_vit_b", "--batches", "1", "--repeats", "3", "--warmup", "0",
                    "--no-predictor", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "[1/1] dense_vit_b: batches [1], 0 warm-up + 3 timed runs each" in out
    row = json.loads((tmp_path / "bench.json").read_text())["rows"][0]
    assert row["min_ms"] <= row["median_ms"] <= row["max_ms"]
    assert f"({row['min_ms']:.1f}-{row['max_ms']:.1f})" in (tmp_path / "bench.md").read_text()
    # a busy machine: one timed run three times slower than the others
    monkeypatch.setattr(benchmark, "time_call", lambda fn, device, repeats, warmup: [0.01, 0.01, 0.03])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        benchmark.run_benchmark(["dense_vit_b"], 128, [1], 3, 0, benchmark.torch.device("cpu"), False,
                                with_predictor=False)
    assert any("the machine was busy" in str(w.message) for w in caught)


def test_probe_16_invalid_boxes_and_probe_13_unreadable_images_are_counted_and_skipped(tmp_path, monkeypatch):
    import json
    import warnings

    from PIL import Image

    from blvit.data.make_synthetic import ensure_synthetic
    from eval.cli import run

    data = ensure_synthetic(tmp_path / "data", train=1, val=1, heldout=4)
    coco = json.loads(Path(data["heldout_coco"]).read_text())
    images = {im["id"]: im for im in coco["images"]}
    first, second, third, fourth = sorted(images)
    anns = [a for a in coco["annotations"] if a["image_id"] == first]
    anns[0]["bbox"] = [images[first]["width"] + 10, 5, 20, 20]  # outside the image
    anns[1]["bbox"] = [10, 10, -5, 20]  # negative size
    other = next(a for a in coco["annotations"] if a["image_id"] == second)
    other["bbox"] = [10, "a", 5, 5]  # not a number
    bad_ids = {anns[0]["id"]: "outside", anns[1]["id"]: "no area", other["id"]: "not 4 numbers"}
    bad_path = tmp_path / "bad.json"
    # an unreadable image, and a pixel bomb (refused above twice PIL's limit, lowered here)
    img_dir = Path(data["heldout_images"])
    (img_dir / images[third]["file_name"]).write_bytes(b"not an image")
    Image.new("RGB", (1500, 1500)).save(img_dir / images[fourth]["file_name"], format="JPEG")
    images[fourth].update(width=1500, height=1500)
    bad_path.write_text(json.dumps(coco))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)

    ckpt = tiny_dense_checkpoint(tmp_path / "dense.pth")
    args = ["prompts", "--annotations", str(bad_path), "--images", str(img_dir), "--model", "dense_vit_b",
            "--checkpoint", str(ckpt), "--prompt", "box"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = run(args + ["--out", str(tmp_path / "box.json")])
    text = " ".join(str(w.message) for w in caught)
    for ann_id, why in bad_ids.items():
        assert report["annotations_skipped"][str(ann_id)].find(why) >= 0, report["annotations_skipped"]
        assert f"annotation {ann_id}:" in text
    assert set(report["images_skipped"]) == {str(third), str(fourth)}
    assert "not a readable image" in report["images_skipped"][str(third)]
    assert "too many pixels" in report["images_skipped"][str(fourth)]
    assert str(img_dir / images[third]["file_name"]) in text and str(img_dir / images[fourth]["file_name"]) in text
    valid = [a for a in coco["annotations"] if a["image_id"] in (first, second) and a["id"] not in bad_ids]
    assert report["images"] == 2 and report["objects"] == len(valid)
    # point prompts do not use the box: the same annotations are measured
    point = run(args[:-1] + ["point", "--out", str(tmp_path / "point.json")])
    assert point["annotations_skipped"] == {} and point["objects"] == len(valid) + len(bad_ids)
    # --strict stops at the first unreadable image, naming it
    with pytest.raises(ValueError, match="not a readable image|too many pixels"):
        run(args + ["--strict", "--fresh", "--out", str(tmp_path / "strict.json")])


def test_probe_17_demo_server_bounds_pixels_memory_and_decoding_and_refuses_bad_numbers(monkeypatch):
    import io
    import threading
    import time

    from PIL import Image

    from blvit_apps.demo import server as demo_server
    from sam_adapter import build_sam_blvit

    sam = build_sam_blvit("vit_b", keep_ratio=1.0, img_size=64, embed_dim=32, depth=1, num_heads=2,
                          global_attn_indexes=(0,), out_chans=32, window_size=4)
    app = demo_server.create_app(sam, {"model": "tiny"}, max_upload_mb=1, cache_size=8, max_megapixels=0.5,
                                 cache_mb=0.5, decode_workers=1)
    client, service = app.test_client(), app.extensions["blvit_demo"]

    def png(width, height, value=0):
        buf = io.BytesIO()
        Image.new("RGB", (width, height), (value, value, value)).save(buf, format="PNG")
        return buf.getvalue()

    def upload(data, name="x.png"):
        return client.post("/api/image", data={"image": (io.BytesIO(data), name)}, content_type="multipart/form-data")

    # a small file of many pixels: refused from its header, before decoding, with 413
    huge = png(2000, 2000)
    assert len(huge) < 1024 * 1024
    res = upload(huge, "huge.png")
    assert res.status_code == 413 and "4.0 megapixels" in res.get_json()["error"] and "--max-megapixels" in res.get_json()["error"]
    # the cache is bounded in bytes, not only in entries: 0.5 MB holds two 300x300 images (+ features), not eight
    ids = [upload(png(300, 300, v)).get_json()["image_id"] for v in range(4)]
    assert len(set(ids)) == 4 and 1 <= len(service.cache) < 4 and list(service.cache)[-1] == ids[-1]
    assert service.cached_bytes() <= 0.5 * 2**20
    # decoding is bounded: with decode_workers=1, two uploads never decode at the same time
    active, peak, real = [0], [0], demo_server.decode_image

    def slow_decode(*args, **kwargs):
        active[0] += 1
        peak[0] = max(peak[0], active[0])
        time.sleep(0.2)
        active[0] -= 1
        return real(*args, **kwargs)

    monkeypatch.setattr(demo_server, "decode_image", slow_decode)
    threads = [threading.Thread(target=lambda v=v: app.test_client().post(
        "/api/image", data={"image": (io.BytesIO(png(32, 32, v)), "t.png")}, content_type="multipart/form-data"))
        for v in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] == 1
    # numbers a float cannot hold, and a multimask that is not a boolean: 400, not 500 / three masks
    image_id = ids[-1]
    for body, text in (({"points": [[int("9" * 401), 5]]}, "finite numbers"),
                       ({"box": [0, 0, int("9" * 401), 5]}, "finite numbers"),
                       ({"points": [[5, 5]], "multimask": "false"}, "JSON boolean")):
        res = client.post("/api/predict", json={"image_id": image_id, **body})
        assert res.status_code == 400 and text in res.get_json()["error"], res.get_json()
    ok = client.post("/api/predict", json={"image_id": image_id, "points": [[5, 5]], "multimask": True})
    assert ok.status_code == 200 and len(ok.get_json()["scores"]) == 3


@pytest.mark.parametrize("shape", [(200, 200), (100, 300), (300, 100)])
def test_probe_10_overlay_titles_are_inside_the_picture(tmp_path, monkeypatch, shape):
    import numpy as np

    from blvit_deploy import viz

    plt = viz._plt()
    kept = []
    monkeypatch.setattr(plt, "close", kept.append)
    image = np.zeros((*shape, 3), np.uint8)
    mask = np.zeros(shape, bool)
    mask[10:50, 10:50] = True
    routing = [np.eye(8), np.ones((8, 8))]
    viz.save_overlay(tmp_path / "o.png", image, [mask] * 3, [0.91, 0.85, 0.5], points=np.array([[20, 20]]),
                     routing=routing, routing_titles=["P-block tokens from layer 3", "P-block tokens from layer 6"],
                     input_size=shape)
    fig = kept[0]
    renderer = fig.canvas.get_renderer()
    titles = 0
    for ax in fig.axes:
        picture = ax.get_window_extent(renderer)
        for text in ax.texts:
            box = text.get_window_extent(renderer)
            assert picture.x0 - 1 <= box.x0 and box.x1 <= picture.x1 + 1, (text.get_text(), box, picture)
            assert picture.y0 - 1 <= box.y0 and box.y1 <= picture.y1 + 1, (text.get_text(), box, picture)
            titles += 1
        assert ax.get_title() == ""
    assert titles == 3


def test_quickstart_set_overrides_reach_both_trainings_and_bad_keys_stop_it(tmp_path, monkeypatch):
    """blvit-quickstart --set KEY=VALUE: the override goes to the teacher's and the student's
    training; a key that does not exist stops the run before any training, naming the key."""
    from blvit_apps import quickstart

    folders = {k: str(tmp_path / k) for k in ("sa1b_train", "sa1b_val")}
    monkeypatch.setattr(quickstart, "ensure_synthetic", lambda out, train: folders)
    seen = []

    class Stop(Exception):
        pass

    def fake_train(config, overrides, processes=1):
        seen.append((config.name, overrides))
        if len(seen) == 2:
            raise Stop
        return {"best_checkpoint": str(tmp_path / "teacher.pth"), "validation": {"val_box_miou": 0.5}}

    monkeypatch.setattr(quickstart, "_train", fake_train)
    with pytest.raises(Stop):
        quickstart.run(["--set", "data.mask_size=input", "--set", "train.lr=1e-3", "--runs", str(tmp_path / "runs")])
    assert [name for name, _ in seen] == ["quickstart_teacher.yaml", "quickstart.yaml"]
    for _, overrides in seen:
        assert "data.mask_size=input" in overrides and "train.lr=1e-3" in overrides

    monkeypatch.undo()
    monkeypatch.setattr(quickstart, "ensure_synthetic", lambda out, train: folders)
    with pytest.raises(ConfigError, match="mask_sise"):
        quickstart.run(["--set", "data.mask_sise=input", "--runs", str(tmp_path / "runs")])
