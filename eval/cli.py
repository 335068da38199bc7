"""``blvit-eval``: zero-shot evaluation with efficiency figures next to accuracy.

    blvit-eval prompts   --annotations ANN.json --images DIR --model M [--checkpoint C]
                         --prompt point|box|random-points [--clicks N] [--points N --seed S] [--oracle]
                         --out REPORT.json
    blvit-eval instances --annotations ANN.json [--images DIR]
                         (--detections DETS.json --model M [--checkpoint C] | --predictions PREDS.json)
                         [--dataset coco|lvis] --out REPORT.json
    blvit-eval table     --annotations ANN.json --images DIR --model NAME[:CHECKPOINT] [--model ...]
                         [--detections DETS.json] --out TABLE.json
    blvit-eval imagenet  --data ROOT --model NAME[:CHECKPOINT] [--model ...] --out REPORT.json

Every run writes REPORT.json (figures under plain keys: "mIoU", "AP", "AP50", ...,
"encoder_gmacs", "images_per_s") and REPORT.md (a table); ``--vis N`` draws N images.
Under ``torchrun`` the images are split across processes and rank 0 writes the report.
Per-image results are cached next to the report (REPORT.cache/), so a rerun resumes.
"""
import argparse
import hashlib
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as torch_dist

from blvit.layers import ATTENTION_BACKENDS
from blvit.utils.io import atomic_write_text

from .annotations import AnnotationError, load_annotations
from .distributed import gather, sum_or_none
from .metrics import ResultsError, evaluate_instances, load_results, summarize_miou

logger = logging.getLogger("blvit.eval")


def _dist():
    from blvit.train.loop import dist_info

    return dist_info()


def _barrier(world: int) -> None:
    if world > 1:
        torch_dist.barrier()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    return "n/a" if value is None else str(value)


def markdown(report: Dict[str, Any], keys: Sequence[str]) -> str:
    head = ["model", *keys]
    row = [str(report.get("model") or report.get("predictions")), *[_fmt(report.get(k)) for k in keys]]
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head), "| " + " | ".join(row) + " |"])


