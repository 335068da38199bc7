"""``blvit-eval video``: multi-view top-1 / top-5, GFLOPs and clips/s of video classifiers, side by side.

Each video is seen as ``clips x crops`` views (Kinetics: 4 x 3), the views' softmax probabilities
averaged (the released VideoMamba / R-MeeTo test, OpenGVLab/VideoMamba
videomamba/video_sm/engines/engine_for_finetuning.py ``merge``); the GFLOPs are those of one
view (multiply-accumulates, selective scans included) as the papers give them next to "x 4 x 3";
clips/s is views per second, the median batch after the first. A label outside the model's
classes is an error naming the list file and line.
"""
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch


def video_macs(model: torch.nn.Module) -> int:
    """Multiply-accumulates of one clip (scans counted analytically when the model has them)."""
    from blvit.mamba import videomamba_macs

    return videomamba_macs(model)["total"]


def run_video(data: Path, list_name: str, specs: Sequence[str], num_frames: int, clips: int, crops: int, img_size: int,
              sampling: str, batch_size: int, workers: int, max_videos: Optional[int], device: torch.device,
              amp: bool, strict: bool = False, world: int = 1, rank: int = 0) -> List[Dict[str, Any]]:
    """One row per model spec; under torchrun each rank evaluates every world-th video."""
    from blvit.data.imagenet import take_evenly
    from blvit.data.video import VideoClipDataset, read_video_list
    from blvit.train.classification import create_classifier

    from .imagenet import evaluate_classifier, parse_classifier_spec

    dataset = VideoClipDataset.from_list(Path(data) / list_name, data, strict=strict, num_frames=num_frames,
                                         img_size=img_size, training=False, test_clips=clips, test_crops=crops,
                                         sampling=sampling)
    dataset.samples = take_evenly(dataset.samples, max_videos)[rank::world]
    rows = []
    for spec in specs:
        label, name, kwargs, checkpoint = parse_classifier_spec(spec)
        model = create_classifier(name, dict({"num_frames": num_frames, "img_size": img_size}, **kwargs), None, checkpoint)
        # every label must be one of the model's outputs: an error naming the list file and line
        read_video_list(Path(data) / list_name, data, num_classes=model.num_classes)
        result = evaluate_classifier(model, dataset, device, amp, batch_size, workers, label, world)
        result["videos"], result["clips_per_s"] = result.pop("images"), result.pop("images_per_s")
        rows.append({"model": label, "checkpoint": checkpoint, **result, "views": f"{clips} x {crops}",
                     "gmacs_per_view": video_macs(model) / 1e9, "num_frames": num_frames, "input_size": img_size})
    return rows


def markdown_video_rows(rows: Sequence[Dict[str, Any]]) -> str:
    lines = ["| model | frames | views | top-1 | top-5 | GFLOPs per view | clips/s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['num_frames']} | {r['views']} | {r['top1']:.2f} | {r['top5']:.2f} "
                     f"| {r['gmacs_per_view']:.2f} | {r['clips_per_s']:.1f} |")
    return "\n".join(lines)
