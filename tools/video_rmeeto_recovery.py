"""R-MeeTo on video, end to end on the generated moving-shape videos: train a tiny VideoMamba
(configs/video/quickstart.yaml), merge its spatio-temporal tokens with R-MeeTo (no re-training),
then re-train the merged model for a few epochs with knowledge distillation from the unmerged one,
all through ``tools/train.py``'s trainer; the three validation top-1s side by side.

    python tools/video_rmeeto_recovery.py --out outputs/video_rmeeto    # ~4 min on a 2-core CPU

The merge defaults to r = 16 tokens at the input of blocks 1 and 2 of the 4-block model
(64 spatio-temporal tokens -> 48 -> 32, class token kept), i.e. aggressive on purpose: the
video_task's own schedule (r = 40 at every second block of 24 on 1568 tokens) removes a smaller
share per merge. Writes ``recovery.json`` and ``recovery.md``.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import blvit  # noqa: E402,F401  (registers the models with timm)
from blvit.data.make_synthetic import ensure_videos  # noqa: E402
from blvit.data.video import VideoClipDataset  # noqa: E402
from blvit.train.config import load_config  # noqa: E402
from eval.recovery import merge_and_retrain  # noqa: E402

QUICK = ROOT / "configs/video/quickstart.yaml"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("outputs/video_rmeeto"))
    p.add_argument("--data", type=Path, default=None, help="video list root (default: generated under --out)")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--layers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--base-epochs", type=int, default=10)
    p.add_argument("--retrain-epochs", type=int, default=3)
    p.add_argument("--retrain-lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    data = ensure_videos(args.data or args.out / "videos")
    kwargs = load_config(QUICK, [])["model"]["kwargs"]
    val = VideoClipDataset.from_list(data / "val.csv", data, num_frames=kwargs["num_frames"], img_size=kwargs["img_size"],
                                     training=False, test_clips=1, test_crops=1)
    merge = {"method": "rmeeto", "r": args.r, "layers": args.layers, "order": "restore"}
    start = time.perf_counter()
    result = merge_and_retrain(QUICK, [f"data.root={data}", f"seed={args.seed}"], [f"train.epochs={args.base_epochs}"],
                               merge, [f"train.epochs={args.retrain_epochs}", f"train.lr={args.retrain_lr}",
                                       "loss.distill=kd", "loss.distill_weight=0.5"], val, args.out, batch_size=16)
    tokens = result["tokens"]
    rows = [("unmerged", [tokens[0]] * len(tokens), result["unmerged"]),
            (f"R-MeeTo r={args.r} at blocks {args.layers}, not re-trained", tokens, result["merged"]),
            (f"... + {args.retrain_epochs} epochs of KD re-training", tokens, result["retrained"])]
    report = dict(result, val_videos=len(val), chance=100 / kwargs["num_classes"], seconds=time.perf_counter() - start)
    table = ["| model | tokens entering blocks | val top-1 (%) |", "|---|---|---|"]
    table += [f"| {label} | {counts} | {top1:.1f} |" for label, counts, top1 in rows]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "recovery.json").write_text(json.dumps(report, indent=2))
    (args.out / "recovery.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    print(f"{len(val)} validation videos, chance {report['chance']:.0f} %; {report['seconds']:.0f} s in all")
    return report


if __name__ == "__main__":
    main()
