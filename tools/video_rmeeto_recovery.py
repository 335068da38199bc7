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
from blvit.train.classification import apply_merging, create_classifier, train  # noqa: E402
from blvit.train.config import load_config  # noqa: E402
from eval.imagenet import evaluate_classifier  # noqa: E402

QUICK = ROOT / "configs/video/quickstart.yaml"


def top1(model: torch.nn.Module, data: VideoClipDataset) -> float:
    return evaluate_classifier(model.eval(), data, torch.device("cpu"), False, 16, 0, "val")["top1"]


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
    base_cfg = load_config(QUICK, [f"data.root={data}", f"output_dir={args.out / 'base'}", f"seed={args.seed}",
                                   f"train.epochs={args.base_epochs}"])
    name, kwargs = base_cfg["model"]["name"], base_cfg["model"]["kwargs"]
    val = VideoClipDataset.from_list(data / "val.csv", data, num_frames=kwargs["num_frames"], img_size=kwargs["img_size"],
                                     training=False, test_clips=1, test_crops=1)
    merge = {"method": "rmeeto", "r": args.r, "layers": args.layers, "order": "restore"}
    start = time.perf_counter()

    train(base_cfg)  # 1. the unmerged model
    best = str(args.out / "base/checkpoints/best.pth")
    unmerged = top1(create_classifier(name, {}, checkpoint=best), val)
    trained = time.perf_counter()

    merged_model = apply_merging(create_classifier(name, {}, checkpoint=best), merge)  # 2. merged, as it is
    merged = top1(merged_model, val)
    tokens = merged_model.token_merge.token_counts

    summary = train(load_config(QUICK, [  # 3. merged, re-trained with KD from the unmerged model
        f"data.root={data}", f"output_dir={args.out / 'retrain'}", f"seed={args.seed}", f"model.checkpoint={best}",
        f"model.merge={json.dumps(merge)}", f"teacher.name={name}", f"teacher.kwargs={json.dumps(kwargs)}",
        f"teacher.checkpoint={best}", f"train.epochs={args.retrain_epochs}", f"train.lr={args.retrain_lr}",
        "loss.distill=kd", "loss.distill_weight=0.5"]))
    retrained_model = create_classifier(name, {}, checkpoint=summary["best_checkpoint"])
    retrained = top1(retrained_model, val)
    if retrained_model.token_merge.token_counts != tokens:
        raise RuntimeError(f"the re-trained checkpoint merges {retrained_model.token_merge.token_counts}, not {tokens}")
    rows = [{"model": "unmerged", "top1": unmerged, "tokens": [tokens[0]] * len(tokens), "seconds": trained - start},
            {"model": f"R-MeeTo r={args.r} at blocks {args.layers}, not re-trained", "top1": merged, "tokens": tokens},
            {"model": f"... + {args.retrain_epochs} epochs of KD re-training", "top1": retrained, "tokens": tokens,
             "seconds": time.perf_counter() - trained}]
    report = {"model": name, "kwargs": kwargs, "merge": merge, "val_videos": len(val), "chance": 100 / kwargs["num_classes"],
              "rows": rows}
    table = ["| model | tokens entering blocks | val top-1 (%) |", "|---|---|---|"]
    table += [f"| {r['model']} | {r['tokens']} | {r['top1']:.1f} |" for r in rows]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "recovery.json").write_text(json.dumps(report, indent=2))
    (args.out / "recovery.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    print(f"{len(val)} validation videos, chance {report['chance']:.0f} %; {time.perf_counter() - start:.0f} s in all")
    return report


if __name__ == "__main__":
    main()
