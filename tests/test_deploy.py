"""blvit-export (ONNX + onnxruntime check) and the PyTorch-free OnnxSamPredictor (blvit_deploy)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from blvit.data.make_synthetic import HELDOUT_SEED
from blvit.data.synthetic import render_image, split_image_id
from sam_adapter import build_sam_blvit, save_blvit_sam_checkpoint

from conftest import TINY, TINY_BT, randomize_

pytest.importorskip("onnxruntime")
ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = {
    "vit_b": TINY,
    "b+t": TINY_BT,
    # h+b's layout logic (dense prefix, E-blocks on every second big.LITTLE layer) at tiny size
    "h+b": dict(TINY, depth=6, global_attn_indexes=(2, 5), e_embed_dim=32, e_num_heads=2, blvit_layers=(2, 3, 4, 5),
                e_block_layers=(2, 4), predictor_layers=(2, 4)),
}


def _checkpoint(tmp_path, variant):
    torch.manual_seed(0)
    sam = build_sam_blvit(variant, keep_ratio=1.0 if variant == "vit_b" else 0.25, **LAYOUTS[variant], out_chans=64)
    randomize_(sam, std=0.05)
    path = tmp_path / f"{variant}.pth"
    save_blvit_sam_checkpoint(sam, path)
    return path


@pytest.fixture(scope="module")
def exported_bt(tmp_path_factory):
    from blvit_apps.export import export

    tmp = tmp_path_factory.mktemp("export_bt")
    path = _checkpoint(tmp, "b+t")
    meta = export("b+t", str(path), tmp / "onnx", quantize=True, fp16=True)
    return path, tmp / "onnx", meta


@pytest.mark.parametrize("variant", ["vit_b", "h+b"])
def test_export_and_onnxruntime_check_pass(tmp_path, variant):
    from blvit_apps.export import export

    model = "dense_vit_b" if variant == "vit_b" else variant
    meta = export(model, str(_checkpoint(tmp_path, variant)), tmp_path / "onnx")
    check = meta["check"]
    assert check["encoder"]["passed"] and check["decoder"]["passed"], check
    assert check["encoder"]["routed_layers"] == (0 if variant == "vit_b" else 2)
    assert json.loads((tmp_path / "onnx/export.json").read_text())["opset"] == 17


def test_bt_export_checks_routing_and_int8(exported_bt):
    _, out, meta = exported_bt
    enc = meta["check"]["encoder"]
    assert enc["routed_indices_equal"] and enc["routed_layers"] == 2 and enc["max_abs_error"] < 1e-3
    assert meta["encoder"]["outputs"] == ["image_embeddings", "routed_1", "routed_3"]
    for key in ("encoder_int8", "encoder_fp16"):
        q = meta[key]
        assert q["passed"] and q["bytes"] < q["fp32_bytes"] and q["cosine_to_fp32"] >= 0.99, key
    assert meta["encoder_fp16"]["cosine_to_fp32"] > 0.9999  # float16 arithmetic: far closer than int8
    for name in ("encoder.onnx", "decoder.onnx", "decoder_single.onnx", "encoder.int8.onnx", "encoder.fp16.onnx"):
        assert (out / name).is_file()
    # the fp16 file keeps float32 inputs and outputs: the same predictor runs it
    import onnx

    graph = onnx.load(str(out / "encoder.fp16.onnx")).graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in graph.initializer)


def test_export_fails_loudly_above_the_tolerance(exported_bt, tmp_path):
    path, _, _ = exported_bt
    result = subprocess.run([sys.executable, "-m", "blvit_apps.export", "--model", "b+t", "--checkpoint", str(path),
                             "--out", str(tmp_path / "strict"), "--tolerance", "0"],
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 3, result.stderr[-2000:]
    assert "check FAILED" in result.stderr


def test_onnx_predictor_needs_no_torch_and_agrees_with_sam_predictor(exported_bt, tmp_path):
    """blvit_deploy in a process where importing torch fails: masks for a box and for clicks, next
    to segment-anything's SamPredictor on the same checkpoint. The image already has the input's
    long side (256), so no resize happens on either side (OpenCV here, PIL in SamPredictor) and the
    masks must agree but for float rounding (random weights make masks that flip on any change)."""
    path, out, _ = exported_bt
    image = render_image(split_image_id(HELDOUT_SEED, 1), height=192, width=256)[0]
    np.save(tmp_path / "image.npy", image)
    script = f"""