def write_report(report: Dict[str, Any], out: Path, keys: Sequence[str] = (), table: Optional[str] = None) -> None:
    """REPORT.json (NaN written as null) and REPORT.md: ``table``, or one row of ``keys``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    clean = json.loads(json.dumps(report, default=float).replace("NaN", "null"))
    atomic_write_text(out, json.dumps(clean, indent=2))
    table = markdown(report, keys) if table is None else table
    atomic_write_text(out.with_suffix(".md"), table + "\n")
    print(table)
    print(f"wrote {out} and {out.with_suffix('.md')}")


def _model_and_encoder(args, device, amp):
    from .sam_eval import Encoder, load_sam_model

    sam, info = load_sam_model(args.model, args.checkpoint, args.keep_ratio, args.attn_backend)
    return sam, info, Encoder(sam, device, amp)


def _file_identity(path: Optional[Any]) -> Optional[Dict[str, Any]]:
    """Path, size and modification time: a file rewritten in place (a training run's best.pth)
    is another file to the caches."""
    if path is None:
        return None
    path = Path(path).resolve()
    stat = path.stat() if path.exists() else None
    return {"path": str(path), "bytes": stat.st_size if stat else None, "mtime_ns": stat.st_mtime_ns if stat else None}


def _signature(args, amp: bool, extra: Dict[str, Any]) -> Dict[str, Any]:
    """What a cache's predictions depend on: files, model, prompts, precision."""
    return {"annotations": _file_identity(args.annotations), "model": args.model,
            "checkpoint": _file_identity(args.checkpoint), "keep_ratio": args.keep_ratio,
            "attn_backend": args.attn_backend, "precision": "bf16" if amp else "fp32", **extra}


def cmd_prompts(args) -> Optional[Dict[str, Any]]:
    from .sam_eval import PredictionCache, prompt_image
    from .vis import draw_prompted

    world, rank, device = _dist()
    amp = device.type == "cuda" and not args.fp32
    anns = load_annotations(args.annotations, args.dataset)
    image_ids = sorted(anns.images)[: args.max_images] if args.max_images else sorted(anns.images)
    image_ids = [i for i in image_ids if anns.anns_by_image.get(i)]
    sam, info, encoder = _model_and_encoder(args, device, amp)
    cache_dir = args.out.with_suffix(".cache")
    random = args.prompt == "random-points"
    signature = _signature(args, amp, {"prompt": args.prompt, "clicks": args.clicks if args.prompt == "point" else 1,
                                  "oracle": args.oracle, "clicker": "ritm",
                                  **({"points": args.points, "seed": args.seed} if random else {})})
    cache = PredictionCache(cache_dir / f"rank{rank}.jsonl", signature, args.fresh)
    vis_ids = set(image_ids[: args.vis])
    clicks = args.clicks if args.prompt == "point" else 1

    def work(image_id, image):
        records, drawn = prompt_image(encoder, anns, image_id, image, args.prompt, clicks, args.oracle,
                                      keep_masks=image_id in vis_ids, points=args.points, seed=args.seed)
        if drawn:
            draw_prompted(args.out.parent / f"{args.out.stem}_vis" / f"{image_id}.png", image, drawn,
                          [r for r in records if "skipped" not in r])
        return records

    done = _run_sharded(image_ids, anns, args.images, sam, encoder, cache, work, "prompts", device, amp, world, rank,
                        args.strict)
    if done is None:
        return None
    per_object, eff = done
    records = [rec for image_id in image_ids for rec in per_object.get(image_id, [])]
    measured = [rec for rec in records if "skipped" not in rec]
    skipped = {str(rec["ann_id"]): rec["skipped"] for rec in records if "skipped" in rec}
    if skipped:
        logger.warning("%d annotations skipped (invalid for --prompt %s); listed under annotations_skipped in the "
                       "report", len(skipped), args.prompt)
    rows = [{"iou": iou, "area": rec["area"], "click": k + 1} for rec in measured for k, iou in enumerate(rec["iou"])]
    if not rows:
        raise ValueError(f"{args.annotations}: no objects to evaluate")
    report = {"task": "prompts", **info, "annotations": str(args.annotations), "dataset": anns.kind,
              "prompt": args.prompt, "clicks": clicks,
              "mask_choice": "oracle (best IoU with ground truth)" if args.oracle else "highest predicted IoU",
              "images": len(image_ids) - len(eff["images_skipped"]), "objects": len(measured),
              **summarize_miou(rows), **eff, "annotations_skipped": skipped, "processes": world}
    if random:
        # the seed fixes every point; the digest lets two reports show they prompted with the same ones
        drawn_points = sorted((str(rec["ann_id"]), rec["points"]) for rec in measured)
        report.update(points=args.points, seed=args.seed, sampling="uniform over the mask's pixels, distinct, "
                      "numpy default_rng([seed, image_id, ann_id])",
                      points_sha256=hashlib.sha256(json.dumps(drawn_points).encode()).hexdigest())
    keys = ["mIoU", "mIoU_small", "mIoU_medium", "mIoU_large"]
    keys += [f"mIoU@{k}click" for k in range(1, clicks + 1)] if clicks > 1 else []
    write_report(report, args.out, keys + ["encoder_gmacs", "images_per_s"])
    return report


def _run_sharded(image_ids: List[int], anns, images_dir, sam, encoder, cache, work, desc: str, device, amp: bool,
                 world: int, rank: int, strict: bool = False) -> Optional[Tuple[Dict[int, List[Any]], Dict[str, Any]]]:
    """Each process runs ``work`` on its stride of the images into its own cache. Rank 0 gets
    (the records of every image from all the ranks' caches, the encoder's efficiency with
    images/s summed over the processes); the other ranks get None."""
    from .sam_eval import efficiency, merge_caches, run_images

    skipped = run_images(image_ids[rank::world], anns, Path(images_dir), encoder, cache, work, desc, rank == 0, strict)
    eff = efficiency(sam, encoder, device, amp)
    speeds = gather(eff["images_per_s"], world)
    all_skipped = {k: v for part in gather(skipped, world) for k, v in part.items()}
    _barrier(world)
    if rank != 0:
        return None
    # this run's processes' caches only: together they hold every image of the run, and files of
    # an earlier run with more processes may hold other settings or an older checkpoint's masks
    merged = merge_caches([cache.path.parent / f"rank{r}.jsonl" for r in range(world)])
    for image_id in all_skipped:
        merged.pop(image_id, None)  # a file that broke after an earlier run cached it: not counted
    if all_skipped:
        logger.warning("%d images skipped (unreadable); listed under images_skipped in the report", len(all_skipped))
    return merged, {**eff, "images_per_s": sum_or_none(speeds),
                    "images_skipped": {str(k): v for k, v in sorted(all_skipped.items())}}


def cmd_instances(args) -> Optional[Dict[str, Any]]:
    from .sam_eval import PredictionCache, check_detections, instance_image

    anns = load_annotations(args.annotations, args.dataset)
    keys = ["AP", "AP50", "AP75", "APs", "APm", "APl"] + (["APr", "APc", "APf"] if (args.dataset or anns.kind) == "lvis" else [])
    if args.predictions:
        results = load_results(args.predictions)
        report = {"task": "instances", "predictions": str(args.predictions), "annotations": str(args.annotations),
                  "dataset": args.dataset or anns.kind, "results": len(results),
                  **evaluate_instances(anns, results, args.dataset),
                  "encoder_gmacs": None, "images_per_s": None, "note": "scored a results file; no model was run"}
        write_report(report, args.out, keys)
        return report

    world, rank, device = _dist()
    amp = device.type == "cuda" and not args.fp32
    if args.images is None or args.model is None:
        raise SystemExit("blvit-eval instances --detections needs --images and --model")
    detections = load_results(args.detections)
    by_image = check_detections(anns, detections, str(args.detections))
    if not by_image:
        logger.warning("%s: no detections; every AP is 0", args.detections)
    # --max-images: the first N images of the annotation file, scored on their own (an image of
    # them without detections still counts its objects as missed)
    subset = sorted(anns.images)[: args.max_images] if args.max_images else None
    image_ids = sorted(by_image) if subset is None else sorted(set(by_image) & set(subset))
    for image_id in image_ids:  # LVIS keeps the top 300 per image; so do we, by score
        by_image[image_id] = sorted(by_image[image_id], key=lambda d: -float(d["score"]))[: args.max_dets]
    sam, info, encoder = _model_and_encoder(args, device, amp)
    cache_dir = args.out.with_suffix(".cache")
    cache = PredictionCache(cache_dir / f"rank{rank}.jsonl",
                            _signature(args, amp, {"detections": _file_identity(args.detections),
                                                   "max_dets": args.max_dets}),
                            args.fresh)
    done = _run_sharded(image_ids, anns, args.images, sam, encoder, cache,
                        lambda image_id, image: instance_image(encoder, by_image[image_id]), "instances", device, amp,
                        world, rank, args.strict)
    if done is None:
        return None
    merged, eff = done
    results = [r for image_id in image_ids for r in merged.get(image_id, [])]
    if args.save_predictions:
        atomic_write_text(args.save_predictions, json.dumps(results))
    # unreadable images (skipped, listed in the report) are left out of the scoring, not counted as misses
    scored = None
    if subset is not None or eff["images_skipped"]:
        scored = [i for i in (subset if subset is not None else sorted(anns.images)) if str(i) not in eff["images_skipped"]]
    report = {"task": "instances", **info, "annotations": str(args.annotations), "detections": str(args.detections),
              "dataset": args.dataset or anns.kind, "images": len(image_ids) - len(eff["images_skipped"]),
              "images_scored": len(scored) if scored is not None else len(anns.images), "results": len(results),
              **evaluate_instances(anns, results, args.dataset, image_ids=scored), **eff, "processes": world}
    write_report(report, args.out, keys + ["encoder_gmacs", "images_per_s"])
    return report


TABLE_SETTINGS = (("1 point", ["--prompt", "random-points", "--points", "1"]),
                  ("3 points", ["--prompt", "random-points", "--points", "3"]),
                  ("box", ["--prompt", "box"]))


def _slug(name: str, checkpoint: Optional[str]) -> str:
    stem = Path(checkpoint).stem if checkpoint else "random"
    text = f"{name}-{stem}" if not checkpoint or Path(checkpoint).parent.name in ("", ".") else \
        f"{name}-{Path(checkpoint).parent.parent.name}-{stem}"
    return "".join(c if c.isalnum() or c in "+-_." else "_" for c in text)


def cmd_table(args) -> Optional[Dict[str, Any]]:
    """The bLViT paper's SAM table: for each model, mIoU with 1 and 3 random points and with the
    ground-truth box, AP with detector boxes as prompts, and the encoder's GFLOPs; every cell is
    one ``prompts`` / ``instances`` run with its own report and cache under ``--out``'s folder,
    so an interrupted table resumes."""
    from .imagenet import parse_model_spec

    out_dir = args.out.parent / f"{args.out.stem}_runs"
    data = ["--annotations", str(args.annotations), "--images", str(args.images)]
    options = ["--max-images", str(args.max_images)] if args.max_images else []
    options += ["--fp32"] if args.fp32 else []
    options += ["--strict"] if args.strict else []
    rows = []
    for spec in args.model:
        name, checkpoint = parse_model_spec(spec)
        if not name:
            raise SystemExit(f"--model {spec!r}: expected NAME or NAME:CHECKPOINT")
        model_args = ["--model", name] + (["--checkpoint", checkpoint] if checkpoint else [])
        model_args += ["--keep-ratio", str(args.keep_ratio)] if args.keep_ratio is not None else []
        slug = _slug(name, checkpoint)
        row: Dict[str, Any] = {"model": name, "checkpoint": checkpoint}
        for label, setting in TABLE_SETTINGS:
            report = run(["prompts", *data, *options, *model_args, *setting, "--seed", str(args.seed),
                          "--out", str(out_dir / slug / f"{label.replace(' ', '_')}.json")])
            if report is None:  # another torchrun rank: rank 0 writes the table
                continue
            row[f"mIoU {label}"] = report["mIoU"]
            row.update({k: report.get(k) for k in ("layout", "keep_ratio", "merge_r", "encoder_gmacs", "input_size")})
        if args.detections is not None:
            report = run(["instances", *data, "--detections", str(args.detections), *model_args, *options,
                          "--out", str(out_dir / slug / "instances.json")])
            if report is not None:
                row["AP"] = report["AP"]
        row["encoder_gflops"] = 2 * row["encoder_gmacs"] if row.get("encoder_gmacs") is not None else None
        rows.append(row)
    if _dist()[1] != 0:
        return None
    columns = ["encoder_gflops", "mIoU 1 point", "mIoU 3 points", "mIoU box"] + (["AP"] if args.detections else [])
    size = rows[0].get("input_size") if rows else None
    head = ["model", "layout", "keep", f"GFLOPs ({size} px)" if size else "GFLOPs"] + columns[1:]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([r["model"] + (f" ({Path(r['checkpoint']).name})" if r["checkpoint"] else ""),
                                         str(r.get("layout") or "stock"),
                                         f"r {r['merge_r']}" if r.get("merge_r") is not None else _fmt(r.get("keep_ratio"))]
                                        + [_fmt(r.get(c)) for c in columns]) + " |")
    report = {"task": "table", "annotations": str(args.annotations), "detections": str(args.detections)
              if args.detections else None, "seed": args.seed, "rows": rows, "runs": str(out_dir)}
    write_report(report, args.out, table="\n".join(lines))
    return report


