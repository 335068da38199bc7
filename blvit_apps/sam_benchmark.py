"""``blvit-bench``: SAM image encoders side by side, in one process, on the same input.

Stock ``segment_anything`` encoders, this toolkit's dense encoders with the same weights, and
bLViT-SAM at chosen keep ratios: images/s at each batch size, median latency, peak memory,
measured FLOPs and the fraction of the GPU's bf16 peak; plus the batch-1 latency of
``SamPredictor.set_image`` followed by one point prompt. Median of repeated runs after warm-up,
timed with CUDA events on a GPU (``perf_counter`` on a CPU). Writes JSON, a Markdown table and
a speed-versus-FLOPs PNG.

    blvit-bench                                  # GPU: 1024 px, vit_b / vit_h families, batch 1 and 8
    blvit-bench --img-size 256 --batches 1 --encoders vit_b dense_vit_b b+t@0.25   # a quick CPU look
    blvit-bench --attn-backends sdpa folded flex --compile   # each toolkit encoder with each backend
"""
import argparse
import json
import statistics
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from blvit.flops import module_macs_on_meta
from blvit.layers import ATTENTION_BACKENDS, set_attention_backend
from blvit.utils.io import atomic_write_text, load_checked

from sam_adapter.build import build_sam_from_config, sam_from_encoder, stock_encoder
from sam_adapter.checkpoint import _is_new_parameter
from sam_adapter.config import DENSE_SOURCE, VARIANTS, make_config

DEFAULT_ENCODERS = ("vit_b", "dense_vit_b", "b+t@0.25", "b+t@0.5", "vit_h", "dense_vit_h", "h+b@0.25", "h+b@0.5")
# dense bf16 tensor-core peak, TFLOP/s (spec sheets; SXM parts)
# Timed runs further apart than this (slowest / fastest) mean the machine was doing something else.
BUSY_SPREAD = 1.5
BF16_PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def encoder_options(layout: str, value: str) -> Dict[str, Any]:
    """Config overrides of NAME@VALUE: the keep ratio (b+t, h+b, EViT, Evo-ViT) or ToMe's merge_r;
    without a value, a token-reduction baseline keeps its default and b+t / h+b run at keep 1."""
    reduction = VARIANTS[layout].get("reduction", "")
    if reduction == "tome":
        return {"merge_r": int(value)} if value else {}
    if reduction:
        return {"keep_ratio": float(value)} if value else {}
    return {"keep_ratio": float(value) if value else 1.0}


