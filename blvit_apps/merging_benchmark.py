"""Speed and FLOPs with and without token merging, in one command (``blvit-bench-merging``).

For each model: images/s of the plain model and of the merged one (Vim-Ti/S/B with R-MeeTo,
DeiT-S/B with ToMe), plus the FLOPs of one image. On a GPU: bf16 autocast, batch 128, CUDA-event
timing, median over repeats after warm-up (R-MeeTo and ToMe report throughput this way). On a CPU:
float32 and smaller defaults; ``--batch``, ``--models``, ``--repeats``, ``--img-size`` shrink the
run to seconds for CI. Weights are random (speed and FLOPs do not depend on them).

FLOPs are 2 x multiply-adds. Matrix products, convolutions and attention are counted with
``torch.utils.flop_counter.FlopCounterMode`` on meta tensors; Vim's selective scan is invisible
to FlopCounterMode (elementwise work inside a loop), so its multiply-adds are counted analytically
(:func:`blvit.mamba.selective_scan_macs`: 4 N + 3 per channel, token and direction) and added.

Writes ``bench_merging.json``, ``bench_merging.md`` and ``bench_merging.png`` (speed vs FLOPs)
to ``--out``.
"""
import argparse
import json
import os
import platform
import statistics
import time
from contextlib import nullcontext
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

__all__ = ["MODELS", "benchmark_model", "main", "run"]

# name -> (timm name, merging method, default r)
MODELS: Dict[str, Dict[str, Any]] = {
    "vim_tiny": dict(timm="vim_tiny_patch16_224", method="rmeeto", r=5),
    "vim_small": dict(timm="vim_small_patch16_224", method="rmeeto", r=11),
    "vim_base": dict(timm="vim_base_patch16_224", method="rmeeto", r=11),
    # ToMe: DeiT-S r=13 (the paper's trained DeiT-S setting), ViT/DeiT-B r=16 (its ViT-B/16 setting)
    "deit_small": dict(timm="deit_small_patch16_224", method="tome", r=13),
    "deit_base": dict(timm="deit_base_patch16_224", method="tome", r=16),
}

FLOPS_NOTE = ("FLOPs = 2 x multiply-adds of one image. Matrix products, convolutions and attention: "
              "torch FlopCounterMode on meta tensors. Vim's selective scan cannot be seen by FlopCounterMode "
              "(elementwise work in a loop); it is counted analytically, 4N+3 multiply-adds per channel, token "
              "and direction (N = d_state), and included in the totals (scan_gflops shows its share).")


def _amp_dtype(name: str) -> Optional[torch.dtype]:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[name]


def count_macs(model: nn.Module, img_size: int) -> Dict[str, int]:
    """Multiply-adds of one image: FlopCounterMode on meta copies + analytic selective scans."""
    from blvit.mamba import vim_macs

    return vim_macs(model, img_size=img_size, batch=1)


def time_model(model: nn.Module, x: torch.Tensor, repeats: int, warmup: int,
               amp_dtype: Optional[torch.dtype]) -> List[float]:
    """Seconds per forward of ``model(x)`` for each timed repeat (after ``warmup`` untimed ones)."""
    device = x.device
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    times = []
    with torch.inference_mode(), autocast:
        for _ in range(warmup):
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            for _ in range(repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                model(x)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1000.0)
        else:
            for _ in range(repeats):
                t0 = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - t0)
    return times


def _final_tokens(model: nn.Module, method: str, base_tokens: int) -> int:
    if method == "rmeeto" and getattr(model, "token_merge", None) is not None and model.token_merge.token_counts:
        return int(model.token_merge.token_counts[-1])
    info = getattr(model, "_tome_info", None)
    if info is not None and info.get("token_counts"):
        return int(info["token_counts"][-1])
    return base_tokens


def _apply(model: nn.Module, method: str, r: int) -> None:
    from blvit.tokens.rmeeto import apply_rmeeto
    from blvit.tokens.tome import apply_tome

    if method == "rmeeto":
        apply_rmeeto(model, r=r)
    else:
        apply_tome(model, r=r)


def _remove(model: nn.Module, method: str) -> None:
    from blvit.tokens.rmeeto import remove_rmeeto
    from blvit.tokens.tome import remove_tome

    (remove_rmeeto if method == "rmeeto" else remove_tome)(model)


