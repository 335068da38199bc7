"""What the demo's command line and web page share: picking the model, the bundled image,
checking prompts, running the predictor, and turning masks into PNG / COCO RLE."""
import io
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from blvit_deploy.images import resize_longest_side, to_rgb

QUICKSTART_ENV = "BLVIT_QUICKSTART_DIR"
QUICKSTART_RUNS = Path("runs/quickstart")  # the quick start's default --runs, relative to the current directory
STUDENT_CHECKPOINT = Path("student/checkpoints/best.pth")
RANDOM_WARNING = ("RANDOMLY INITIALISED model: no --checkpoint and no quick-start checkpoint at {path} "
                  "(run `blvit-quickstart` first, or pass --checkpoint / set {env}); THE MASKS WILL BE MEANINGLESS")
# "shapes": an image of the quick start's held-out split (synthetic shapes, rendered on the fly:
# the second, two objects side by side), where the quick-start models are in their domain; the
# photographs ship with scikit-image.
SAMPLE_IMAGES = ("shapes", "astronaut", "coffee")
PHOTO_NOTE = ("note: the quick-start models were trained for minutes on synthetic shapes only; they cannot segment "
              "a photograph. For photos pass an official SAM file (--checkpoint sam_vit_b_01ec64.pth) or a model "
              "trained on SA-1B.")


class DemoInputError(ValueError):
    """Bad input from the user (a file that is not an image, a point outside the image, ...):
    the command line prints it on one line and exits with status 2; the server answers 4xx."""


class ImageTooLarge(DemoInputError):
    """An image with more pixels than allowed (the server answers 413)."""


def quickstart_checkpoint() -> Path:
    """Where the README's main job (``blvit-quickstart``) writes the bLViT student's checkpoint:
    ``$BLVIT_QUICKSTART_DIR/student/checkpoints/best.pth``, by default under ``runs/quickstart``
    of the current directory."""
    return Path(os.environ.get(QUICKSTART_ENV) or QUICKSTART_RUNS) / STUDENT_CHECKPOINT


def _quickstart_layout_random(keep_ratio: Optional[float] = None):
    """A randomly initialised model in the quick start's student layout (``configs/sam/quickstart.yaml``;
    small and fast on a CPU), or the full-size b+t where that file is not installed."""
    from sam_adapter.build import build_sam_blvit
    from blvit_apps.quickstart import CONFIGS

    config = CONFIGS / "quickstart.yaml"
    if config.is_file():
        from blvit.train.config import load_config

        m = load_config(config)["model"]
        sam = build_sam_blvit(m["variant"], keep_ratio=keep_ratio or m["keep_ratio"], **m["overrides"])
        return sam, {"model": m["variant"], "layout": f"quick-start student layout ({config.name})"}
    sam = build_sam_blvit("b+t", keep_ratio=keep_ratio or 0.25)
    return sam, {"model": "b+t", "layout": "b+t (full size)"}


def _sniff(checkpoint: Path) -> Dict[str, Any]:
    """Enough of a checkpoint to tell its kind (memory-mapped where the file allows)."""
    import torch

    from blvit.utils.io import read_checkpoint

    try:
        return dict(torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True))
    except Exception:  # legacy (non-zip) files cannot be memory-mapped; read_checkpoint gives the clear errors
        return read_checkpoint(checkpoint)


def _stock_type(state: Dict[str, Any]) -> Optional[str]:
    """vit_b / vit_l / vit_h from an official SAM state dict's encoder width."""
    from blvit.utils.io import unwrap_state_dict

    try:
        pos = unwrap_state_dict(state, "").get("image_encoder.pos_embed")
    except ValueError:
        return None
    return {768: "vit_b", 1024: "vit_l", 1280: "vit_h"}.get(int(pos.shape[-1])) if pos is not None else None


