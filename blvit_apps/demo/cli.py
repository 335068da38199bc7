"""``blvit-demo``: promptable segmentation with SAM or bLViT-SAM, from the command line or a local web page.

Examples::

    blvit-demo --point 200,150                            # the quick-start student on a held-out shapes image
    blvit-demo --sample astronaut --model vit_b --checkpoint sam_vit_b_01ec64.pth --point 250,130   # a photograph
    blvit-demo --image cat.jpg --box 40,30,300,280 --out overlay.png --json masks.json --routing
    blvit-demo --image cat.jpg --point 120,80 --point 200,90,0      # a positive and a negative click
    blvit-demo --image cat.jpg --everything --points-per-side 8
    blvit-demo --model vit_b --checkpoint sam_vit_b_01ec64.pth --image cat.jpg --point 120,80
    blvit-demo --serve                                    # http://127.0.0.1:7860

Without ``--checkpoint`` the model is the quick-start student that ``blvit-quickstart`` writes
(``runs/quickstart/student/checkpoints/best.pth`` under the current directory, or under
``$BLVIT_QUICKSTART_DIR``); if there is none, a randomly initialised model of that layout runs,
with a loud warning: its masks are meaningless. Coordinates are image pixels (x right, y down).
Bad input (not an image, a point outside the image, a reversed box, a malformed number) is a
one-line error and exit status 2.
"""
import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np

from .core import (PHOTO_NOTE, SAMPLE_IMAGES, DemoInputError, check_encodable, check_prompts, has_routing, load_demo_model, mask_record, parse_box,
                   parse_point, predict, routing_maps, sample_image)