def benchmark_model(name: str, batch: int, img_size: int, repeats: int, warmup: int, device: torch.device,
                    amp: str, r: Optional[int] = None, scan_backend: Optional[str] = None) -> Dict[str, Any]:
    """One row: the plain model and the merged model, speed and FLOPs."""
    import timm

    import blvit  # noqa: F401  (registers the Vim models)

    spec = MODELS[name]
    r = spec["r"] if r is None else int(r)
    kwargs: Dict[str, Any] = dict(img_size=img_size)
    if spec["method"] == "rmeeto":
        kwargs["scan_backend"] = scan_backend
    torch.manual_seed(0)
    model = timm.create_model(spec["timm"], **kwargs).eval().to(device)
    x = torch.randn(batch, 3, img_size, img_size, device=device)
    base_tokens = (img_size // 16) ** 2 + 1
    amp_dtype = _amp_dtype(amp) if device.type == "cuda" else None
    rows = {}
    for variant in ("baseline", "merged"):
        if variant == "merged":
            _apply(model, spec["method"], r)
        macs = count_macs(model, img_size)
        times = time_model(model, x, repeats, warmup, amp_dtype)
        with torch.inference_mode():  # one tiny pass to read the token counts
            model(x[:1])
        med = statistics.median(times)
        rows[variant] = {
            "images_per_s": batch / med,
            "ms_per_batch": 1000 * med,
            "gmacs": macs["total"] / 1e9,
            "gflops": 2 * macs["total"] / 1e9,
            "scan_gflops": 2 * macs["scan"] / 1e9,
            "tokens_final": _final_tokens(model, spec["method"], base_tokens),
        }
    # read the settings of the timed merged run before _remove uninstalls them (after it, token_merge
    # is None and the report would show compare None whatever the run used)
    settings: Dict[str, Any] = {"r": r}
    if spec["method"] == "rmeeto":
        merge = model.token_merge
        settings.update(layers=list(merge.layers), order=merge.order, metric=merge.metric, compare=merge.compare)
    else:
        settings.update(prop_attn=True)
    _remove(model, spec["method"])
    out = {
        "model": name, "timm_name": spec["timm"], "method": spec["method"], "settings": settings,
        "baseline": rows["baseline"], "merged": rows["merged"],
        "speedup": rows["merged"]["images_per_s"] / rows["baseline"]["images_per_s"],
        "flops_ratio": rows["merged"]["gflops"] / rows["baseline"]["gflops"],
    }
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def _markdown(report: Dict[str, Any]) -> str:
    lines = [
        f"# Token merging: speed and FLOPs ({report['device_name']}, {report['dtype']}, batch {report['batch']}, "
        f"{report['img_size']} px)",
        "",
        "| model | method | r | GFLOPs | GFLOPs merged | FLOPs ratio | tokens (last layer) | img/s | img/s merged | speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["results"]:
        b, m = row["baseline"], row["merged"]
        lines.append(
            f"| {row['model']} | {row['method']} | {row['settings']['r']} | {b['gflops']:.3f} | {m['gflops']:.3f} | "
            f"{row['flops_ratio']:.3f} | {b['tokens_final']} -> {m['tokens_final']} | {b['images_per_s']:.1f} | "
            f"{m['images_per_s']:.1f} | {row['speedup']:.2f}x |"
        )
    lines += ["", f"Selective scan backend: {report['scan_backend']}. Timing: median of {report['repeats']} "
              f"timed runs after {report['warmup']} warm-up runs.", "", report["flops_note"], ""]
    return "\n".join(lines)


def _plot(report: Dict[str, Any], path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for i, row in enumerate(report["results"]):
        b, m = row["baseline"], row["merged"]
        colour = f"C{i % 10}"
        ax.plot([b["gflops"], m["gflops"]], [b["images_per_s"], m["images_per_s"]], "-", color=colour, alpha=0.6)
        ax.plot(b["gflops"], b["images_per_s"], "o", color=colour, label=f"{row['model']}")
        ax.plot(m["gflops"], m["images_per_s"], "*", color=colour, markersize=11)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("GFLOPs per image")
    ax.set_ylabel("images / s")
    ax.set_title(f"o plain, * merged ({report['device_name']}, batch {report['batch']})", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")


def run(models: Sequence[str], batch: Optional[int] = None, img_size: int = 224, repeats: Optional[int] = None,
        warmup: Optional[int] = None, device: str = "auto", amp: str = "bf16", scan_backend: Optional[str] = None,
        r: Optional[Dict[str, int]] = None, out: Optional[str] = "outputs/bench_merging", plot: bool = True,
        log=print) -> Dict[str, Any]:
    """Benchmark ``models`` (keys of :data:`MODELS`); returns the report and writes the files to ``out``."""
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise ValueError(f"unknown models {unknown}; choose from {sorted(MODELS)}")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    gpu = dev.type == "cuda"
    batch = batch or (128 if gpu else 8)
    repeats = repeats or (30 if gpu else 3)
    warmup = (10 if gpu else 1) if warmup is None else warmup
    from blvit.mamba.selective_scan import _cuda_scan_fn

    backend = scan_backend or ("cuda" if gpu and _cuda_scan_fn() is not None else "torch")
    report: Dict[str, Any] = {
        "device": dev.type,
        "device_name": torch.cuda.get_device_name(dev) if gpu else (platform.processor() or platform.machine() or "cpu"),
        "dtype": f"{amp} autocast" if gpu and amp != "fp32" else "fp32",
        "batch": batch, "img_size": img_size, "repeats": repeats, "warmup": warmup,
        "scan_backend": backend, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "flops_note": FLOPS_NOTE, "results": [],
    }
    for name in models:
        t0 = time.perf_counter()
        row = benchmark_model(name, batch, img_size, repeats, warmup, dev, amp, (r or {}).get(name), backend)
        report["results"].append(row)
        log(f"{name:11s} {row['method']:6s} r={row['settings']['r']:<3d} GFLOPs {row['baseline']['gflops']:8.3f} -> "
            f"{row['merged']['gflops']:8.3f} ({row['flops_ratio']:.3f}x)  img/s {row['baseline']['images_per_s']:9.1f} -> "
            f"{row['merged']['images_per_s']:9.1f} ({row['speedup']:.2f}x)  tokens {row['baseline']['tokens_final']} -> "
            f"{row['merged']['tokens_final']}  [{time.perf_counter() - t0:.1f} s]")
    log(FLOPS_NOTE)
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "bench_merging.json"), "w") as f:
            json.dump(report, f, indent=2)
        with open(os.path.join(out, "bench_merging.md"), "w") as f:
            f.write(_markdown(report))
        if plot:
            _plot(report, os.path.join(out, "bench_merging.png"))
        log(f"wrote {out}/bench_merging.{{json,md{',png' if plot else ''}}}")
    return report


def _parse_r(items: Sequence[str]) -> Dict[str, int]:
    out = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in MODELS or not value.lstrip("-").isdigit():
            raise argparse.ArgumentTypeError(f"--r expects MODEL=INT with MODEL in {sorted(MODELS)}, got {item!r}")
        out[name] = int(value)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry (``blvit-bench-merging``); returns the exit status (the report is in ``--out``)."""
    parser = argparse.ArgumentParser(prog="blvit-bench-merging", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma-separated, from {','.join(MODELS)} (default: all)")
    parser.add_argument("--batch", type=int, default=None, help="images per batch (default 128 on GPU, 8 on CPU)")
    parser.add_argument("--img-size", type=int, default=224, help="input side (default 224)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs (default 30 GPU, 3 CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed warm-up runs (default 10 GPU, 1 CPU)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--amp", default="bf16", choices=("bf16", "fp16", "fp32"), help="GPU autocast dtype")
    parser.add_argument("--scan-backend", default=None, choices=("torch", "cuda", "reference"),
                        help="Vim selective scan (default: cuda kernel when mamba_ssm is installed, else torch)")
    parser.add_argument("--r", nargs="*", default=[], metavar="MODEL=R",
                        help="override r, e.g. --r vim_small=8 deit_small=16 (defaults: " +
                        ", ".join(f"{k} {v['r']}" for k, v in MODELS.items()) + ")")
    parser.add_argument("--out", default="outputs/bench_merging", help="output folder")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    run(models, batch=args.batch, img_size=args.img_size, repeats=args.repeats, warmup=args.warmup,
        device=args.device, amp=args.amp, scan_backend=args.scan_backend, r=_parse_r(args.r),
        out=args.out, plot=not args.no_plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