def load_demo_model(model: Optional[str] = None, checkpoint: Optional[str] = None,
                    keep_ratio: Optional[float] = None) -> Tuple[Any, Dict[str, Any]]:
    """The demo's ``(sam, info)``.

    - ``--model`` (with or without ``--checkpoint``): ``eval.sam_eval.load_sam_model``, exactly
      as ``blvit-eval`` builds it (no checkpoint: random weights, with its loud warning).
    - only ``--checkpoint``: a checkpoint of this toolkit goes to
      ``sam_adapter.build.build_sam_from_checkpoint``; an official SAM file to the stock model
      of its width (vit_b / vit_l / vit_h).
    - neither: the quick-start student (:func:`quickstart_checkpoint`) if it exists, otherwise a
      randomly initialised model of its layout, with a loud warning (``info["random"]``).
    """
    from sam_adapter.checkpoint import FORMAT

    if model is not None:
        from eval.sam_eval import load_sam_model

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sam, info = load_sam_model(model, checkpoint, keep_ratio)
        for w in caught:
            print(f"WARNING: {w.message}", file=sys.stderr)
        info["random"] = checkpoint is None
        return sam.eval(), info
    if checkpoint is None:
        path = quickstart_checkpoint()
        if path.is_file():
            checkpoint, source = str(path), "quick-start student"
        else:
            message = RANDOM_WARNING.format(path=path, env=QUICKSTART_ENV)
            print("\n" + "!" * 100 + f"\nWARNING: {message}\n" + "!" * 100 + "\n", file=sys.stderr)
            sam, info = _quickstart_layout_random(keep_ratio)
            info.update(checkpoint=None, random=True, warning=message)
            return _describe(sam.eval(), info)
    else:
        source = "--checkpoint"
    state = _sniff(Path(checkpoint))
    if state.get("format") == FORMAT:
        from sam_adapter.build import build_sam_from_checkpoint

        sam = build_sam_from_checkpoint(checkpoint, keep_ratio)
        config = sam.image_encoder.config
        # a dense checkpoint of this toolkit is the --model dense_* encoder, not segment-anything's vit_*
        name = f"dense_{config.name}" if config.is_dense and not config.name.startswith("dense_") else config.name
        info = {"model": name, "layout": config.name, "dense": bool(config.is_dense)}
    else:
        stock = _stock_type(state)
        if stock is None:
            raise DemoInputError(f"{checkpoint}: neither a checkpoint of this toolkit nor an official SAM file of a "
                                 "known width; pass --model to say what it is")
        from sam_adapter.build import build_sam_stock

        sam, info = build_sam_stock(stock, checkpoint), {"model": stock}
    del state
    info.update(checkpoint=str(checkpoint), source=source, random=False)
    return _describe(sam.eval(), info)


def _describe(sam, info: Dict[str, Any]) -> Tuple[Any, Dict[str, Any]]:
    encoder = sam.image_encoder
    info.update(encoder=type(encoder).__name__, img_size=int(encoder.img_size))
    if hasattr(encoder, "config"):
        info.update(layout=info.get("layout") or encoder.config.name, keep_ratio=encoder.config.keep_ratio)
    return sam, info


def has_routing(sam) -> bool:
    """Whether the model's encoder routes or reduces tokens (a bLViT encoder with predictor layers,
    or an EViT / Evo-ViT / ToMe encoder)."""
    config = getattr(sam.image_encoder, "config", None)
    return config is not None and (bool(getattr(config, "predictor_layers", ())) or bool(getattr(config, "reduction", "")))


def routing_maps(sam) -> Tuple[List[np.ndarray], List[str]]:
    """After an image was encoded with ``sam.image_encoder.record_selections = True``: one
    (grid, grid) 0/1 map per predictor layer of the tokens routed to the P-blocks."""
    from blvit_deploy.viz import selection_map

    encoder = sam.image_encoder
    grid = encoder.config.grid_size
    maps, titles = [], []
    reduction = getattr(encoder.config, "reduction", "")
    what = {"evit": "tokens kept", "evovit": "slow tokens", "tome": "merged-token positions"}.get(reduction)
    for layer, s in encoder.last_selections.items():
        if reduction:  # (B, N) bool: grid positions the layer processes
            maps.append(s[0].view(grid, grid).float().cpu().numpy())
            titles.append(f"{what} at layer {layer}")
            continue
        valid = s.valid[0].cpu().numpy() if s.valid is not None else None
        maps.append(selection_map(s.flat_index[0].cpu().numpy(), valid, grid))
        titles.append(f"P-block tokens from layer {layer}")
    return maps, titles


