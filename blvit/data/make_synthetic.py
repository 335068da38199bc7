"""Write the built-in synthetic data: SA-1B-format training and validation sets and a held-out
split in COCO and LVIS format (``blvit-synthetic``, also ``python tools/make_synthetic.py``).

Layout under ``--out`` (default ``data/synthetic``)::

    sa1b_train/   sa_<id>.jpg + sa_<id>.json, or sa_000000.tar ... with --images-per-shard
    sa1b_val/     the same format, other images (validation during training)
    heldout/      images/*.jpg, instances_coco.json, instances_lvis.json (the evaluation split)
    imagefolder/  train/<wnid>/*.JPEG, val/<wnid>/*.JPEG: 4 classes (ImageNet-format classification)
    manifest.json what was written, so a second call with the same arguments does nothing
    videos/       with --videos (needs PyAV): moving-shape MP4s, train.csv / val.csv in the Kinetics
                  list format ("<path> <label>"), 4 classes = the motion's direction
"""
import argparse
import json
import shutil
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from blvit.utils.io import atomic_write_text

from .imagenet import write_imagefolder
from .synthetic import write_instances, write_sa1b

# Disjoint image ids: each split's images are numbered by synthetic.split_image_id(seed, i).
TRAIN_SEED, HELDOUT_SEED, VAL_SEED = 0, 1, 2
# One default for blvit-synthetic and blvit-quickstart, so that running one after the other
# reuses the data. 400 images: with 160 the quick-start teacher starts to overfit within its run.
DEFAULT_TRAIN_IMAGES = 400


def ensure_synthetic(out: Path, train: int = DEFAULT_TRAIN_IMAGES, val: int = 16, heldout: int = 24, images_per_shard: int = 0,
                     height: int = 240, width: int = 320, max_occlusion: float = 1.0,
                     min_contrast: float = 0.0) -> Dict[str, Any]:
    """Generate the data unless ``out/manifest.json`` says it is already there with these settings.
    ``max_occlusion`` / ``min_contrast``: see ``synthetic.render_image`` (the defaults: no cap)."""
    out = Path(out)
    settings = dict(train=train, val=val, heldout=heldout, images_per_shard=images_per_shard, height=height, width=width)
    render = {k: v for k, v in (("max_occlusion", max_occlusion), ("min_contrast", min_contrast))
              if v != {"max_occlusion": 1.0, "min_contrast": 0.0}[k]}
    settings.update(render)  # absent at the defaults: manifests written before these options still match
    manifest_path = out / "manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("settings") == settings:
            return manifest
    # the manifest goes first and comes back last: a run stopped while writing leaves none, so the
    # next run writes everything again instead of trusting an old manifest over half-written data
    manifest_path.unlink(missing_ok=True)
    for folder in ("sa1b_train", "sa1b_val", "heldout", "imagefolder"):  # no stale samples of other settings
        shutil.rmtree(out / folder, ignore_errors=True)
    write_sa1b(out / "sa1b_train", train, TRAIN_SEED, height, width, images_per_shard, **render)
    write_sa1b(out / "sa1b_val", val, VAL_SEED, height, width, **render)
    paths = write_instances(out / "heldout", heldout, HELDOUT_SEED, height, width, **render)
    write_imagefolder(out / "imagefolder", num_classes=4, train_per_class=48, val_per_class=12)
    manifest = {"imagefolder": str(out / "imagefolder"), "settings": settings, "sa1b_train": str(out / "sa1b_train"), "sa1b_val": str(out / "sa1b_val"),
                "heldout_images": str(out / "heldout" / "images"),
                "heldout_coco": str(paths["coco"]), "heldout_lvis": str(paths["lvis"])}
    atomic_write_text(manifest_path, json.dumps(manifest, indent=2))
    return manifest


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data/synthetic"))
    parser.add_argument("--train", type=int, default=DEFAULT_TRAIN_IMAGES, help="SA-1B training images (default: %(default)s)")
    parser.add_argument("--val", type=int, default=16, help="SA-1B validation images")
    parser.add_argument("--heldout", type=int, default=24, help="COCO/LVIS held-out images")
    parser.add_argument("--images-per-shard", type=int, default=0, help="> 0: write tar shards instead of files")
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--max-occlusion", type=float, default=1.0,
                        help="re-draw a shape that would leave an earlier object with more than this share hidden")
    parser.add_argument("--min-contrast", type=float, default=0.0,
                        help="re-draw an object's colour until its RGB distance to what it covers is at least this")
    parser.add_argument("--videos", action="store_true",
                        help="also write videos/: the moving-shape video set in the Kinetics list format (needs PyAV)")
    args = parser.parse_args(argv)
    manifest = ensure_synthetic(args.out, args.train, args.val, args.heldout, args.images_per_shard,
                                args.height, args.width, args.max_occlusion, args.min_contrast)
    if args.videos:
        manifest["videos"] = str(ensure_videos(args.out / "videos"))
    print(json.dumps(manifest, indent=2))


def ensure_videos(root: Path, train_per_class: int = 64, val_per_class: int = 16) -> Path:
    """The synthetic video set under ``root`` (written once; ``root/train.csv`` marks it done)."""
    from .video import write_video_dataset

    if not (root / "train.csv").is_file() or not (root / "val.csv").is_file():
        write_video_dataset(root, num_classes=4, train_per_class=train_per_class, val_per_class=val_per_class)
    return root


if __name__ == "__main__":
    main()
