"""The README's main job: build bLViT-SAM, segment a real photo, compare encoder FLOPs."""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from segment_anything import SamPredictor

from blvit.viz import save_overlay, selection_map

from .build import build_sam_blvit
from .flops_cli import flops_rows, markdown_table


def sample_photo() -> np.ndarray:
    """scikit-image's 'astronaut' (NASA, public domain), shipped inside the package."""
    from skimage import data

    return data.astronaut()


def run(argv=None) -> dict:
    """Run the quick start; returns the report it writes."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variant", default="b+t", choices=["b+t", "h+b"])
    parser.add_argument("--keep-ratio", type=float, default=0.25)
    parser.add_argument("--sam-checkpoint", help="official SAM .pth initialising the P-blocks")
    parser.add_argument("--checkpoint", help="bLViT-SAM checkpoint of this toolkit")
    parser.add_argument("--out", type=Path, default=Path("outputs/quickstart"))
    parser.add_argument("--point", default="250,130", help="x,y of a positive click (default: the face)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    sam = build_sam_blvit(args.variant, checkpoint=args.checkpoint, sam_checkpoint=args.sam_checkpoint,
                          keep_ratio=args.keep_ratio)
    if args.checkpoint is None and args.sam_checkpoint is None:
        print("NOTE: no checkpoint given: the model is randomly initialised, so its masks are meaningless; "
              "this run shows the pipeline and the cost. Pass --sam-checkpoint sam_vit_b_01ec64.pth for real weights.")
    image = sample_photo()
    predictor = SamPredictor(sam)
    sam.image_encoder.record_selections = True  # keep where the predictors routed tokens
    start = time.perf_counter()
    predictor.set_image(image)
    encode_s = time.perf_counter() - start
    point = np.array([[float(v) for v in args.point.split(",")]])
    masks, scores, _ = predictor.predict(point_coords=point, point_labels=np.array([1]), multimask_output=True)
    best = int(np.argmax(scores))

    grid = sam.image_encoder.config.grid_size
    maps = [selection_map(s.flat_index[0].numpy(), s.valid[0].numpy(), grid) for s in sam.image_encoder.last_selections.values()]
    titles = [f"P-block tokens from layer {i}" for i in sam.image_encoder.last_selections]
    overlay = save_overlay(args.out / "overlay.png", image, [masks[best]], [float(scores[best])], point,
                           routing=maps, routing_titles=titles, input_size=predictor.input_size)

    rows = flops_rows(("b+t", "h+b"), args.keep_ratio)
    table = markdown_table(rows)
    report = dict(variant=args.variant, keep_ratio=args.keep_ratio, image_shape=list(image.shape),
                  mask_area=int(masks[best].sum()), score=float(scores[best]),
                  encode_seconds_cpu=round(encode_s, 2), flops=rows, overlay=str(overlay))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    (args.out / "flops.md").write_text(table + "\n")
    print(f"bLViT-SAM {args.variant} (keep {args.keep_ratio}) on the astronaut photo {image.shape[1]}x{image.shape[0]}: "
          f"encoder {encode_s:.1f} s on {torch.get_num_threads()} CPU threads, best mask {report['mask_area']} px "
          f"(predicted IoU {report['score']:.2f})")
    print(table)
    print(f"wrote {overlay}, {args.out / 'report.json'}, {args.out / 'flops.md'}")
    return report


def main(argv=None) -> None:
    run(argv)


if __name__ == "__main__":
    main()