# The quick start's second held-out image, the very file blvit-synthetic writes (a test checks
# the bytes against the generator), bundled so that no sample needs torch (the onnx backend).
SHAPES_FILE = Path(__file__).resolve().parent / "static" / "heldout_000001000002.jpg"


def sample_image(name: str = "shapes") -> np.ndarray:
    """A bundled image, no download: ``shapes`` (the quick start's second held-out image, the
    synthetic domain its models were trained on) or a photograph that ships with scikit-image
    (``astronaut``, ``coffee``)."""
    if name not in SAMPLE_IMAGES:
        raise DemoInputError(f"unknown sample image {name!r}; choose one of {', '.join(SAMPLE_IMAGES)}")
    if name == "shapes":
        with Image.open(SHAPES_FILE) as im:
            return np.asarray(im.convert("RGB"))
    from skimage import data

    return np.ascontiguousarray(getattr(data, name)()[..., :3])


def decode_image(payload: bytes, name: str = "upload", max_pixels: Optional[int] = None) -> np.ndarray:
    """(H, W, 3) uint8 RGB from an image file's bytes; DemoInputError if it is not an image,
    ImageTooLarge (before decoding: the header gives the size) if it has more than ``max_pixels``."""
    if not payload:
        raise DemoInputError(f"{name}: empty file, not an image")
    try:
        with Image.open(io.BytesIO(payload)) as im:
            if max_pixels is not None and im.width * im.height > max_pixels:
                raise ImageTooLarge(f"{name}: {im.width}x{im.height} is {im.width * im.height / 1e6:.1f} megapixels; "
                                    f"the limit is {max_pixels / 1e6:g} (blvit-demo --serve --max-megapixels)")
            image = to_rgb(im, exif_transpose=True)
    except ImageTooLarge:
        raise
    except Image.DecompressionBombError as err:
        raise ImageTooLarge(f"{name}: image too large ({err})") from err
    except UnidentifiedImageError as err:
        raise DemoInputError(f"{name}: not a readable image (unknown or damaged image format)") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise DemoInputError(f"{name}: not a readable image ({err})") from err
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise DemoInputError(f"{name}: image has no pixels")
    return image


def check_encodable(image: np.ndarray, img_size: int) -> None:
    """DemoInputError if resizing the long side to the model's ``img_size`` (SAM's
    ResizeLongestSide) would leave the short side no pixel (a 1 x 600 strip at 256 px)."""
    h, w = image.shape[:2]
    if min(resize_longest_side(h, w, img_size)) < 1:
        raise DemoInputError(f"image {w}x{h} is too thin for the model's {img_size}-pixel input: its short side "
                             f"would be resized to 0 pixels (crop or pad it to a wider aspect ratio)")


def _number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise DemoInputError(f"{what}: {text.strip()!r} is not a number") from None
    if not math.isfinite(value):
        raise DemoInputError(f"{what}: {text.strip()!r} is not a finite number")
    return value


def parse_point(text: str) -> Tuple[float, float, int]:
    """'x,y' or 'x,y,label' (label 1 positive, 0 negative) -> (x, y, label)."""
    parts = text.split(",")
    if len(parts) not in (2, 3):
        raise DemoInputError(f"--point {text!r}: expected x,y or x,y,label")
    x, y = (_number(p, f"--point {text!r}") for p in parts[:2])
    label = 1
    if len(parts) == 3:
        if parts[2].strip() not in ("0", "1"):
            raise DemoInputError(f"--point {text!r}: label must be 1 (positive) or 0 (negative), got {parts[2].strip()!r}")
        label = int(parts[2])
    return x, y, label


def parse_box(text: str) -> Tuple[float, float, float, float]:
    """'x0,y0,x1,y1' -> four numbers (checked against the image by :func:`check_prompts`)."""
    parts = text.split(",")
    if len(parts) != 4:
        raise DemoInputError(f"--box {text!r}: expected x0,y0,x1,y1")
    return tuple(_number(p, f"--box {text!r}") for p in parts)  # type: ignore[return-value]