def build_encoders(names: Sequence[str], img_size: int, seed: int = 0) -> Dict[str, nn.Module]:
    """Every encoder of a family shares the stock encoder's (random) weights."""
    encoders: Dict[str, nn.Module] = {}
    stock: Dict[str, Dict[str, torch.Tensor]] = {}
    for name in names:
        base, _, backend = name.partition("/")
        variant, _, keep = base.partition("@")
        if variant.replace("dense_", "") not in DENSE_SOURCE:
            raise ValueError(f"unknown encoder {name!r}; use vit_b|vit_l|vit_h, dense_vit_*, b+t@KEEP, h+b@KEEP, "
                             "evit-b|evit-h|evovit-b|evovit-h[@KEEP], tome-b|tome-h[@R], "
                             f"optionally /BACKEND for this toolkit's encoders ({', '.join(ATTENTION_BACKENDS)})")
        family = DENSE_SOURCE[variant.replace("dense_", "")]
        if backend and variant == family:
            raise ValueError(f"{name!r}: stock segment_anything encoders have one attention implementation; "
                             f"attention backends apply to dense_{family}, b+t and h+b")
        if family not in stock:
            torch.manual_seed(seed)
            enc = stock_encoder(family, img_size)
            for module in enc.modules():  # random rel-pos tables, so that they count
                for pname in ("rel_pos_h", "rel_pos_w"):
                    if hasattr(module, pname):
                        nn.init.normal_(getattr(module, pname), std=0.02)
            stock[family] = enc.state_dict()
            if variant == family:
                encoders[name] = enc
                continue
        if variant == family:
            enc = stock_encoder(family, img_size)
            enc.load_state_dict(stock[family])
        else:
            layout = family if variant.startswith("dense_") else variant
            cfg = make_config(layout, img_size=img_size, **encoder_options(layout, keep))
            enc = build_sam_from_config(cfg).image_encoder
            load_checked(enc, stock[family], f"<random {family}>", "image encoder", _is_new_parameter)
            set_attention_backend(enc, backend or "sdpa")
        encoders[name] = enc
    return encoders


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device: torch.device, repeats: int, warmup: int) -> List[float]:
    """Seconds per call, each timed on its own (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def bf16_peak(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)


def predictor_latency(encoder: nn.Module, img_size: int, device: torch.device, amp: bool, repeats: int, warmup: int) -> float:
    """Median seconds of ``SamPredictor.set_image`` + one point prompt on a random photo-sized image."""
    from segment_anything import SamPredictor

    sam = sam_from_encoder(encoder).to(device).eval()
    predictor = SamPredictor(sam)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (img_size * 3 // 4, img_size, 3), dtype=np.uint8)
    point = predictor.transform.apply_coords_torch(
        torch.tensor([[[img_size / 2, img_size * 3 / 8]]], device=device), image.shape[:2])
    label = torch.ones(1, 1, dtype=torch.int, device=device)

    def once():
        # predict_torch, not predict: predict converts its bf16 outputs to numpy, which has no bf16
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=amp):
            predictor.set_image(image)
            masks, iou, low = predictor.predict_torch(point, label, multimask_output=True)
        # what predict hands back: the results on the host, as numbers numpy can hold
        masks.cpu(), iou.float().cpu(), low.float().cpu()

    return statistics.median(time_call(once, device, repeats, warmup))


def expand_backends(names: Sequence[str], backends: Sequence[str]) -> List[str]:
    """Each toolkit encoder named without a backend once per backend (``dense_vit_h/folded``);
    stock encoders and names that carry a backend as they are."""
    out: List[str] = []
    for name in names:
        variant = name.partition("@")[0]
        if "/" in name or variant in DENSE_SOURCE.values():
            out.append(name)
        else:
            out += [name if b == "sdpa" else f"{name}/{b}" for b in backends]
    return out


def export_for_onnxruntime(enc: nn.Module, x: torch.Tensor, folder: Path) -> Path:
    """``enc`` exported (TorchScript tracing, opset 17, the input's static shape) to ``folder``."""
    path = folder / "encoder.onnx"
    with torch.no_grad():
        torch.onnx.export(enc, (x,), str(path), input_names=["image"], output_names=["image_embeddings"],
                          opset_version=17, dynamo=False)
    return path


def onnxruntime_session(path: Path, profile_prefix: Optional[str] = None):
    """An ONNX Runtime CPU session with as many threads as torch uses (optionally profiling)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnxruntime_op_profile(path: Path, x: torch.Tensor, warmup: int, folder: Path) -> Dict[str, float]:
    """Seconds of kernel time per ONNX op type in one run after ``warmup`` runs (ORT's profiler):
    where an exported graph spends its time, e.g. what the routing's gathers and scatters cost."""
    session = onnxruntime_session(path, str(folder / "ort_profile"))
    feed = {"image": x.cpu().numpy()}
    for _ in range(max(1, warmup)):
        session.run(None, feed)
    session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    last_run = max((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    per_op: Dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= last_run["ts"]:
            op = e["args"]["op_name"]
            per_op[op] = per_op.get(op, 0.0) + e["dur"] / 1e6
    return dict(sorted(per_op.items(), key=lambda kv: -kv[1]))


def run_benchmark(names: Sequence[str], img_size: int, batches: Sequence[int], repeats: int, warmup: int,
                  device: torch.device, amp: bool, compile_: bool = False, with_predictor: bool = True,
                  runtimes: Sequence[str] = ("torch",), ort_profile: bool = False) -> List[Dict[str, Any]]:
    """``runtimes``: "torch" (PyTorch eager, or compiled) and / or "onnxruntime" (each encoder
    exported to ONNX and run by ONNX Runtime on the CPU), side by side on the same weights;
    ``ort_profile``: add each ONNX Runtime row's kernel seconds per op type (one extra run)."""
    import tempfile

    rows = []
    encoders = build_encoders(names, img_size)
    peak = bf16_peak(device)
    if "onnxruntime" in runtimes and (device.type != "cpu" or amp):
        raise ValueError("--backend onnxruntime runs on the CPU in float32: use it on a CPU machine or with --fp32")
    for position, (name, enc) in enumerate(encoders.items(), 1):
        if "onnxruntime" in runtimes:
            for batch in batches:
                x = torch.randn(batch, 3, img_size, img_size)
                with tempfile.TemporaryDirectory() as tmp:
                    path = export_for_onnxruntime(enc.eval(), x, Path(tmp))
                    session, feed = onnxruntime_session(path), {"image": x.numpy()}
                    times = time_call(lambda: session.run(None, feed), device, repeats, warmup)
                    del session
                    op_seconds = onnxruntime_op_profile(path, x, warmup, Path(tmp)) if ort_profile else None
                median = statistics.median(times)
                rows.append({"encoder": f"{name} (onnxruntime)", "runtime": "onnxruntime", "batch": batch,
                             "img_size": img_size, "median_ms": 1e3 * median, "min_ms": 1e3 * min(times),
                             "max_ms": 1e3 * max(times), "images_per_s": batch / median,
                             "gmacs_per_image": module_macs_on_meta(enc, (1, 3, img_size, img_size)) / 1e9,
                             "peak_memory_gib": None, "bf16_peak_fraction": None, "ort_op_seconds": op_seconds})
                print(f"  {name} onnxruntime batch {batch}: {1e3 * median:.1f} ms", flush=True)
                if op_seconds:
                    total = sum(op_seconds.values())
                    print("    ORT kernel time by op: " + ", ".join(
                        f"{op} {100 * t / total:.1f}%" for op, t in list(op_seconds.items())[:8]), flush=True)
            if "torch" not in runtimes:
                continue
        # a line per encoder: at 1024 px on a CPU each one takes minutes
        print(f"[{position}/{len(encoders)}] {name}: batches {list(batches)}, {warmup} warm-up + {repeats} timed runs each",
              flush=True)
        enc = enc.to(device).eval()
        macs = module_macs_on_meta(enc, (1, 3, img_size, img_size))
        run_enc = torch.compile(enc, dynamic=False) if compile_ else enc  # static shapes by design
        for batch in batches:
            x = torch.randn(batch, 3, img_size, img_size, device=device)

            def step():
                with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=amp):
                    run_enc(x)

            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times = time_call(step, device, repeats, warmup)
            median = statistics.median(times)
            if len(times) > 2 and max(times) > BUSY_SPREAD * min(times):
                warnings.warn(f"{name} batch {batch}: timed runs from {1e3 * min(times):.1f} to {1e3 * max(times):.1f} ms "
                              f"(more than {BUSY_SPREAD}x apart): the machine was busy, the medians may not compare")
            row = {"encoder": name, "runtime": "torch", "batch": batch, "img_size": img_size, "median_ms": 1e3 * median,
                   "min_ms": 1e3 * min(times), "max_ms": 1e3 * max(times),
                   "images_per_s": batch / median, "gmacs_per_image": macs / 1e9,
                   "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
                   "bf16_peak_fraction": (2 * macs * batch / median / 1e12) / peak if peak and amp else None}
            rows.append(row)
        if with_predictor:
            rows.append({"encoder": name, "batch": 1, "img_size": img_size, "predictor_point_ms":
                         1e3 * predictor_latency(enc, img_size, device, amp, max(1, repeats // 2), warmup)})
        enc.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def markdown(rows: Sequence[Dict[str, Any]]) -> str:
    lines = ["| encoder | batch | img/s | median ms (min-max) | GMACs/img | peak GiB | % bf16 peak | set_image+point ms |",
             "|---|---|---|---|---|---|---|---|"]
    latency = {r["encoder"]: r["predictor_point_ms"] for r in rows if "predictor_point_ms" in r}
    for r in rows:
        if "images_per_s" not in r:
            continue
        mem = "" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.2f}"
        frac = "" if r["bf16_peak_fraction"] is None else f"{100 * r['bf16_peak_fraction']:.1f}"
        lat = f"{latency[r['encoder']]:.1f}" if r["batch"] == 1 and r["encoder"] in latency else ""
        lines.append(f"| {r['encoder']} | {r['batch']} | {r['images_per_s']:.2f} | "
                     f"{r['median_ms']:.1f} ({r['min_ms']:.1f}-{r['max_ms']:.1f}) | "
                     f"{r['gmacs_per_image']:.1f} | {mem} | {frac} | {lat} |")
    return "\n".join(lines)


def plot(rows: Sequence[Dict[str, Any]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for batch in sorted({r["batch"] for r in rows if "images_per_s" in r}):
        pts = [r for r in rows if r.get("batch") == batch and "images_per_s" in r]
        ax.scatter([r["gmacs_per_image"] for r in pts], [r["images_per_s"] for r in pts], label=f"batch {batch}")
        for r in pts:
            ax.annotate(r["encoder"], (r["gmacs_per_image"], r["images_per_s"]), fontsize=7)
    ax.set_xlabel("GMACs per image")
    ax.set_ylabel("images / s")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gpu = torch.cuda.is_available()
    parser.add_argument("--encoders", nargs="+", default=list(DEFAULT_ENCODERS) if gpu else ["vit_b", "dense_vit_b", "b+t@0.25"],
                        help="vit_b|vit_l|vit_h (stock), dense_vit_*, b+t@KEEP, h+b@KEEP; this toolkit's "
                             "encoders take /BACKEND (e.g. dense_vit_h/folded)")
    parser.add_argument("--attn-backends", nargs="+", default=["sdpa"], choices=ATTENTION_BACKENDS,
                        help="run every toolkit encoder with each of these attention backends "
                             "(how the relative-position bias reaches the kernel; see blvit.layers.attention)")
    parser.add_argument("--img-size", type=int, default=1024 if gpu else 256)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8] if gpu else [1])
    parser.add_argument("--repeats", type=int, default=20 if gpu else 3)
    parser.add_argument("--warmup", type=int, default=5 if gpu else 1)
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    parser.add_argument("--backend", nargs="+", choices=["torch", "onnxruntime"], default=["torch"],
                        help="torch (PyTorch eager / --compile) and / or onnxruntime (each encoder exported to ONNX, "
                             "run by ONNX Runtime on the CPU, fp32): the same weights side by side")
    parser.add_argument("--ort-profile", action="store_true",
                        help="with --backend onnxruntime: one extra profiled run per encoder; kernel seconds per ONNX "
                             "op type printed and written to bench.json (ort_op_seconds)")
    parser.add_argument("--compile", action="store_true", help="torch.compile each encoder")
    parser.add_argument("--no-predictor", action="store_true", help="skip the SamPredictor latency")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench"))
    args = parser.parse_args(argv)
    device = torch.device("cuda" if gpu else "cpu")
    amp = not args.fp32 and gpu  # bf16 autocast on CPU is slower than float32 and says nothing about GPUs
    rows = run_benchmark(expand_backends(args.encoders, args.attn_backends), args.img_size, args.batches, args.repeats, args.warmup, device, amp,
                         args.compile, not args.no_predictor, args.backend, args.ort_profile)
    report = {"device": torch.cuda.get_device_name(device) if gpu else f"cpu ({torch.get_num_threads()} threads)",
              "dtype": "bf16" if amp else "float32", "torch": torch.__version__, "compile": args.compile,
              "command": "blvit-bench " + " ".join(argv if argv is not None else __import__("sys").argv[1:]), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "bench.json", json.dumps(report, indent=2))
    table = markdown(rows)
    atomic_write_text(args.out / "bench.md", f"{report['device']}, {report['dtype']}\n\n{table}\n")
    plot(rows, args.out / "bench.png")
    print(f"{report['device']}, {report['dtype']}\n{table}\nwrote {args.out}/bench.json, bench.md, bench.png")


if __name__ == "__main__":
    main()
