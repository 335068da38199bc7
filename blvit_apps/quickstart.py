"""The README's main job (``blvit-quickstart``), end to end on built-in data, on a CPU in minutes:

1. writes the synthetic SA-1B / COCO / LVIS data if it is missing (``blvit-synthetic``);
2. trains a small dense SAM teacher on it (``configs/sam/quickstart_teacher.yaml``);
3. distils a bLViT student from that teacher (``configs/sam/quickstart.yaml``), its P-blocks,
   prompt encoder and mask decoder initialised from the teacher;
4. segments a held-out image with the student and draws the tokens its predictors routed;
5. evaluates teacher and student on the held-out split with ``blvit-eval`` (box and 1/3-click
   mIoU, instance AP with ground-truth boxes as the detector) and prints one table;
6. prints the encoder FLOPs of full-size dense SAM and bLViT-SAM, and where the checkpoints went.

Each training resumes from its own checkpoints, so a second run only redoes what is missing,
and runs over two CPU processes (``torch.distributed.run``, DDP over gloo) where there are two
cores (``--processes``): the recipe's batch is split between them, so the optimisation is the
one-process one at 1.36x the images per second.
"""
import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from segment_anything import SamPredictor

from blvit.data.make_synthetic import DEFAULT_TRAIN_IMAGES, ensure_synthetic
from blvit_deploy.viz import save_overlay, selection_map

from sam_adapter.build import build_sam_from_checkpoint
from .flops_cli import flops_rows, markdown_table

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "sam"
logger = logging.getLogger("blvit.quickstart")


TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "train.py"


def default_processes() -> int:
    """Training processes for this machine: 2 where there are at least 2 CPU cores. The tiny
    models' steps are many small kernels that a second thread barely speeds up, so two one-thread
    processes (DDP over gloo) train 1.36x the images per second of one two-thread process on the
    2-core reference machine (200 teacher steps: 2 x 4 images in 62 s against 4 in 42 s)."""
    return 2 if (os.cpu_count() or 1) >= 2 else 1


def _train(config: Path, overrides: List[str], processes: int = 1) -> Dict[str, Any]:
    """Train ``config`` with ``overrides`` in this process, or over ``processes`` CPU processes
    launched by ``torch.distributed.run`` (the way tools/train.py runs on GPU nodes). The recipe's
    batch is split over the processes (``train.global_batch``), so both give the same optimisation."""
    from blvit.train.config import load_config

    cfg = load_config(config, overrides)  # a bad override fails here, before any process starts
    # resume only what an earlier run left (a first run would otherwise warn that nothing is there)
    started = (Path(cfg["output_dir"]) / "checkpoints" / "latest.txt").exists()
    t = cfg["train"]
    if processes > 1 and t["batch_size"] % processes:
        logger.info("train.batch_size=%d does not split over %d processes: training in this process",
                    t["batch_size"], processes)
        processes = 1
    if processes <= 1:
        from sam_adapter.trainer import train

        return train(cfg, resume=started)
    threads = max(1, (os.cpu_count() or processes) // processes)
    split = [f"train.global_batch={t['global_batch'] or t['batch_size'] * t['accumulate']}",
             f"train.batch_size={t['batch_size'] // processes}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
           str(TRAIN_SCRIPT), "--config", str(config), *overrides, *split, *(["--resume"] if started else [])]
    done = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS=str(threads)), stdout=subprocess.DEVNULL)
    if done.returncode:
        raise SystemExit(f"training {config.name} over {processes} processes failed (exit {done.returncode}); "
                         f"its log is above; rerun with --processes 1 to train in this process")
    return json.loads((Path(cfg["output_dir"]) / "summary.json").read_text())


class Laps:
    """``lap()`` -> "[N s]": the seconds since the previous call (or since construction)."""

    def __init__(self) -> None:
        self.last = time.perf_counter()

    def __call__(self) -> str:
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        return f"[{seconds:.0f} s]"


def _epochs(epochs: Optional[int]) -> List[str]:
    """The override for --teacher-epochs / --student-epochs; none keeps the config's own."""
    return [] if epochs is None else [f"train.epochs={epochs}"]