PROG = "blvit-demo"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit status 2 (argparse's own status)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("image and prompts")
    src.add_argument("--image", type=Path, help="image file (default: a bundled image, see --sample)")
    src.add_argument("--sample", choices=SAMPLE_IMAGES, default="shapes",
                     help="bundled image used without --image: shapes (a held-out image of the quick start, "
                          "in its models' synthetic domain) or a photograph from scikit-image, which the quick-start "
                          "models cannot segment (default: %(default)s)")
    src.add_argument("--point", action="append", default=[], metavar="X,Y[,LABEL]",
                     help="a click in image pixels; label 1 positive (default) or 0 negative; repeatable")
    src.add_argument("--box", metavar="X0,Y0,X1,Y1", help="a box prompt in image pixels")
    src.add_argument("--everything", action="store_true",
                     help="segment everything (segment-anything's SamAutomaticMaskGenerator) instead of prompting")
    src.add_argument("--points-per-side", type=int, default=None,
                     help="--everything: grid of point prompts per side (default 8 on CPU, 32 on GPU)")
    src.add_argument("--pred-iou-thresh", type=float, default=0.88, help="--everything: keep masks above this predicted IoU")
    src.add_argument("--stability-thresh", type=float, default=0.95, help="--everything: keep masks above this stability")
    src.add_argument("--multimask", action="store_true", help="keep SAM's three masks for the prompt instead of the best one")
    mod = p.add_argument_group("model")
    mod.add_argument("--model", help="vit_b / vit_l / vit_h (stock SAM), dense_vit_b / _l / _h, b+t, h+b "
                                     "(default: what --checkpoint holds, or the quick-start student)")
    mod.add_argument("--checkpoint", help="an official SAM .pth or a checkpoint of this toolkit")
    mod.add_argument("--keep-ratio", type=float, default=None, help="bLViT: fraction of tokens the P-blocks process")
    mod.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    mod.add_argument("--backend", choices=["torch", "onnx"], default="torch",
                     help="onnx: run the files of blvit-export with onnxruntime (--onnx-dir), without PyTorch "
                          "in the inference path (prompted masks; not --everything / --serve / --routing)")
    mod.add_argument("--onnx-dir", type=Path, help="--backend onnx: a folder written by blvit-export")
    out = p.add_argument_group("output")
    out.add_argument("--out", type=Path, help="overlay PNG: image, masks, prompts, scores (default overlay.png "
                                              "when no --json is given)")
    out.add_argument("--json", type=Path, help="masks as COCO RLE (pycocotools) with scores")
    out.add_argument("--routing", action="store_true",
                     help="bLViT models: add a heat map per predictor layer of the tokens routed to the P-blocks")
    web = p.add_argument_group("web page")
    web.add_argument("--serve", action="store_true", help="serve the interactive page instead of running once")
    web.add_argument("--host", default="127.0.0.1", help="--serve: address to listen on (default loopback only)")
    web.add_argument("--port", type=int, default=7860, help="--serve: port (default 7860)")
    web.add_argument("--max-upload-mb", type=float, default=20.0, help="--serve: largest accepted upload")
    web.add_argument("--cache-size", type=int, default=8, help="--serve: image embeddings kept (LRU)")
    web.add_argument("--cache-mb", type=float, default=1024.0,
                     help="--serve: memory the kept images and embeddings may take (default 1024)")
    web.add_argument("--max-megapixels", type=float, default=36.0,
                     help="--serve: largest accepted image, in megapixels (default 36; larger uploads get 413)")
    web.add_argument("--install-web-runtime", action="store_true",
                     help="fetch onnxruntime-web from the npm registry (needs npm) so the page can run the mask "
                          "decoder in the browser, then exit")
    return p


def _device(name: Optional[str]):
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise DemoInputError(f"--device {name!r}: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DemoInputError(f"--device {name}: no CUDA device on this machine")
    return device


def _read_image(args: argparse.Namespace) -> np.ndarray:
    if args.image is None:
        return sample_image(args.sample)
    from blvit_deploy.images import read_image  # PIL only: the onnx backend stays torch-free

    if not args.image.is_file():
        raise DemoInputError(f"--image {args.image}: no such file")
    return read_image(args.image, exif_transpose=True)  # ValueError naming the file if it is not an image


def _check_args(args: argparse.Namespace) -> None:
    if args.everything and (args.point or args.box):
        raise DemoInputError("--everything segments the whole image: give it no --point / --box")
    if args.points_per_side is not None and args.points_per_side < 1:
        raise DemoInputError(f"--points-per-side {args.points_per_side}: must be at least 1")
    if args.keep_ratio is not None and not 0 < args.keep_ratio <= 1:
        raise DemoInputError(f"--keep-ratio {args.keep_ratio}: must be in (0, 1]")
    if args.serve and not 0 <= args.port < 65536:
        raise DemoInputError(f"--port {args.port}: must be in 0..65535")
    if args.serve and args.max_upload_mb <= 0:
        raise DemoInputError(f"--max-upload-mb {args.max_upload_mb}: must be positive")
    if args.serve and args.cache_size < 1:
        raise DemoInputError(f"--cache-size {args.cache_size}: must be at least 1")
    for flag, value in (("--cache-mb", args.cache_mb), ("--max-megapixels", args.max_megapixels)):
        if args.serve and not value > 0:
            raise DemoInputError(f"{flag} {value}: must be positive")


def _everything(sam, image: np.ndarray, args: argparse.Namespace, device) -> Dict[str, Any]:
    from segment_anything import SamAutomaticMaskGenerator

    check_encodable(image, sam.image_encoder.img_size)

    points = args.points_per_side or (32 if device.type == "cuda" else 8)
    generator = SamAutomaticMaskGenerator(sam, points_per_side=points, pred_iou_thresh=args.pred_iou_thresh,
                                          stability_score_thresh=args.stability_thresh)
    start = time.perf_counter()
    found = sorted(generator.generate(image), key=lambda r: -r["area"])
    seconds = time.perf_counter() - start
    masks = [r["segmentation"].astype(bool) for r in found]
    scores = [float(r["predicted_iou"]) for r in found]
    records = [mask_record(m, s, stability_score=float(r["stability_score"]), point_coords=r["point_coords"])
               for m, s, r in zip(masks, scores, found)]
    print(f"segment everything ({points}x{points} points): {len(masks)} masks in {seconds * 1000:.0f} ms")
    if not masks:
        print(_dropped_by_thresholds(sam, image, points, args))
    return {"masks": masks, "scores": scores, "records": records, "input_size": generator.predictor.input_size,
            "timing": {"everything_ms": seconds * 1000}, "prompts": {"everything": {"points_per_side": points}}}


def _dropped_by_thresholds(sam, image: np.ndarray, points: int, args: argparse.Namespace) -> str:
    """Why --everything kept nothing: the candidates without the two quality thresholds, and how
    many of them each threshold removes (a second pass; run only when nothing was kept)."""
    from segment_anything import SamAutomaticMaskGenerator

    loose = SamAutomaticMaskGenerator(sam, points_per_side=points, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    found = loose.generate(image)
    below_iou = sum(r["predicted_iou"] < args.pred_iou_thresh for r in found)
    below_stability = sum(r["stability_score"] < args.stability_thresh for r in found)
    best = max((r["predicted_iou"] for r in found), default=float("nan"))
    why = (f"  without the thresholds {len(found)} candidate masks: {below_iou} have predicted IoU below "
           f"--pred-iou-thresh {args.pred_iou_thresh} (highest {best:.3f}), {below_stability} stability below "
           f"--stability-thresh {args.stability_thresh}; lower them to keep some")
    if args.checkpoint is None and args.model is None:  # the quick-start student (docs/method.md, "What more minutes")
        why += ("\n  the 5-minute quick-start models rarely pass SAM's thresholds; lower them, or train longer: the "
                "models of `blvit-quickstart --train-images 1600 --teacher-epochs 12 --student-epochs 2` (about 19 "
                "minutes on 2 CPU cores) pass them for 25 (student) to 37 (teacher) of the 87 held-out objects")
    return why


def _prompted(sam, image: np.ndarray, coords, labels, box, args: argparse.Namespace) -> Dict[str, Any]:
    if args.backend == "onnx":
        predictor = sam  # an OnnxSamPredictor: SamPredictor's set_image / predict / input_size
    else:
        from segment_anything import SamPredictor

        predictor = SamPredictor(sam)
    check_encodable(image, predictor.img_size if args.backend == "onnx" else predictor.transform.target_length)
    start = time.perf_counter()
    predictor.set_image(image)
    encoder_s = time.perf_counter() - start
    start = time.perf_counter()
    masks, scores = predict(predictor, coords, labels, box, args.multimask)
    decoder_s = time.perf_counter() - start
    print(f"encoder {encoder_s * 1000:.0f} ms, decoder {decoder_s * 1000:.0f} ms; "
          f"{len(masks)} mask(s), predicted IoU {', '.join(f'{s:.3f}' for s in scores)}")
    prompts: Dict[str, Any] = {}
    if coords is not None:
        prompts.update(points=coords.tolist(), labels=labels.tolist())
    if box is not None:
        prompts["box"] = box.tolist()
    return {"masks": list(masks), "scores": list(scores), "records": [mask_record(m, s) for m, s in zip(masks, scores)],
            "input_size": predictor.input_size, "prompts": prompts,
            "timing": {"encoder_ms": encoder_s * 1000, "decoder_ms": decoder_s * 1000}}


def run(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Parse, check, segment, write; returns the JSON report. Bad input (including a bad --model /
    --checkpoint) raises ``DemoInputError``, which ``main`` prints on one line with exit status 2."""
    args = build_parser().parse_args(argv)
    return _run(args)


def _inputs(args: argparse.Namespace):
    """Everything that can fail because of the user's input, before any model runs."""
    _check_args(args)
    points = [parse_point(text) for text in args.point]
    box = parse_box(args.box) if args.box else None
    device = _device(args.device) if args.backend == "torch" else None
    if args.serve:
        return device, None, None, None, None
    image = _read_image(args)
    height, width = image.shape[:2]
    coords = labels = box_arr = None
    if not args.everything:
        if not points and box is None:
            points = [(width / 2, height / 2, 1)]
            print(f"no --point / --box / --everything: prompting with a positive point at the image centre "
                  f"({width / 2:g}, {height / 2:g})")
        coords, labels, box_arr = check_prompts([p[:2] for p in points], [p[2] for p in points], box, width, height)
    return device, image, coords, labels, box_arr


def _load(args: argparse.Namespace):
    from blvit.utils.io import CheckpointError

    try:
        return load_demo_model(args.model, args.checkpoint, args.keep_ratio)
    except (CheckpointError, FileNotFoundError, ValueError) as err:  # a bad --model / --checkpoint
        raise err if isinstance(err, DemoInputError) else DemoInputError(str(err)) from err


def _load_onnx(args: argparse.Namespace):
    """--backend onnx: the exported files through blvit_deploy (numpy, OpenCV, onnxruntime)."""
    if args.onnx_dir is None:
        raise DemoInputError("--backend onnx needs --onnx-dir (a folder written by blvit-export)")
    unsupported = [flag for flag, on in (("--everything", args.everything), ("--serve", args.serve),
                                         ("--routing", args.routing), ("--model", args.model),
                                         ("--checkpoint", args.checkpoint)) if on]
    if unsupported:
        raise DemoInputError(f"--backend onnx runs exported files for prompted masks; drop {', '.join(unsupported)}")
    from blvit_deploy import OnnxSamPredictor

    try:
        predictor = OnnxSamPredictor(args.onnx_dir)
    except FileNotFoundError as err:
        raise DemoInputError(str(err)) from err
    meta = predictor.meta
    info = {"model": f"onnx:{args.onnx_dir}", "encoder": "onnxruntime (blvit-export of "
            f"{meta['model'].get('model')})", "img_size": predictor.img_size,
            "checkpoint": meta["model"].get("checkpoint"), "random": meta["model"].get("checkpoint") is None}
    return predictor, info


def _run(args: argparse.Namespace) -> Dict[str, Any]:
    if args.install_web_runtime:
        from . import web_runtime

        try:
            folder = web_runtime.install()
        except web_runtime.WebRuntimeError as err:
            raise DemoInputError(str(err)) from err
        print(f"onnxruntime-web {web_runtime.VERSION} in {folder}: blvit-demo --serve offers the in-browser decoder")
        return {"web_runtime": str(folder)}
    try:
        device, image, coords, labels, box_arr = _inputs(args)
    except (FileNotFoundError, ValueError) as err:  # read_image's "not a readable image" is a ValueError
        raise err if isinstance(err, DemoInputError) else DemoInputError(str(err)) from err
    if args.backend == "onnx":
        sam, info = _load_onnx(args)
    else:
        sam, info = _load(args)
        sam = sam.to(device)
    if args.serve:
        from .server import serve

        serve(sam, info, host=args.host, port=args.port, max_upload_mb=args.max_upload_mb, cache_size=args.cache_size,
              max_megapixels=args.max_megapixels, cache_mb=args.cache_mb)
        return {}
    height, width = image.shape[:2]
    print(f"model: {info.get('model')} ({info.get('encoder')}, {info.get('img_size')} px input), "
          f"checkpoint: {info.get('checkpoint') or 'NONE (random weights)'}")
    routing = args.routing and has_routing(sam)
    if args.routing and not routing:
        print(f"--routing: {info.get('model')} has no token predictors (not a bLViT encoder); no routing maps drawn",
              file=sys.stderr)
    if routing:
        sam.image_encoder.record_selections = True
    if args.everything:
        result = _everything(sam, image, args, device)
    else:
        result = _prompted(sam, image, coords, labels, box_arr, args)
    maps, titles = routing_maps(sam) if routing else ([], [])
    if args.image is None and args.sample != "shapes" and info.get("source") == "quick-start student":
        print(PHOTO_NOTE, file=sys.stderr)
    image_name = str(args.image) if args.image else (
        "shapes (quick-start held-out image 000001000002.jpg)" if args.sample == "shapes" else f"skimage.data.{args.sample}()")
    report = {"image": image_name, "width": width,
              "height": height, "model": info, "prompts": result["prompts"], "timing": result["timing"],
              "masks": result["records"]}
    out = args.out if args.out is not None or args.json is not None else Path("overlay.png")
    if out is not None:
        from blvit_deploy.viz import save_overlay

        shown = result["scores"][:10]
        save_overlay(out, image, result["masks"], shown, points=coords, labels=labels, box=box_arr, routing=maps,
                     routing_titles=titles, input_size=result["input_size"])
        report["overlay"] = str(out)
        print(f"wrote {out}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json} ({len(report['masks'])} masks, COCO RLE)")
    if info.get("random"):
        print("WARNING: the model is RANDOMLY INITIALISED: these masks are meaningless", file=sys.stderr)
    return report


def main(argv: Optional[Sequence[str]] = None) -> None:
    try:
        run(argv)
    except DemoInputError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