import sys, json
sys.modules['torch'] = None; sys.modules['segment_anything'] = None
import numpy as np
from blvit_deploy import OnnxSamPredictor
p = OnnxSamPredictor({str(out)!r})
p.set_image(np.load({str(tmp_path / 'image.npy')!r}))
box = p.predict(box=np.array([60, 20, 200, 110]), multimask_output=False)
clicks = p.predict(point_coords=np.array([[150, 60], [40, 200]]), point_labels=np.array([1, 0]))
np.save({str(tmp_path / 'box.npy')!r}, box[0]); np.save({str(tmp_path / 'clicks.npy')!r}, clicks[0])
print(json.dumps({{'box_shape': list(box[0].shape), 'clicks_shape': list(clicks[0].shape), 'torch': 'torch' in sys.modules and sys.modules['torch'] is not None}}))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"box_shape": [1, 192, 256], "clicks_shape": [3, 192, 256], "torch": False}

    from segment_anything import SamPredictor
    from sam_adapter.build import build_sam_from_checkpoint

    predictor = SamPredictor(build_sam_from_checkpoint(path))
    predictor.set_image(image)
    ref_box = predictor.predict(box=np.array([60, 20, 200, 110]), multimask_output=False)[0]
    ref_clicks = predictor.predict(point_coords=np.array([[150, 60], [40, 200]]), point_labels=np.array([1, 0]))[0]
    for got, ref in ((np.load(tmp_path / "box.npy"), ref_box), (np.load(tmp_path / "clicks.npy"), ref_clicks)):
        for g, r in zip(got, ref):
            union = (g | r).sum()
            iou = (g & r).sum() / union if union else 1.0
            assert iou > 0.99, iou


def test_demo_onnx_backend_gives_the_torch_backends_mask(exported_bt, tmp_path):
    """blvit-demo --backend onnx on the exported files and the default backend on the checkpoint:
    the same mask and score for a box on a 256-px-wide image (no resize difference)."""
    from PIL import Image

    from blvit_apps.demo.cli import run

    path, out, _ = exported_bt
    image = render_image(split_image_id(HELDOUT_SEED, 1), height=192, width=256)[0]
    Image.fromarray(image).save(tmp_path / "shapes.png")
    common = ["--image", str(tmp_path / "shapes.png"), "--box", "60,20,200,110"]
    onnx = run(common + ["--backend", "onnx", "--onnx-dir", str(out), "--json", str(tmp_path / "onnx.json")])
    torch_ = run(common + ["--checkpoint", str(path), "--json", str(tmp_path / "torch.json")])
    assert onnx["masks"][0]["segmentation"] == torch_["masks"][0]["segmentation"]
    assert abs(onnx["masks"][0]["score"] - torch_["masks"][0]["score"]) < 1e-3
    from blvit_apps.demo.core import DemoInputError

    with pytest.raises(DemoInputError, match="--onnx-dir"):
        run(common + ["--backend", "onnx"])
    with pytest.raises(DemoInputError, match="drop --everything"):
        run(["--backend", "onnx", "--onnx-dir", str(out), "--everything", "--image", str(tmp_path / "shapes.png")])