def demo_overlay(checkpoint: Path, heldout_coco: Path, images_dir: Path, out: Path) -> Dict[str, Any]:
    """Box-prompt the first object of the first held-out image; one PNG with the routing maps."""
    annotations = json.loads(Path(heldout_coco).read_text())
    image_record = annotations["images"][0]
    ann = next(a for a in annotations["annotations"] if a["image_id"] == image_record["id"])
    image = np.asarray(Image.open(images_dir / image_record["file_name"]).convert("RGB"))
    sam = build_sam_from_checkpoint(checkpoint)
    predictor = SamPredictor(sam)
    sam.image_encoder.record_selections = True
    predictor.set_image(image)
    x, y, w, h = ann["bbox"]
    box = np.array([x, y, x + w, y + h])
    masks, scores, _ = predictor.predict(box=box, multimask_output=False)
    grid = sam.image_encoder.config.grid_size
    selections = sam.image_encoder.last_selections
    maps = [selection_map(s.flat_index[0].numpy(), s.valid[0].numpy() if s.valid is not None else None, grid)
            for s in selections.values()]
    titles = [f"P-block tokens from layer {i}" for i in selections]
    path = save_overlay(out / "overlay.png", image, [masks[0]], [float(scores[0])], box=box, routing=maps,
                        routing_titles=titles, input_size=predictor.input_size)
    from pycocotools import mask as mask_utils

    gt = mask_utils.decode(ann["segmentation"]).astype(bool)
    iou = float((gt & masks[0]).sum() / max(1, (gt | masks[0]).sum()))
    return {"overlay": str(path), "image": image_record["file_name"], "box": box.tolist(), "iou": iou,
            "predicted_iou": float(scores[0])}


def evaluate(models: Dict[str, Path], data: Dict[str, Any], out: Path) -> Tuple[List[Dict[str, Any]], str]:
    """blvit-eval on the held-out split for each model, one row each, and a last row for the
    trivial baseline every box-prompted model must beat (each object's ground-truth box, filled)."""
    from eval.baselines import filled_box
    from eval.cli import run as eval_run

    lvis = json.loads(Path(data["heldout_lvis"]).read_text())
    out.mkdir(parents=True, exist_ok=True)
    detections = out / "gt_box_detections.json"  # a perfect detector: ground-truth boxes, score 1
    detections.write_text(json.dumps([{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
                                       "score": 1.0} for a in lvis["annotations"]]))
    rows = []
    for name, (model, checkpoint) in models.items():
        slug = name.split()[-1]
        common = ["--images", data["heldout_images"], "--model", model, "--checkpoint", str(checkpoint)]
        box = eval_run(["prompts", "--annotations", data["heldout_coco"], *common, "--prompt", "box",
                        "--out", str(out / f"{slug}_box.json"), "--vis", "2"])
        point = eval_run(["prompts", "--annotations", data["heldout_coco"], *common, "--prompt", "point", "--clicks", "3",
                          "--out", str(out / f"{slug}_point.json")])
        inst = eval_run(["instances", "--annotations", data["heldout_lvis"], *common, "--detections", str(detections),
                         "--out", str(out / f"{slug}_instances.json")])
        rows.append({"model": name, "box_mIoU": box["mIoU"], "1click_mIoU": point["mIoU@1click"],
                     "3click_mIoU": point["mIoU@3click"], "AP_gt_boxes": inst["AP"], "encoder_gmacs": box["encoder_gmacs"],
                     "images_per_s": box["images_per_s"]})
    baseline = filled_box(data["heldout_lvis"])
    rows.append({"model": "filled GT box (no model)", "box_mIoU": baseline["mIoU"], "1click_mIoU": None,
                 "3click_mIoU": None, "AP_gt_boxes": baseline["AP"], "encoder_gmacs": None, "images_per_s": None})
    fmt = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
    lines = ["| model (256 px, CPU) | box mIoU | 1-click mIoU | 3-click mIoU | LVIS-format AP (GT boxes) | encoder GMACs | img/s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {fmt(r['box_mIoU'], '.3f')} | {fmt(r['1click_mIoU'], '.3f')} | "
                     f"{fmt(r['3click_mIoU'], '.3f')} | {fmt(r['AP_gt_boxes'], '.3f')} | {fmt(r['encoder_gmacs'], '.3f')} | "
                     f"{fmt(r['images_per_s'], '.1f')} |")
    return rows, "\n".join(lines)