def cmd_imagenet(args) -> Optional[Dict[str, Any]]:
    from .imagenet import markdown_rows, run_imagenet, write_figure

    world, rank, device = _dist()
    amp = device.type == "cuda" and not args.fp32
    kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
    rows = run_imagenet(args.data, args.split, args.model, args.dense_checkpoint, args.img_size, args.batch_size,
                        args.workers, args.max_images, kwargs, device, amp, world, rank, crop_pct=args.crop_pct)
    if rank != 0:  # every rank has the figures; rank 0 writes them
        return None
    report = {"task": "imagenet", "data": str(args.data), "split": args.split, "models": rows,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
              "dtype": "bf16" if amp else "float32", "processes": world}
    for r in rows:  # plain keys for the first model, as the other subcommands have
        report.setdefault("top1", r["top1"])
        report.setdefault("top5", r["top5"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report["figure"] = str(write_figure(rows, args.out.with_suffix(".png"), f"{args.data.name}/{args.split}"))
    atomic_write_text(args.out, json.dumps(report, indent=2))
    table = markdown_rows(rows)
    atomic_write_text(args.out.with_suffix(".md"), table + "\n")
    print(table)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return report


def cmd_video(args) -> Optional[Dict[str, Any]]:
    from .video import markdown_video_rows, run_video

    world, rank, device = _dist()
    amp = device.type == "cuda" and not args.fp32
    rows = run_video(args.data, args.list, args.model, args.num_frames, args.clips, args.crops, args.img_size,
                     args.sampling, args.batch_size, args.workers, args.max_videos, device, amp, args.strict, world, rank)
    if rank != 0:  # every rank has the figures; rank 0 writes them
        return None
    report = {"task": "video", "data": str(args.data), "list": args.list, "models": rows,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
              "dtype": "bf16" if amp else "float32", "top1": rows[0]["top1"], "top5": rows[0]["top5"], "processes": world}
    write_report(report, args.out, table=markdown_video_rows(rows))
    return report


class _ShowDefaults(argparse.HelpFormatter):
    """argparse's help, plus "(default: X)" for options whose default is a value (not None/False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in text and action.option_strings:
            text += " (default: %(default)s)"
        return text


def _common_model_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--model", required=required, help="vit_b|vit_l|vit_h (stock SAM), dense_vit_b|_l|_h, b+t, h+b")
    p.add_argument("--checkpoint", help="official SAM .pth, or a checkpoint of this toolkit")
    p.add_argument("--keep-ratio", type=float, help="override a bLViT model's keep ratio")
    p.add_argument("--attn-backend", choices=ATTENTION_BACKENDS,
                   help="how this toolkit's encoders add the relative-position bias (default: sdpa; speed: blvit-bench)")
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast on GPU")
    p.add_argument("--fresh", action="store_true", help="discard cached predictions of an earlier run")
    p.add_argument("--max-images", type=int, help="evaluate only the first N images (quick checks)")
    p.add_argument("--strict", action="store_true",
                   help="stop at an unreadable image instead of skipping it with a warning")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blvit-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prompts", formatter_class=_ShowDefaults, help="mIoU from simulated clicks or ground-truth boxes")
    p.add_argument("--annotations", type=Path, required=True, help="COCO or LVIS instance annotations (JSON)")
    p.add_argument("--images", type=Path, required=True,
                   help="image folder (images found by file_name, or by coco_url's file name for LVIS)")
    p.add_argument("--dataset", choices=["coco", "lvis"], help="default: detected from the file")
    p.add_argument("--prompt", choices=["point", "box", "random-points"], default="point",
                   help="point: RITM's simulated clicks; box: the ground-truth box; random-points: --points pixels "
                        "drawn uniformly from the mask (the bLViT paper's 1- and 3-point settings)")
    p.add_argument("--clicks", type=int, default=1, help="--prompt point: clicks per object (mIoU reported for each)")
    p.add_argument("--points", type=int, default=1, help="--prompt random-points: points per object")
    p.add_argument("--seed", type=int, default=0,
                   help="--prompt random-points: the points' seed (the same points for every model)")
    p.add_argument("--oracle", action="store_true", help="choose the multimask output with the best IoU against ground truth")
    p.add_argument("--vis", type=int, default=0, help="draw this many images")
    p.add_argument("--out", type=Path, required=True, help="report JSON (a Markdown table and a cache go beside it)")
    _common_model_args(p, required=True)
    p.set_defaults(func=cmd_prompts)

    p = sub.add_parser("instances", formatter_class=_ShowDefaults, help="instance-segmentation AP (COCOeval / LVISEval)")
    p.add_argument("--annotations", type=Path, required=True, help="COCO or LVIS instance annotations (JSON)")
    p.add_argument("--images", type=Path, help="image folder (needed with --detections)")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--detections", type=Path, help="COCO results-format boxes (e.g. ViTDet-H) used as prompts")
    group.add_argument("--predictions", type=Path, help="COCO results-format masks to score as they are")
    p.add_argument("--dataset", choices=["coco", "lvis"], help="evaluator (default: detected from the file)")
    p.add_argument("--max-dets", type=int, default=300, help="highest-scoring boxes kept per image")
    p.add_argument("--save-predictions", type=Path, help="also write the predicted masks (results format)")
    p.add_argument("--out", type=Path, required=True, help="report JSON (a Markdown table and a cache go beside it)")
    _common_model_args(p, required=False)
    p.set_defaults(func=cmd_instances)

    p = sub.add_parser("table", formatter_class=_ShowDefaults,
                       help="the bLViT paper's SAM table: 1 / 3 random points, box, detector-box AP, GFLOPs")
    p.add_argument("--annotations", type=Path, required=True, help="COCO or LVIS instance annotations (JSON)")
    p.add_argument("--images", type=Path, required=True, help="image folder")
    p.add_argument("--model", action="append", required=True,
                   help="NAME[:CHECKPOINT], repeatable: vit_b:sam_vit_b_01ec64.pth, b+t:runs/bt/checkpoints/best.pth, ...")
    p.add_argument("--detections", type=Path, help="COCO results-format boxes (e.g. ViTDet-H) for the AP column")
    p.add_argument("--keep-ratio", type=float, help="override every bLViT model's keep ratio")
    p.add_argument("--seed", type=int, default=0, help="the random points' seed (the same points for every model)")
    p.add_argument("--max-images", type=int, help="evaluate only the first N images (quick checks)")
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast on GPU")
    p.add_argument("--strict", action="store_true", help="stop at an unreadable image instead of skipping it")
    p.add_argument("--out", type=Path, required=True,
                   help="table JSON (Markdown beside it; each cell's report and cache in <out>_runs/)")
    p.set_defaults(func=cmd_table)

    p = sub.add_parser("imagenet", formatter_class=_ShowDefaults, help="top-1/top-5, FLOPs and images/s of classifiers, side by side")
    p.add_argument("--data", type=Path, required=True, help="ImageFolder root with val/<wnid>/*.JPEG")
    p.add_argument("--split", default="val", help="sub-folder of --data to evaluate")
    p.add_argument("--model", action="append", required=True,
                   help="NAME[@KEY=VALUE,...][:CHECKPOINT], repeatable, e.g. deit_base_patch16_224:deit_base.pth "
                        "evit_base_patch16_224@keep_rate=0.6 efficientvit_m5@img_size=512:m5.pth "
                        "blvit_base_tiny_patch16_224:runs/bt/checkpoints/best.pth")
    p.add_argument("--dense-checkpoint", help="DeiT file for bLViT/EViT/Evo-ViT/DynamicViT models given without a checkpoint")
    p.add_argument("--model-kwargs", help="JSON of timm.create_model arguments for every model, e.g. '{\"keep_ratio\": 0.5}'")
    p.add_argument("--img-size", type=int, help="input size (default: each model's own)")
    p.add_argument("--crop-pct", type=float, help="centre-crop fraction of the resized image for every model (default: "
                   "DeiT's 0.875 for DeiT and DeiT-based models, else each model's pretrained_cfg)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--workers", type=int, default=4, help="data-loading processes")
    p.add_argument("--max-images", type=int, help="evaluate only the first N images (quick checks)")
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast on GPU")
    p.add_argument("--out", type=Path, required=True, help="report JSON (a Markdown table and the top-1 / GFLOPs PNG go beside it)")
    p.set_defaults(func=cmd_imagenet)

    p = sub.add_parser("video", formatter_class=_ShowDefaults,
                       help="multi-view top-1/top-5, GFLOPs and clips/s of video classifiers (Kinetics lists), side by side")
    p.add_argument("--data", type=Path, required=True, help="root of the list file's video paths")
    p.add_argument("--list", default="val.csv", help="list file under --data ('<path> <label>' lines)")
    p.add_argument("--model", action="append", required=True,
                   help="NAME[@KEY=VALUE,...][:CHECKPOINT], repeatable, e.g. videomamba_small:videomamba_s16_k400_f8_res224.pth")
    p.add_argument("--num-frames", type=int, default=8, help="frames per clip (the model's num_frames)")
    p.add_argument("--clips", type=int, default=4, help="temporal clips per video")
    p.add_argument("--crops", type=int, default=3, choices=(1, 3), help="spatial crops per clip")
    p.add_argument("--img-size", type=int, default=224, help="side of the square crops (short side resized to it)")
    p.add_argument("--sampling", default="sparse", choices=("sparse", "dense"),
                   help="frame sampling: sparse (the released Kinetics_sparse) or dense (sampling rate 8)")
    p.add_argument("--batch-size", type=int, default=4, help="videos per forward pass (each with clips x crops views)")
    p.add_argument("--workers", type=int, default=4, help="data-loading processes")
    p.add_argument("--max-videos", type=int, help="evaluate only N videos (quick checks)")
    p.add_argument("--strict", action="store_true", help="stop at the first missing or undecodable video")
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast on GPU")
    p.add_argument("--out", type=Path, required=True, help="report JSON (a Markdown table goes beside it)")
    p.set_defaults(func=cmd_video)
    return parser


def run(argv: Optional[Sequence[str]] = None) -> Optional[Dict[str, Any]]:
    args = build_parser().parse_args(argv)
    if getattr(args, "clicks", 1) < 1:
        raise SystemExit("--clicks must be >= 1")
    if getattr(args, "points", 1) < 1:
        raise SystemExit("--points must be >= 1")
    return args.func(args)


def main(argv: Optional[Sequence[str]] = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        run(argv)
    except (AnnotationError, ResultsError, FileNotFoundError, ValueError) as err:
        print(f"blvit-eval: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
