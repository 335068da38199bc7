"""blvit-demo: the command line, the web server's API, and the page in a headless browser."""
import io
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from conftest import TINY_BT

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART_CKPT = Path("runs/quickstart/student/checkpoints/best.pth")


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def _decode(rle) -> np.ndarray:
    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)


def _tiny_sam(seed: int = 0):
    from sam_adapter import build_sam_blvit

    torch.manual_seed(seed)
    return build_sam_blvit("b+t", **TINY_BT).eval()


def _synthetic(seed: int):
    """A synthetic image with known objects; its largest object and that object's box."""
    from blvit.data.synthetic import render_image

    image, objects = render_image(seed, 240, 320)
    obj = max(objects, key=lambda o: o["mask"].sum())["mask"]
    ys, xs = np.nonzero(obj)
    return image, obj, np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def _png(image: np.ndarray, path: Path) -> Path:
    Image.fromarray(image).save(path)
    return path


def _png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _run_cli(args, cwd: Path, env=None, timeout: int = 300) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {}))
    return subprocess.run([sys.executable, str(ROOT / "tools" / "demo.py"), *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def _finetune_on_box(image: np.ndarray, gt: np.ndarray, box: np.ndarray, steps: int = 40):
    """A model in the quick start's student layout whose decoder is fitted to one box prompt on
    one image (the encoder stays as initialised: the embedding is computed once, in eval mode,
    exactly as SamPredictor computes it)."""
    import torch.nn.functional as F
    from segment_anything.utils.transforms import ResizeLongestSide

    from blvit_apps.demo.core import _quickstart_layout_random

    torch.manual_seed(0)
    sam, _ = _quickstart_layout_random()
    sam.eval()
    transform = ResizeLongestSide(sam.image_encoder.img_size)
    x = torch.as_tensor(transform.apply_image(image)).permute(2, 0, 1)[None].float()
    input_size = tuple(x.shape[-2:])
    with torch.no_grad():
        embedding = sam.image_encoder(sam.preprocess(x))
    box_t = torch.as_tensor(transform.apply_boxes(box[None], image.shape[:2])).float()
    target = torch.as_tensor(gt).float()
    optimizer = torch.optim.Adam(sam.mask_decoder.parameters(), lr=1e-3)
    iou = 0.0
    for _ in range(steps):
        sparse, dense = sam.prompt_encoder(points=None, boxes=box_t, masks=None)
        low, iou_pred = sam.mask_decoder(image_embeddings=embedding, image_pe=sam.prompt_encoder.get_dense_pe(),
                                         sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                         multimask_output=False)
        logits = sam.postprocess_masks(low, input_size, image.shape[:2])[0, 0]
        prob = logits.sigmoid()
        iou = _iou(logits.detach().numpy() > 0, gt)
        loss = (F.binary_cross_entropy_with_logits(logits, target)
                + 1 - (2 * (prob * target).sum() + 1) / (prob.sum() + target.sum() + 1)
                + F.mse_loss(iou_pred[0, 0], torch.tensor(iou)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if iou > 0.95:
            break
    return sam, iou


# ---------------------------------------------------------------- command line: bad input


@pytest.mark.parametrize("args, message", [
    (["--point", "10,abc"], "is not a number"),
    (["--point", "10"], "expected x,y"),
    (["--point", "10,20,7"], "label must be 1"),
    (["--point", "nan,3"], "not a finite number"),
    (["--point", "5000,10"], "outside the 320x240 image"),
    (["--point=-1,10"], "outside"),
    (["--box", "100,100,50,200"], "x0 <= x1"),
    (["--box", "10,200,50,100"], "y0 <= y1"),
    (["--box", "1,2,3"], "expected x0,y0,x1,y1"),
    (["--box", "0,0,600,100"], "outside"),
    (["--everything", "--point", "3,3"], "--everything"),
    (["--image", "MISSING.png"], "no such file"),
])
def test_cli_bad_input_is_one_line_and_exit_2(args, message, capsys, tmp_path, monkeypatch):
    from blvit_apps.demo import cli

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("blvit-demo: error:") and message in err, err
    assert not list(tmp_path.iterdir())  # nothing written, no model loaded


def test_cli_not_an_image_and_bad_checkpoint(capsys, tmp_path):
    from blvit_apps.demo import cli

    text = tmp_path / "notes.png"
    text.write_text("this is not a picture")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--image", str(text), "--point", "1,1"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "not a readable image" in err and str(text) in err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--checkpoint", str(text), "--point", "1,1"])
    assert exit_info.value.code == 2 and "not a readable PyTorch checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # argparse's own errors are one line too
        cli.main(["--points-per-side"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1


def test_images_are_read_as_a_viewer_shows_them(tmp_path, capsys, monkeypatch):
    """A phone photo's EXIF orientation is applied (a click read off a viewer lands where it points),
    a 16-bit greyscale PNG is scaled to 8 bits (not clipped white), and an image too thin for the
    model's input is one clear error; the evaluation reads the stored pixels, as annotated."""
    from blvit_apps.demo import cli
    from blvit_deploy.images import read_image

    stored = np.zeros((100, 200, 3), np.uint8)
    stored[:, :50] = 255  # the stored left quarter is white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(stored).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    shown = read_image(tmp_path / "phone.jpg", exif_transpose=True)
    assert shown.shape == (200, 100, 3) and shown[:40, :, 0].mean() > 200 and shown[-40:, :, 0].mean() < 50
    assert read_image(tmp_path / "phone.jpg").shape == (100, 200, 3)  # evaluation: as stored

    ramp = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "depth16.png")
    grey = read_image(tmp_path / "depth16.png")
    assert grey.shape == (64, 64, 3) and grey.min() == 0 and grey.max() == 255
    assert abs(float(grey.mean()) - 127.5) < 2  # not clipped at 255

    monkeypatch.chdir(tmp_path)
    Image.fromarray(np.zeros((600, 1, 3), np.uint8)).save(tmp_path / "strip.png")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--image", "strip.png", "--point", "0,300"])
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the random-model warning
    assert exit_info.value.code == 2 and last.startswith("blvit-demo: error: image 1x600 is too thin"), last


# ---------------------------------------------------------------- command line: runs


def test_cli_without_checkpoint_runs_random_model_loudly(capsys, tmp_path, monkeypatch):
    """No --checkpoint and no quick-start checkpoint: a random model of the quick-start layout,
    on the bundled photograph, with a loud warning, not a failure."""
    from blvit_apps.demo import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BLVIT_QUICKSTART_DIR", raising=False)
    report = cli.run(["--point", "256,150", "--out", "o.png", "--json", "m.json", "--routing"])
    err = capsys.readouterr().err
    assert "RANDOMLY INITIALISED" in err and "MEANINGLESS" in err
    assert report["model"]["random"] and report["model"]["img_size"] == 256
    # the default image is the quick start's first held-out image, in its models' domain
    assert report["image"].startswith("shapes") and (report["width"], report["height"]) == (320, 240)
    saved = json.loads((tmp_path / "m.json").read_text())
    assert len(saved["masks"]) == 1 and _decode(saved["masks"][0]["segmentation"]).shape == (240, 320)
    assert {"encoder_ms", "decoder_ms"} <= set(saved["timing"])
    with Image.open(tmp_path / "o.png") as im:  # image panel + one routing panel per predictor layer (2)
        assert im.size[0] > 2.5 * im.size[1]


def test_cli_checkpoint_model_routing_multimask_and_everything(tmp_path, capsys):
    """--model b+t with a toolkit checkpoint goes through eval.sam_eval.load_sam_model; --checkpoint
    alone through build_sam_from_checkpoint; negative points; --multimask; --everything."""
    from blvit_apps.demo import cli
    from sam_adapter import save_blvit_sam_checkpoint

    ckpt = tmp_path / "tiny.pth"
    save_blvit_sam_checkpoint(_tiny_sam(), ckpt)
    image, _, box = _synthetic(1)
    path = _png(image, tmp_path / "synthetic.png")
    a = cli.run(["--model", "b+t", "--checkpoint", str(ckpt), "--image", str(path), "--point", "100,100",
                 "--point", "20,20,0", "--multimask", "--json", str(tmp_path / "a.json")])
    assert a["model"]["model"] == "b+t" and not a["model"]["random"]
    assert len(a["masks"]) == 3 and a["prompts"]["labels"] == [1, 0]
    assert [m["score"] for m in a["masks"]] == sorted((m["score"] for m in a["masks"]), reverse=True)
    b = cli.run(["--checkpoint", str(ckpt), "--image", str(path), "--box", ",".join(str(v) for v in box),
                 "--routing", "--out", str(tmp_path / "b.png")])
    assert b["model"]["source"] == "--checkpoint" and len(b["masks"]) == 1 and (tmp_path / "b.png").is_file()
    c = cli.run(["--checkpoint", str(ckpt), "--image", str(path), "--everything", "--points-per-side", "4",
                 "--pred-iou-thresh", "0", "--stability-thresh", "0", "--json", str(tmp_path / "c.json")])
    assert c["prompts"] == {"everything": {"points_per_side": 4}}
    for record in json.loads((tmp_path / "c.json").read_text())["masks"]:
        assert _decode(record["segmentation"]).shape == image.shape[:2] and "stability_score" in record
    assert "RANDOMLY" not in capsys.readouterr().err


@pytest.mark.heavy
def test_cli_quickstart_checkpoint_segments_the_prompted_object(tmp_path, monkeypatch):
    """A checkpoint in the quick start's layout and place, fitted to one synthetic image: the CLI
    (no --checkpoint) finds it, and its box-prompted mask covers the known object."""
    from sam_adapter import save_blvit_sam_checkpoint

    image, gt, box = _synthetic(3)
    sam, fitted_iou = _finetune_on_box(image, gt, box)
    assert fitted_iou > 0.8, fitted_iou
    save_blvit_sam_checkpoint(sam, tmp_path / QUICKSTART_CKPT)
    path = _png(image, tmp_path / "synthetic.png")
    box_arg = ",".join(f"{v:g}" for v in box)
    env = {"BLVIT_QUICKSTART_DIR": ""}  # unset: the default runs/quickstart under the current directory
    done = _run_cli(["--image", str(path), "--box", box_arg, "--out", "overlay.png", "--json", "masks.json",
                     "--routing"], cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert "RANDOMLY" not in done.stderr and "encoder" in done.stdout and "decoder" in done.stdout
    report = json.loads((tmp_path / "masks.json").read_text())
    assert report["model"]["source"] == "quick-start student"
    assert Path(report["model"]["checkpoint"]) == QUICKSTART_CKPT
    mask = _decode(report["masks"][0]["segmentation"])
    assert _iou(mask, gt) > 0.5, _iou(mask, gt)
    with Image.open(tmp_path / "overlay.png") as im:
        assert im.size[0] > 2.5 * im.size[1]  # mask panel and two routing panels
    print(f"overlay: {tmp_path / 'overlay.png'}")
    # BLVIT_QUICKSTART_DIR names the quick start's runs folder: found from any directory (in-process, faster)
    from blvit_apps.demo import cli

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("BLVIT_QUICKSTART_DIR", str(tmp_path / "runs" / "quickstart"))
    again = cli.run(["--image", str(path), "--box", box_arg, "--json", "m.json"])
    assert again["model"]["checkpoint"] == str(tmp_path / QUICKSTART_CKPT)
    assert _decode(again["masks"][0]["segmentation"]).tolist() == mask.tolist()


@pytest.mark.heavy
def test_cli_stock_vit_b_official_layout(tmp_path):
    """A randomly initialised stock SAM ViT-B saved like the official files; the CLI tells its type
    from the file (no --model) and runs it at 1024 px."""
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    checkpoint = tmp_path / "sam_vit_b_random.pth"
    torch.save(sam_model_registry["vit_b"]().state_dict(), checkpoint)
    image, _, _ = _synthetic(2)
    path = _png(image, tmp_path / "synthetic.png")
    try:
        done = _run_cli(["--checkpoint", checkpoint.name, "--image", str(path), "--point", "160,120",
                         "--json", "masks.json", "--out", "overlay.png", "--routing"], cwd=tmp_path)
    finally:
        checkpoint.unlink()  # 375 MB
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "masks.json").read_text())
    assert report["model"]["model"] == "vit_b" and report["model"]["img_size"] == 1024
    assert report["model"]["encoder"] == "ImageEncoderViT"
    assert "no token predictors" in done.stderr  # --routing on a stock model: said, not drawn
    assert _decode(report["masks"][0]["segmentation"]).shape == (240, 320)
    assert (tmp_path / "overlay.png").is_file()


# ---------------------------------------------------------------- web server: API


@pytest.fixture(scope="module")
def tiny_model():
    sam = _tiny_sam()
    return sam, {"model": "b+t", "checkpoint": None, "random": True, "warning": "random weights (test)",
                 "encoder": type(sam.image_encoder).__name__, "img_size": 256}


@pytest.fixture()
def client_app(tiny_model):
    from blvit_apps.demo.server import create_app

    app = create_app(*tiny_model, max_upload_mb=1, cache_size=2)
    return app.test_client(), app


def _upload(client, image: np.ndarray, name: str = "x.png"):
    return client.post("/api/image", data={"image": (io.BytesIO(_png_bytes(image)), name)},
                       content_type="multipart/form-data")


def test_server_page_info_and_prompt(client_app):
    client, app = client_app
    page = client.get("/")
    assert page.status_code == 200 and b"app.js" in page.data
    assert client.get("/static/app.js").status_code == 200
    info = client.get("/api/info").get_json()
    assert info["random"] and info["max_upload_mb"] == 1 and info["samples"][:2] == ["shapes", "astronaut"]
    up = client.post("/api/image", data={"sample": "astronaut"}).get_json()
    assert (up["width"], up["height"], up["cached"]) == (512, 512, False) and up["encoder_ms"] > 0
    png = client.get(up["url"])
    assert png.status_code == 200 and png.mimetype == "image/png"
    res = client.post("/api/predict", json={"image_id": up["image_id"], "points": [[100, 200], [300, 30]],
                                            "labels": [1, 0], "box": [50, 50, 400, 400]})
    assert res.status_code == 200, res.get_json()
    body = res.get_json()
    assert body["mask"].startswith("data:image/png;base64,") and body["decoder_ms"] > 0 and body["encoder_ms"] == 0
    assert _decode(body["segmentation"]).shape == (512, 512)
    again = client.post("/api/image", data={"sample": "astronaut"}).get_json()  # cached: not encoded again
    assert again["cached"] and again["encoder_ms"] == 0 and app.extensions["blvit_demo"].encodings == 1


def test_server_bad_input_gives_4xx_and_keeps_serving(client_app):
    client, app = client_app
    image, _, _ = _synthetic(5)
    image_id = _upload(client, image).get_json()["image_id"]

    def check(res, status, text):
        assert res.status_code == status, (res.status_code, res.get_data(as_text=True))
        assert text in res.get_json()["error"], res.get_json()
        assert client.get("/api/info").status_code == 200  # still serving

    check(client.post("/api/image", data={"image": (io.BytesIO(b"GIF89a not really"), "fake.gif")},
                      content_type="multipart/form-data"), 400, "not a readable image")
    check(client.post("/api/image", data={"image": (io.BytesIO(b""), "empty.png")},
                      content_type="multipart/form-data"), 400, "empty")
    big = np.random.default_rng(0).integers(0, 255, (800, 800, 3), dtype=np.uint8)  # ~1.9 MB PNG > 1 MB limit
    check(_upload(client, big, "big.png"), 413, "limit is 1 MB")
    check(client.post("/api/image", data={}), 400, "no image")
    check(client.post("/api/image", data={"sample": "nope"}), 400, "unknown sample")
    predict = lambda **body: client.post("/api/predict", json=dict({"image_id": image_id}, **body))  # noqa: E731
    check(predict(points=[[320, 10]], labels=[1]), 400, "outside the 320x240 image")
    check(predict(points=[[-0.5, 10]]), 400, "outside")
    check(predict(box=[200, 10, 100, 50]), 400, "x0 <= x1")
    check(predict(box=[10, 10, 100, 500]), 400, "outside")
    check(predict(points=[["a", 1]]), 400, "finite numbers")
    check(predict(points=[[1, 1]], labels=[3]), 400, "label")
    check(predict(points=[[1, 1]], labels=[1, 0]), 400, "labels")
    check(predict(), 400, "no prompt")
    check(client.post("/api/predict", json={"image_id": "0" * 24, "points": [[1, 1]]}), 404, "upload the image again")
    check(client.post("/api/predict", data="{not json", content_type="application/json"), 400, "JSON")
    check(client.get("/api/nothing"), 404, "Not Found")
    assert predict(points=[[10, 10]]).status_code == 200


def test_server_lru_cache_is_bounded(client_app):
    client, app = client_app
    ids = [_upload(client, _synthetic(seed)[0]).get_json()["image_id"] for seed in (10, 11, 12)]
    assert len(set(ids)) == 3 and list(app.extensions["blvit_demo"].cache) == ids[1:]
    assert client.post("/api/predict", json={"image_id": ids[0], "points": [[5, 5]]}).status_code == 404
    assert client.post("/api/predict", json={"image_id": ids[2], "points": [[5, 5]]}).status_code == 200


def test_server_concurrent_images_keep_their_own_embeddings(tiny_model):
    """Image A's mask equals what a fresh SamPredictor gives for A, before, during and after image B
    is uploaded and prompted from other threads."""
    from segment_anything import SamPredictor

    from blvit_apps.demo.server import create_app

    sam, info = tiny_model
    app = create_app(sam, info, cache_size=4)
    image_a, image_b = _synthetic(21)[0], _synthetic(22)[0]
    prompt = {"points": [[150.0, 110.0]], "labels": [1]}

    def reference(image):
        predictor = SamPredictor(sam)
        predictor.set_image(image)
        masks, scores, _ = predictor.predict(point_coords=np.array(prompt["points"]),
                                             point_labels=np.array(prompt["labels"]), multimask_output=True)
        return masks[int(np.argmax(scores))], float(scores.max())

    ref_a, ref_b = reference(image_a), reference(image_b)
    assert _iou(ref_a[0], ref_b[0]) < 0.95 or abs(ref_a[1] - ref_b[1]) > 1e-3  # the test can tell them apart

    client = app.test_client()
    id_a = _upload(client, image_a).get_json()["image_id"]
    results = {"a": [], "b": []}
    errors = []

    def worker(name, image, rounds):
        try:
            own = app.test_client()
            image_id = _upload(own, image).get_json()["image_id"]
            for _ in range(rounds):
                res = own.post("/api/predict", json=dict(prompt, image_id=image_id))
                assert res.status_code == 200, res.get_json()
                results[name].append(res.get_json())
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=("a", image_a, 6)),
               threading.Thread(target=worker, args=("b", image_b, 3))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    after = client.post("/api/predict", json=dict(prompt, image_id=id_a)).get_json()
    for name, ref in (("a", ref_a), ("b", ref_b)):
        for body in results[name] + ([after] if name == "a" else []):
            assert _iou(_decode(body["segmentation"]), ref[0]) > 0.99 and abs(body["score"] - ref[1]) < 1e-4, name
    service = app.extensions["blvit_demo"]
    assert service.encodings == 2 and len(service.cache) == 2


# ---------------------------------------------------------------- web page in a headless browser


def _find_chromium():
    """(playwright module, launch kwargs) or a skip reason naming what is missing."""
    import importlib.util

    if importlib.util.find_spec("playwright") is None:
        return None, "Playwright is not installed (pip install playwright; and apt-get install chromium)"
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return {"executable_path": path}, None
    return {}, None  # Playwright's own browser, if `python -m playwright install chromium` fetched it


def test_web_page_in_headless_chromium(tiny_model, tmp_path):
    launch, reason = _find_chromium()
    if launch is None:
        pytest.skip(reason)
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    from blvit_apps.demo.server import create_app, make_server

    app = create_app(*tiny_model, max_upload_mb=1)
    server = make_server(app, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}/"
    not_image = tmp_path / "notes.png"
    not_image.write_text("not a picture")
    try:
        with sync_playwright() as p:
            try:
                browser = p.chromium.launch(headless=True, args=["--no-sandbox"], **launch)
            except PlaywrightError as err:
                pytest.skip("no Chromium for Playwright: none on PATH (apt-get install chromium) and "
                            f"`python -m playwright install chromium` not done or failed ({str(err).splitlines()[0]})")
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(url)
            page.wait_for_selector("#stage[data-state=ready]", timeout=60_000)  # bundled image encoded
            assert "ms" in page.inner_text("#encoder-ms")
            assert page.is_visible("#warning")  # random weights are said on the page
            box = page.locator("#image").bounding_box()
            assert box and box["width"] > 100
            page.mouse.click(box["x"] + box["width"] * 0.45, box["y"] + box["height"] * 0.3)
            page.wait_for_selector("#mask[src^='data:image/png']", state="visible", timeout=60_000)
            # the mask is the image's size (the bundled default image: a held-out synthetic one)
            page.wait_for_function("document.getElementById('mask').naturalWidth === state.width && state.width > 0",
                                   timeout=30_000)
            assert page.inner_text("#decoder-ms").endswith("ms")
            assert page.inner_text("#prompt-count") == "1" and page.locator("circle.positive").count() == 1
            box = page.locator("#image").bounding_box()  # where it is now, should the layout have moved
            page.keyboard.down("Shift")  # shift+click: a negative point
            page.mouse.click(box["x"] + 20, box["y"] + 20)
            page.keyboard.up("Shift")
            page.wait_for_function("document.querySelectorAll('circle.negative').length === 1")
            page.mouse.click(box["x"] + box["width"] - 20, box["y"] + 20, button="right")  # right click: negative
            page.wait_for_function("document.querySelectorAll('circle.negative').length === 2")
            page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.2)  # drag: a box
            page.mouse.down()
            page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.5, steps=5)
            page.mouse.up()
            page.wait_for_function("document.querySelectorAll('#prompts rect').length === 1")
            assert page.inner_text("#prompt-count") == "4"
            page.wait_for_selector("#stage[data-state=ready]")
            assert not page.is_visible("#error")
            shot = tmp_path / "demo_page.png"
            page.screenshot(path=str(shot), full_page=True)
            print(f"screenshot: {shot}")
            assert shot.stat().st_size > 10_000
            page.set_input_files("#file", str(not_image))  # a bad upload: a message on the page
            page.wait_for_selector("#error:not([hidden])", timeout=30_000)
            assert "not a readable image" in page.inner_text("#error")
            page.screenshot(path=str(tmp_path / "demo_page_error.png"))
            browser.close()
    finally:
        server.shutdown()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def web_runtime_folder():
    """onnxruntime-web for the page (fetched with npm once per machine, kept in the user cache)."""
    from blvit_apps.demo import web_runtime

    if not web_runtime.is_installed():
        if shutil.which("npm") is None:
            pytest.skip("onnxruntime-web is not installed and npm is not on PATH (blvit-demo --install-web-runtime)")
        try:
            web_runtime.install()
        except web_runtime.WebRuntimeError as err:
            pytest.skip(f"onnxruntime-web could not be installed: {err}")
    return web_runtime.runtime_dir()