def _finite(value: Any) -> bool:
    """A real number that fits a float (JSON integers are unbounded: 1e400 as digits overflows)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _short(values: Any, limit: int = 80) -> str:
    text = repr(list(values)) if isinstance(values, (list, tuple)) else repr(values)
    return text if len(text) <= limit else text[:limit] + "..."


def check_prompts(points: Sequence[Sequence[float]], labels: Sequence[int], box: Optional[Sequence[float]],
                  width: int, height: int) -> Tuple[Optional[np.ndarray], Optional[np.ndarray], Optional[np.ndarray]]:
    """Validate prompts in image pixels against a (width x height) image; returns SamPredictor
    arrays (point_coords (N, 2), point_labels (N,), box (4,)), None where absent."""
    if len(points) != len(labels):
        raise DemoInputError(f"{len(points)} points but {len(labels)} labels")
    for point, label in zip(points, labels):
        if len(point) != 2 or not all(_finite(v) for v in point):
            raise DemoInputError(f"point {_short(point)}: expected two finite numbers x, y")
        x, y = point
        if not (0 <= x < width and 0 <= y < height):
            raise DemoInputError(f"point ({x:g}, {y:g}) is outside the {width}x{height} image "
                                 f"(x must be in [0, {width}), y in [0, {height}))")
        if label not in (0, 1) or isinstance(label, bool):
            raise DemoInputError(f"point label {label!r}: must be 1 (positive) or 0 (negative)")
    coords = np.asarray(points, np.float32).reshape(-1, 2) if len(points) else None
    lab = np.asarray(labels, np.int64) if len(points) else None
    arr = None
    if box is not None:
        if len(box) != 4 or not all(_finite(v) for v in box):
            raise DemoInputError(f"box {_short(box)}: expected four finite numbers x0, y0, x1, y1")
        x0, y0, x1, y1 = box
        if x1 < x0 or y1 < y0:
            raise DemoInputError(f"box ({x0:g}, {y0:g}, {x1:g}, {y1:g}): needs x0 <= x1 and y0 <= y1")
        if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
            raise DemoInputError(f"box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) is outside the {width}x{height} image")
        arr = np.asarray(box, np.float32)
    if coords is None and arr is None:
        raise DemoInputError("no prompt: give at least one point or a box")
    return coords, lab, arr


def predict(predictor, coords: Optional[np.ndarray], labels: Optional[np.ndarray], box: Optional[np.ndarray],
            multimask: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """Prompt an image already set in ``predictor``: masks (K, H, W) bool and scores (K,), best first.

    Without ``multimask`` one mask comes back: for a single point (ambiguous) the best of SAM's
    three by predicted IoU, as SAM recommends; otherwise SAM's single-mask output.
    """
    single_point = box is None and coords is not None and len(coords) == 1
    masks, scores, _ = predictor.predict(point_coords=coords, point_labels=labels, box=box,
                                         multimask_output=multimask or single_point)
    order = np.argsort(-scores)
    masks, scores = masks[order], scores[order]
    if not multimask:
        masks, scores = masks[:1], scores[:1]
    return masks.astype(bool), scores.astype(float)


def mask_record(mask: np.ndarray, score: float, **extra: Any) -> Dict[str, Any]:
    """One mask as COCO results-format RLE with its score, area and xywh box."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    out = {"segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
           "score": float(score), "area": int(mask.sum()), "bbox": [float(v) for v in mask_utils.toBbox(rle)]}
    out.update(extra)
    return out


def mask_png(mask: np.ndarray, colour: Tuple[int, int, int] = (30, 144, 255), alpha: int = 128) -> bytes:
    """The mask as an RGBA PNG the size of the image: ``colour`` at ``alpha`` inside, clear outside."""
    rgba = np.zeros((*mask.shape, 4), np.uint8)
    rgba[mask] = (*colour, alpha)
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG", optimize=False)
    return buf.getvalue()
