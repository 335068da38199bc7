"""Peak resident memory and time of a Vision Mamba forward (+ backward) on the CPU, through the
pure-PyTorch selective scan: what docs/performance.md reports for issue 21.

    python tools/mamba_memory.py                                  # Vim-S, batch 1, 224 px
    python tools/mamba_memory.py --model videomamba_tiny --frames 8 --out outputs/mamba_memory

Each case runs in a fresh process (peak memory is per process); memory is the peak resident set
above the model's own (``/proc/self/statm`` sampled every millisecond), so weights and the
Python runtime are not counted. ``--no-recompute`` measures the old path (autograd through every
chunk) for comparison. Writes ``mamba_memory.json`` and ``mamba_memory.md``.
"""
import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

CASES = ("train", "inference")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(model_name: str, case: str, batch: int, img_size: int, frames: int, recompute: bool, threads: int) -> dict:
    """One case in this process: {"peak_gib", "seconds", ...}."""
    import torch
    import timm

    import importlib

    import blvit  # noqa: F401  (registers the models)

    selective_scan = importlib.import_module("blvit.mamba.selective_scan")  # the module, not the function

    torch.set_num_threads(threads)
    selective_scan.RECOMPUTE_IN_BACKWARD = recompute
    kwargs = {"num_frames": frames} if model_name.startswith("videomamba") else {}
    model = timm.create_model(model_name, img_size=img_size, **kwargs).train(case == "train")
    shape = (batch, 3, frames, img_size, img_size) if model_name.startswith("videomamba") else (batch, 3, img_size, img_size)
    x = torch.randn(shape)
    base, peak, done = _rss(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    start = time.perf_counter()
    if case == "train":
        model(x).float().square().mean().backward()
    else:
        with torch.no_grad():
            model(x)
    seconds = time.perf_counter() - start
    done.set()
    watcher.join()
    peak[0] = max(peak[0], _rss())
    return {"model": model_name, "case": case, "batch": batch, "img_size": img_size, "recompute": recompute,
            "threads": threads, "peak_gib": (peak[0] - base) / 2**30, "seconds": seconds}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vim_small_patch16_224")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--frames", type=int, default=8, help="VideoMamba clip length")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-recompute", action="store_true", help="also measure autograd through every chunk")
    parser.add_argument("--out", type=Path, default=Path("outputs/mamba_memory"))
    parser.add_argument("--one", nargs=2, metavar=("CASE", "RECOMPUTE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.model, args.one[0], args.batch, args.img_size, args.frames,
                                 args.one[1] == "1", args.threads)))
        return
    rows = []
    for recompute in ([True, False] if args.no_recompute else [True]):
        for case in CASES:
            cmd = [sys.executable, __file__, "--model", args.model, "--batch", str(args.batch), "--img-size",
                   str(args.img_size), "--frames", str(args.frames), "--threads", str(args.threads),
                   "--one", case, "1" if recompute else "0"]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{r['model']} {r['case']:9s} recompute={r['recompute']}: +{r['peak_gib']:.2f} GiB, {r['seconds']:.1f} s",
                  flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mamba_memory.json").write_text(json.dumps(rows, indent=2))
    lines = ["| model | case | chunks recomputed in backward | peak GiB above the model | seconds |", "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['case']} | {r['recompute']} | {r['peak_gib']:.2f} | {r['seconds']:.1f} |" for r in rows]
    (args.out / "mamba_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