def _page_mask(data_url: str) -> np.ndarray:
    import base64

    png = base64.b64decode(data_url.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGBA"))[..., 3] > 0


def test_browser_decoder_in_headless_chromium(tiny_model, web_runtime_folder, tmp_path):
    """The page runs SAM's ONNX decoder itself (onnxruntime-web, WebAssembly) on the embedding it
    fetched once: clicks and a box send no request to the server, and the masks equal the
    server's for the same prompts."""
    launch, reason = _find_chromium()
    if launch is None:
        pytest.skip(reason)
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    from blvit_apps.demo.server import SERVICE_KEY, create_app, make_server

    app = create_app(*tiny_model, max_upload_mb=1)
    service = app.extensions[SERVICE_KEY]
    server = make_server(app, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}/"
    requests = []
    try:
        with sync_playwright() as p:
            try:
                browser = p.chromium.launch(headless=True, args=["--no-sandbox"], **launch)
            except PlaywrightError as err:
                pytest.skip(f"no Chromium for Playwright ({str(err).splitlines()[0]})")
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            messages = []
            page.on("console", lambda m: messages.append(m.text))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(url)
            page.wait_for_selector("#stage[data-state=ready]", timeout=60_000)
            assert page.is_enabled("#browser-decoder")
            page.check("#browser-decoder")
            page.wait_for_selector("#stage[data-browser-decoder=ready]", timeout=120_000)
            before, asked = service.predictions, len(requests)
            image_id = page.evaluate("() => state.imageId")
            box = page.locator("#image").bounding_box()
            page.mouse.click(box["x"] + box["width"] * 0.45, box["y"] + box["height"] * 0.3)
            page.wait_for_selector("#stage[data-decoded-in=browser]", timeout=60_000)
            page.wait_for_selector("#stage[data-state=ready]")
            assert page.inner_text("#decoder-where") == "(in this browser)"
            one_click = page.evaluate("() => ({points: state.points, labels: state.labels, mask: $('mask').src})")
            page.mouse.move(box["x"] + box["width"] * 0.2, box["y"] + box["height"] * 0.2)  # then a box
            page.mouse.down()
            page.mouse.move(box["x"] + box["width"] * 0.7, box["y"] + box["height"] * 0.6, steps=5)
            page.mouse.up()
            page.wait_for_function("() => state.box !== null && document.getElementById('stage').dataset.state === 'ready'")
            page.wait_for_function("(old) => document.getElementById('mask').src !== old", arg=one_click["mask"])
            with_box = page.evaluate("() => ({points: state.points, labels: state.labels, box: state.box, mask: $('mask').src})")
            assert not page.is_visible("#error"), page.inner_text("#error")
            page.screenshot(path=str(tmp_path / "browser_decoder.png"), full_page=True)
            browser.close()
        assert service.predictions == before  # no prompt went to the server...
        assert not [u for u in requests[asked:] if "/api/" in u], requests[asked:]  # ...nor any request at all
        for prompts in (one_click, with_box):
            expected = service.predict(image_id, prompts["points"], prompts["labels"], prompts.get("box"))
            ours, theirs = _page_mask(prompts["mask"]), _decode(expected["segmentation"])
            assert ours.shape == theirs.shape and theirs.any()
            print(f"browser vs server mask IoU: {_iou(ours, theirs):.4f} ({int(theirs.sum())} pixels)")
            assert _iou(ours, theirs) > 0.99
    finally:
        server.shutdown()
        thread.join(timeout=10)


def test_overlay_blends_masks_into_one_image_in_order():
    """save_overlay paints all masks into one copy of the image (one H x W x 3 layer, not a float64
    H x W x 4 layer per mask, which took 3.8 GB for 8 masks on a 12-MP photo), as stacked alpha
    layers would composite: later masks over earlier ones."""
    from blvit_deploy.viz import MASK_ALPHA, blend_masks

    image = np.full((4, 4, 3), 100, np.uint8)
    first, second = np.zeros((4, 4), bool), np.zeros((4, 4), bool)
    first[:2] = True
    second[1:3] = True
    colours = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    out = blend_masks(image, [first, second], colours)
    a = MASK_ALPHA
    only_first = np.round(100 * (1 - a) + 255 * a * colours[0])
    both = np.round((100 * (1 - a) + 255 * a * colours[0]) * (1 - a) + 255 * a * colours[1])
    assert out.dtype == np.uint8 and out.shape == (4, 4, 3)
    assert np.array_equal(out[0, 0], only_first) and np.array_equal(out[1, 0], both)
    assert np.array_equal(out[3, 0], [100, 100, 100])


def test_image_reading_needs_no_onnxruntime():
    """ONNX Runtime is an optional extra: the evaluation and the demo read images through
    blvit_deploy.images, which must import without it (the package used to import its ONNX
    predictor, and with it onnxruntime, on any import)."""
    script = ("import sys; sys.modules['onnxruntime'] = None\n"
              "import blvit_deploy.images, eval.sam_eval, blvit_apps.demo.core\n"
              "from blvit_deploy import read_image, resize_longest_side\n"
              "assert resize_longest_side(1, 600, 256) == (0, 256)\n"
              "try:\n    from blvit_deploy import OnnxSamPredictor\nexcept ImportError:\n    print('lazy')\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0 and result.stdout.strip() == "lazy", result.stderr[-2000:]