def run(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Run the quick start; returns the report it writes."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("data/synthetic"), help="synthetic data folder")
    parser.add_argument("--runs", type=Path, default=Path("runs/quickstart"), help="teacher/ and student/ go here")
    parser.add_argument("--out", type=Path, default=Path("outputs/quickstart"), help="report, overlay, tables")
    parser.add_argument("--train-images", type=int, default=DEFAULT_TRAIN_IMAGES, help="synthetic SA-1B training images (default: %(default)s)")
    parser.add_argument("--teacher-epochs", type=int, help="dense teacher: epochs over the training images "
                                                          "(default: train.epochs of quickstart_teacher.yaml)")
    parser.add_argument("--student-epochs", type=int, help="bLViT student: epochs of distillation "
                                                          "(default: train.epochs of quickstart.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="a config override for both trainings, as tools/train.py takes it (repeatable), "
                             "e.g. --set data.mask_size=input")
    parser.add_argument("--processes", type=int, default=default_processes(),
                        help="training processes (DDP over gloo, one share of the CPU cores each; default: "
                             "%(default)s here); 1 trains in this process")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    lap = Laps()
    data = ensure_synthetic(args.data, train=args.train_images)
    print(f"[1/5] synthetic data in {args.data}: SA-1B train/val, held-out COCO + LVIS {lap()}")
    common = [f"data.root={data['sa1b_train']}", f"data.val_root={data['sa1b_val']}", *args.overrides]
    teacher = _train(CONFIGS / "quickstart_teacher.yaml",
                     common + [f"output_dir={args.runs / 'teacher'}", *_epochs(args.teacher_epochs)], args.processes)
    teacher_ckpt = Path(teacher["best_checkpoint"])
    print(f"[2/5] dense teacher: {teacher_ckpt} (validation box mIoU {teacher['validation'].get('val_box_miou', float('nan')):.3f}) {lap()}")
    student = _train(CONFIGS / "quickstart.yaml",
                     common + [f"output_dir={args.runs / 'student'}", *_epochs(args.student_epochs),
                               f"teacher.checkpoint={teacher_ckpt}", f"model.sam_checkpoint={teacher_ckpt}"],
                     args.processes)
    student_ckpt = Path(student["best_checkpoint"])
    print(f"[3/5] bLViT student: {student_ckpt} (validation box mIoU {student['validation'].get('val_box_miou', float('nan')):.3f}) {lap()}")

    args.out.mkdir(parents=True, exist_ok=True)
    overlay = demo_overlay(student_ckpt, Path(data["heldout_coco"]), Path(data["heldout_images"]), args.out)
    print(f"[4/5] held-out box prompt on {overlay['image']}: IoU {overlay['iou']:.3f}; wrote {overlay['overlay']} {lap()}")
    eval_rows, eval_table = evaluate({"dense teacher": ("dense_vit_b", teacher_ckpt), "bLViT student": ("b+t", student_ckpt)},
                                     data, args.out / "eval")
    (args.out / "eval.md").write_text(eval_table + "\n")
    print(f"[5/5] held-out evaluation (blvit-eval; reports in {args.out / 'eval'}) {lap()}:\n" + eval_table)
    rows = flops_rows(("b+t", "h+b"), 0.25)
    table = markdown_table(rows)
    report = {"data": data, "teacher": teacher, "student": student, "overlay": overlay, "evaluation": eval_rows,
              "flops_1024": rows}
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    (args.out / "flops.md").write_text(table + "\n")
    print("\nEncoder cost at 1024 x 1024 (full-size models):\n" + table)
    print(f"\ncheckpoints:\n  teacher {teacher_ckpt}\n  student {student_ckpt}\nreport: {args.out / 'report.json'}")
    return report


def main(argv: Optional[Sequence[str]] = None) -> None:
    run(argv)


if __name__ == "__main__":
    main()