@pytest.mark.parametrize("image", ["bundled sample", "file"])
def test_demo_onnx_backend_process_imports_no_torch(exported_bt, tmp_path, image):
    """The whole blvit-demo --backend onnx run (image reading, prediction, overlay PNG, JSON) in a
    process where importing torch or segment-anything fails."""
    _, out, _ = exported_bt
    args = ["--backend", "onnx", "--onnx-dir", str(out), "--point", "120,80", "--out", str(tmp_path / "o.png"),
            "--json", str(tmp_path / "o.json")]
    if image == "file":
        render = render_image(split_image_id(HELDOUT_SEED, 1), height=192, width=256)[0]
        from PIL import Image

        Image.fromarray(render).save(tmp_path / "shapes.png")
        args += ["--image", str(tmp_path / "shapes.png")]
    code = ("import sys\n"
            "for name in ('torch', 'segment_anything', 'torchvision'): sys.modules[name] = None\n"
            "from blvit_apps.demo.cli import main\n"
            f"main({args!r})\n"
            "print('loaded:', sorted(m for m in ('blvit', 'sam_adapter', 'eval') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "loaded: []" in done.stdout
    assert (tmp_path / "o.png").stat().st_size > 1000 and json.loads((tmp_path / "o.json").read_text())["masks"]


def test_bundled_shapes_sample_is_the_generators_heldout_file():
    from blvit.data.synthetic import _jpeg
    from blvit_apps.demo.core import SHAPES_FILE, sample_image

    assert SHAPES_FILE.read_bytes() == _jpeg(render_image(split_image_id(HELDOUT_SEED, 1))[0])
    assert sample_image("shapes").shape == (240, 320, 3)


def test_onnx_predictor_bad_inputs_get_one_clear_error(exported_bt, tmp_path):
    import shutil

    from blvit_apps.export import export
    from blvit_deploy import OnnxSamPredictor

    _, out, _ = exported_bt
    broken = tmp_path / "missing"
    shutil.copytree(out, broken)
    (broken / "decoder.onnx").unlink()
    with pytest.raises(FileNotFoundError, match="decoder.onnx: missing"):
        OnnxSamPredictor(broken)
    with pytest.raises(FileNotFoundError, match="no export.json"):
        OnnxSamPredictor(tmp_path)
    # an encoder of another size beside this decoder
    torch.manual_seed(0)
    small = build_sam_blvit("vit_b", keep_ratio=1.0, **dict(TINY, img_size=128), out_chans=64)
    save_blvit_sam_checkpoint(small, tmp_path / "small.pth")
    export("dense_vit_b", str(tmp_path / "small.pth"), tmp_path / "small", check=False)
    mixed = tmp_path / "mixed"
    shutil.copytree(out, mixed)
    shutil.copy(tmp_path / "small/encoder.onnx", mixed / "encoder.onnx")
    with pytest.raises(ValueError, match="from another export"):
        OnnxSamPredictor(mixed)
    predictor = OnnxSamPredictor(out)
    with pytest.raises(ValueError, match="uint8 RGB"):
        predictor.set_image(np.zeros((50, 60, 3), np.float32))
    with pytest.raises(RuntimeError, match="set_image first"):
        predictor.predict(box=np.array([1, 2, 3, 4]))


def test_routed_add_exports_as_row_scatter_add_exact_with_repeated_indices(tmp_path):
    """add_to_tokens under ONNX export is one ScatterND(reduction="add") that adds every update,
    also when padding picks repeat token 0 (an overwriting scatter would drop some)."""
    import onnx
    import onnxruntime as ort

    from blvit.routing import TokenSelection, add_to_tokens

    class AddBack(torch.nn.Module):
        def forward(self, x, index, update):
            b, k = index.shape
            gather = (index + torch.arange(b)[:, None] * x.shape[1]).reshape(-1)
            selection = TokenSelection(index, gather, update[..., 0], update[..., 0], None, None, 0)
            return add_to_tokens(x * 1.0, selection, update, inplace=True)

    torch.manual_seed(0)
    x, update = torch.randn(2, 10, 8), torch.randn(2, 6, 8)
    index = torch.tensor([[0, 3, 0, 0, 9, 5], [1, 1, 2, 0, 0, 7]])  # repeats, as padding picks make
    path = tmp_path / "add_back.onnx"
    torch.onnx.export(AddBack(), (x, index, update), str(path), input_names=["x", "index", "update"],
                      opset_version=17, dynamo=False)
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    assert "ScatterND" in ops and "ScatterElements" not in ops
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"x": x.numpy(), "index": index.numpy(), "update": update.numpy()})[0]
    expected = x.clone()
    for b in range(2):
        for j, i in enumerate(index[b].tolist()):
            expected[b, i] += update[b, j]
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-6)


@pytest.mark.parametrize("height, width", [(100, 256), (256, 100), (256, 256)])
def test_onnx_masks_land_where_sam_predictor_puts_them_at_any_aspect_ratio(exported_bt, height, width):
    """The exported decoder crops the padding by the image's own size: segment-anything 1.0's
    SamOnnxModel froze the crop at the tracing example's 4:3 one, and on every other aspect ratio
    the masks missed their prompts (IoU 0.05-0.11 with SamPredictor's). Long side 256: no resize,
    so the two predictors see the same pixels."""
    from blvit_deploy import OnnxSamPredictor
    from segment_anything import SamPredictor
    from sam_adapter.build import build_sam_from_checkpoint

    path, out, _ = exported_bt
    image = (np.random.default_rng(0).random((height, width, 3)) * 255).astype(np.uint8)
    onnx, stock = OnnxSamPredictor(str(out)), SamPredictor(build_sam_from_checkpoint(path))
    onnx.set_image(image)
    stock.set_image(image)
    box = np.array([0.2 * width, 0.2 * height, 0.7 * width, 0.8 * height])
    got = onnx.predict(box=box, multimask_output=False)[0][0]
    ref = stock.predict(box=box, multimask_output=False)[0][0]
    assert got.shape == ref.shape == (height, width)
    assert (got & ref).sum() / max(1, (got | ref).sum()) > 0.99
