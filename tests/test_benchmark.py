"""blvit-bench runs on CPU (small shapes) and writes its JSON, table and plot."""
import json

from blvit_apps.sam_benchmark import build_encoders, main


def test_bench_cpu_tiny(tmp_path):
    main(["--img-size", "128", "--encoders", "vit_b", "dense_vit_b", "b+t@0.25", "--batches", "1", "2",
          "--repeats", "1", "--warmup", "0", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "bench.json").read_text())
    rows = [r for r in report["rows"] if "images_per_s" in r]
    assert {(r["encoder"], r["batch"]) for r in rows} == {(e, b) for e in ("vit_b", "dense_vit_b", "b+t@0.25") for b in (1, 2)}
    assert all(r["images_per_s"] > 0 and r["gmacs_per_image"] > 0 for r in rows)
    assert {r["encoder"] for r in report["rows"] if "predictor_point_ms" in r} == {"vit_b", "dense_vit_b", "b+t@0.25"}
    assert (tmp_path / "bench.png").exists() and "| dense_vit_b | 2 |" in (tmp_path / "bench.md").read_text()


def test_bench_encoders_share_the_stock_weights():
    import torch

    enc = build_encoders(["vit_b", "dense_vit_b"], 128)
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(enc["dense_vit_b"](x), enc["vit_b"](x), rtol=1e-4, atol=1e-4)


def test_bench_attention_backends(tmp_path):
    import pytest

    from blvit_apps.sam_benchmark import expand_backends

    assert expand_backends(["vit_b", "dense_vit_b", "b+t@0.25/flex"], ["sdpa", "folded"]) == \
        ["vit_b", "dense_vit_b", "dense_vit_b/folded", "b+t@0.25/flex"]
    main(["--img-size", "128", "--encoders", "dense_vit_b", "b+t@0.25", "--attn-backends", "sdpa", "folded", "flex",
          "--batches", "1", "--repeats", "1", "--warmup", "0", "--no-predictor", "--out", str(tmp_path)])
    rows = {r["encoder"]: r for r in json.loads((tmp_path / "bench.json").read_text())["rows"]}
    assert set(rows) == {f"{e}{b}" for e in ("dense_vit_b", "b+t@0.25") for b in ("", "/folded", "/flex")}
    # flex is counted as the SDPA math; folded does more MACs (its q and k are d + 2w wider)
    assert rows["dense_vit_b/flex"]["gmacs_per_image"] == rows["dense_vit_b"]["gmacs_per_image"]
    assert rows["dense_vit_b/folded"]["gmacs_per_image"] > rows["dense_vit_b"]["gmacs_per_image"]
    with pytest.raises(ValueError, match="stock segment_anything encoders have one attention implementation"):
        build_encoders(["vit_b/folded"], 128)
    with pytest.raises(ValueError, match="unknown encoder 'vit_q'"):
        build_encoders(["vit_q"], 128)


def test_bench_onnxruntime_backend_with_op_profile(tmp_path):
    import pytest

    pytest.importorskip("onnxruntime")
    main(["--img-size", "64", "--encoders", "b+t@0.25", "--backend", "torch", "onnxruntime", "--ort-profile",
          "--fp32", "--batches", "1", "--repeats", "1", "--warmup", "0", "--no-predictor", "--out", str(tmp_path)])
    rows = {r["encoder"]: r for r in json.loads((tmp_path / "bench.json").read_text())["rows"]}
    assert set(rows) == {"b+t@0.25", "b+t@0.25 (onnxruntime)"}
    ops = rows["b+t@0.25 (onnxruntime)"]["ort_op_seconds"]
    # the routed graph: top-k selection, row gathers and the row scatter-add of the P-block results
    assert {"TopK", "Gather", "ScatterND"} <= set(ops) and "ScatterElements" not in ops
    assert all(t >= 0 for t in ops.values()) and sum(ops.values()) > 0


def test_predictor_latency_under_bf16_autocast():
    """The GPU default (bf16 autocast, predictor column on), run with CPU autocast: the predictor's
    bf16 outputs must not reach numpy (which has no bf16)."""
    import torch

    from blvit_apps.sam_benchmark import predictor_latency

    encoder = build_encoders(["b+t@0.25"], 64)["b+t@0.25"]
    seconds = predictor_latency(encoder, 64, torch.device("cpu"), amp=True, repeats=1, warmup=0)
    assert seconds > 0


def test_flops_table_gives_both_ratios():
    """blvit-flops' ratio column was labelled "vs dense" but divided by stock SAM."""
    from blvit_apps.flops_cli import flops_rows, markdown_table

    rows = {r["encoder"].split(" (")[0]: r for r in flops_rows(("b+t",), 0.25, 256)}
    stock, dense, bt = rows["SAM vit_b"], rows["dense vit_b"], rows["bLViT-SAM b+t keep 0.25"]
    import pytest

    assert bt["ratio"] == pytest.approx(bt["gmacs"] / stock["gmacs"])
    assert bt["ratio_dense"] == pytest.approx(bt["gmacs"] / dense["gmacs"])
    assert bt["ratio_dense"] > bt["ratio"]  # the toolkit's dense encoder skips projecting window padding
    assert "| vs stock SAM | vs dense (blvit) |" in markdown_table(list(rows.values()))
