"""Kinetics-400 style video classification data: list files, PyAV decoding, clip sampling.

**List files** as the VideoMamba / R-MeeTo / VideoMAE splits ship them (``train.csv``,
``val.csv``, ``test.csv``): one video per line, ``<path> <label>`` (a space; a comma is accepted
too), the path relative to the ``--data`` root (or absolute), the label an integer class index.

**Decoding** with PyAV (``pip install av``): its wheels bundle FFmpeg and do not depend on the
installed torch, so it works on any machine this toolkit runs on (torchcodec is tied to torch
versions and needs system FFmpeg libraries). Frames are decoded in order and only the sampled
ones are converted to arrays.

**Sampling**: ``sampling="sparse"`` (default) is the ``Kinetics_sparse`` sampling of the released
VideoMamba K400 runs (``run_f8x224.sh``, ``_get_seq_frames``): the video is cut into ``num_frames``
equal segments; training takes a random frame of each (``randint(round(s i), round(s (i + 1)))``,
s = (length - 1) / num_frames); test clip k of K takes ``round(s i) + int(s / (K + 1) (k + 1))``.
``sampling="dense"`` (VideoMAE's other protocol): ``num_frames`` frames ``sampling_rate`` apart
from a random start (training) or from K evenly spaced starts (testing). Spatially, training
takes one random resized crop (area 8-100 %, aspect 3/4-4/3) and flip for the whole clip;
testing resizes the short side to ``img_size`` and takes ``test_crops`` crops (1: centre, 3: the
two ends and the middle of the long side): K x crops views, softmax probabilities averaged
(4 x 3 for K400).

**Bad input**: an empty list file, a malformed line, a label out of range: one error naming the
file and line. Missing or undecodable videos are skipped with a warning naming each (an error
with ``strict``); a list where no video exists is an error.
"""
import math
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class VideoDataError(ValueError):
    """A list file or video that cannot be used; the message names it."""


def read_video_list(list_file: Path, root: Optional[Path] = None, num_classes: Optional[int] = None) -> List[Tuple[str, int]]:
    """[(video path, label)] from a ``<path> <label>`` list file; paths are resolved against
    ``root`` (default: the list file's folder)."""
    list_file = Path(list_file)
    if not list_file.is_file():
        raise VideoDataError(f"{list_file}: no such list file (expected lines '<video path> <label>')")
    root = Path(root) if root is not None else list_file.parent
    samples = []
    for number, line in enumerate(list_file.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.replace(",", " ").rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise VideoDataError(f"{list_file}:{number}: expected '<video path> <integer label>', got {line[:80]!r}")
        label = int(parts[1])
        if label < 0 or (num_classes is not None and label >= num_classes):
            raise VideoDataError(f"{list_file}:{number}: label {label} outside 0..{(num_classes or 1) - 1}")
        path = Path(parts[0])
        samples.append((str(path if path.is_absolute() else root / path), label))
    if not samples:
        raise VideoDataError(f"{list_file}: empty list file: no '<video path> <label>' lines")
    return samples


def check_videos_exist(samples: List[Tuple[str, int]], list_file: Path, strict: bool) -> List[Tuple[str, int]]:
    """The samples whose file exists; the others are named in a warning (an error with ``strict``,
    or when none exists)."""
    missing = [p for p, _ in samples if not Path(p).is_file()]
    if not missing:
        return samples
    named = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    if strict or len(missing) == len(samples):
        raise VideoDataError(f"{list_file}: {len(missing)} of {len(samples)} listed videos do not exist: {named}")
    warnings.warn(f"{list_file}: skipping {len(missing)} of {len(samples)} listed videos that do not exist: {named}")
    gone = set(missing)
    return [s for s in samples if s[0] not in gone]


def decode_frames(path: str, indices: Optional[Sequence[int]] = None) -> Tuple[np.ndarray, int]:
    """(frames (K, H, W, 3) uint8 RGB at ``indices`` (all if None), the video's frame count).
    An index past the end takes the last frame. Raises ``VideoDataError`` naming the file."""
    import av

    wanted = None if indices is None else sorted(set(int(i) for i in indices))
    frames: Dict[int, np.ndarray] = {}
    count = 0
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise VideoDataError(f"{path}: no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            last = None
            for frame in container.decode(stream):
                if wanted is None or count in wanted:
                    frames[count] = frame.to_ndarray(format="rgb24")
                last = frame
                count += 1
                if wanted is not None and count > wanted[-1]:
                    break
            if count == 0:
                raise VideoDataError(f"{path}: no decodable frame")
            if wanted is not None and wanted[-1] >= count:  # past the end: the last frame
                tail = frames.get(count - 1)
                if tail is None:
                    tail = last.to_ndarray(format="rgb24")
                for i in wanted:
                    frames.setdefault(i, tail)
    except VideoDataError:
        raise
    except Exception as err:  # PyAV raises its own error family (av.error.*) and OSError
        raise VideoDataError(f"{path}: not a decodable video ({type(err).__name__}: {err})") from err
    order = sorted(frames) if indices is None else [int(i) for i in indices]
    return np.stack([frames[i] for i in order]), count


def video_frame_count(path: str) -> int:
    """Frames in a video: the container's count when it has one, else by decoding."""
    import av

    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            if stream.frames:
                return int(stream.frames)
    except Exception as err:
        raise VideoDataError(f"{path}: not a decodable video ({type(err).__name__}: {err})") from err
    return decode_frames(path, None)[1]


def sparse_indices(length: int, num_frames: int, rng: Optional[np.random.Generator] = None, clip: int = 0,
                   clips: int = 1) -> np.ndarray:
    """``Kinetics_sparse`` frame indices (module docstring): random within each segment with
    ``rng`` (training), else test clip ``clip`` of ``clips``."""
    seg = max(0.0, (length - 1) / num_frames)
    last = length - 1
    starts = [int(np.round(seg * i)) for i in range(num_frames)]
    if rng is not None:
        ends = [int(np.round(seg * (i + 1))) for i in range(num_frames)]
        return np.array([min(int(rng.integers(a, b + 1)), last) for a, b in zip(starts, ends)])
    duration = seg / (clips + 1)
    return np.array([min(a + int(duration * (clip + 1)), last) for a in starts])


def clip_indices(length: int, num_frames: int, sampling_rate: int, start: int) -> np.ndarray:
    """``num_frames`` indices ``sampling_rate`` apart from ``start`` (clamped to the video)."""
    return np.clip(start + sampling_rate * np.arange(num_frames), 0, max(0, length - 1))


def temporal_clip_starts(length: int, num_frames: int, sampling_rate: int, clips: int) -> List[int]:
    """Starts of ``clips`` clips spread evenly over the video (VideoMAE's test sampling)."""
    span = num_frames * sampling_rate
    room = max(0, length - span)
    if clips == 1:
        return [room // 2]
    return [int(round(room * i / (clips - 1))) for i in range(clips)]


def _to_tensor(frames: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (3, T, H, W) float in [0, 1]."""
    return torch.from_numpy(frames).permute(3, 0, 1, 2).float().div_(255.0)


def _normalise(clip: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    return (clip - torch.tensor(mean).view(3, 1, 1, 1)) / torch.tensor(std).view(3, 1, 1, 1)


def _resize_short(clip: torch.Tensor, size: int) -> torch.Tensor:
    """(3, T, H, W) -> short side ``size`` (bilinear, per frame)."""
    _, t, h, w = clip.shape
    scale = size / min(h, w)
    out = F.interpolate(clip.transpose(0, 1), size=(max(size, round(h * scale)), max(size, round(w * scale))),
                        mode="bilinear", align_corners=False, antialias=True)
    return out.transpose(0, 1)


def train_transform(clip: torch.Tensor, size: int, rng: np.random.Generator, scale=(0.08, 1.0),
                    ratio=(3 / 4, 4 / 3), flip: bool = True) -> torch.Tensor:
    """One random resized crop (area ``scale``, aspect ``ratio``) and flip for every frame."""
    _, t, h, w = clip.shape
    for _ in range(10):
        area = h * w * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            break
    else:
        ch = cw = min(h, w)
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    crop = clip[:, :, y:y + ch, x:x + cw].transpose(0, 1)
    crop = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True).transpose(0, 1)
    if flip and rng.random() < 0.5:
        crop = crop.flip(-1)
    return crop


def spatial_crops(clip: torch.Tensor, size: int, crops: int) -> List[torch.Tensor]:
    """Short side to ``size``, then 1 centre crop or 3 crops along the long side."""
    clip = _resize_short(clip, size)
    _, _, h, w = clip.shape
    if crops == 1:
        offsets = [((h - size) // 2, (w - size) // 2)]
    elif crops == 3:
        if w >= h:
            offsets = [((h - size) // 2, x) for x in (0, (w - size) // 2, w - size)]
        else:
            offsets = [(y, (w - size) // 2) for y in (0, (h - size) // 2, h - size)]
    else:
        raise ValueError(f"test_crops must be 1 or 3, got {crops}")
    return [clip[:, :, y:y + size, x:x + size] for y, x in offsets]


class VideoClipDataset(Dataset):
    """Items ``{"video": (3, T, S, S), "target": ()}`` for training, or ``{"video": (V, 3, T, S, S),
    "target": ()}`` with V = clips x crops views for testing. A video that fails to decode gives
    ``None`` and a warning naming it (``VideoDataError`` with ``strict``)."""

    def __init__(self, samples: List[Tuple[str, int]], num_frames: int = 8, sampling_rate: int = 8,
                 img_size: int = 224, training: bool = True, test_clips: int = 4, test_crops: int = 3,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD, seed: int = 0,
                 strict: bool = False, flip: bool = True, sampling: str = "sparse",
                 crop_scale: Tuple[float, float] = (0.08, 1.0)) -> None:
        if sampling not in ("sparse", "dense"):
            raise ValueError(f"sampling must be 'sparse' or 'dense', got {sampling!r}")
        self.sampling, self.crop_scale = sampling, tuple(crop_scale)
        self.samples = samples
        self.num_frames, self.sampling_rate, self.img_size = num_frames, sampling_rate, img_size
        self.training, self.test_clips, self.test_crops = training, test_clips, test_crops
        self.mean, self.std, self.seed, self.strict, self.flip = mean, std, seed, strict, flip
        self.epoch, self.rank = 0, 0
        self.classes = sorted({label for _, label in samples})

    @classmethod
    def from_list(cls, list_file: Path, root: Optional[Path] = None, num_classes: Optional[int] = None,
                  strict: bool = False, **kwargs: Any) -> "VideoClipDataset":
        samples = check_videos_exist(read_video_list(list_file, root, num_classes), list_file, strict)
        return cls(samples, strict=strict, **kwargs)

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> Optional[Dict[str, torch.Tensor]]:
        path, target = self.samples[index]
        try:
            item = self._load(path, index)
        except VideoDataError as err:
            if self.strict:
                raise
            warnings.warn(f"skipped: {err}")
            return None
        return {"video": item, "target": torch.tensor(target)}

    def _load(self, path: str, index: int) -> torch.Tensor:
        length = video_frame_count(path)
        span = self.num_frames * self.sampling_rate
        if self.training:
            rng = np.random.default_rng(np.random.SeedSequence((self.seed, self.epoch, index, self.rank)))
            if self.sampling == "sparse":
                wanted = sparse_indices(length, self.num_frames, rng)
            else:
                wanted = clip_indices(length, self.num_frames, self.sampling_rate,
                                      int(rng.integers(0, max(1, length - span + 1))))
            frames, _ = decode_frames(path, wanted)
            clip = train_transform(_to_tensor(frames), self.img_size, rng, scale=self.crop_scale, flip=self.flip)
            return _normalise(clip, self.mean, self.std)
        if self.sampling == "sparse":
            clips = [sparse_indices(length, self.num_frames, None, k, self.test_clips) for k in range(self.test_clips)]
        else:
            clips = [clip_indices(length, self.num_frames, self.sampling_rate, s)
                     for s in temporal_clip_starts(length, self.num_frames, self.sampling_rate, self.test_clips)]
        frames, _ = decode_frames(path, np.concatenate(clips))
        views = []
        for c in range(len(clips)):
            clip = _to_tensor(frames[c * self.num_frames:(c + 1) * self.num_frames])
            views += [_normalise(v, self.mean, self.std) for v in spatial_crops(clip, self.img_size, self.test_crops)]
        return torch.stack(views)


# ----------------------------------------------------------------------------------------------
# Synthetic videos in the Kinetics list format
# ----------------------------------------------------------------------------------------------

MOTIONS = ("right", "left", "down", "up")


def render_video(rng: np.random.Generator, label: int, frames: int = 24, size: int = 64,
                 background: str = "plain", travel: str = "edge") -> np.ndarray:
    """(frames, size, size, 3) uint8: a shape moving in direction ``MOTIONS[label % 4]``; kind,
    colour, place and speed are random, so only the motion (the order of the frames) tells the
    classes apart.

    ``background``: ``"plain"`` (a dark uniform field, the shape a bright colour: a patch holds the
    shape or not by its own pixels) or ``"textured"`` (stripes or checks of a random colour behind
    a textured shape of another: telling shape from background takes comparing patches, which
    tiny token models learn slowly; docs/method.md). ``travel``: ``"edge"`` (the shape enters at
    the edge it moves away from, so where it is in the first frame already hints at the class) or
    ``"anywhere"`` (a random start from which the whole path stays inside the frame: only the
    displacement between frames tells)."""
    from .synthetic import _texture

    if background not in ("plain", "textured") or travel not in ("edge", "anywhere"):
        raise ValueError(f"background must be 'plain' or 'textured' and travel 'edge' or 'anywhere', "
                         f"got {background!r}, {travel!r}")
    side = int(rng.integers(size // 4, size // 2))
    yy, xx = (np.mgrid[0:side, 0:side] + 0.5) / side - 0.5  # the shape fills its box: a rectangle, ellipse or diamond
    shape = [np.ones((side, side), bool), yy ** 2 + xx ** 2 < 0.25, np.abs(yy) + np.abs(xx) < 0.5][int(rng.integers(3))]
    if background == "textured":
        backdrop = _texture(rng, size, size, rng.uniform(60, 200, 3))
        skin = _texture(rng, side, side, rng.uniform(0, 255, 3))
    else:
        backdrop = np.clip(rng.uniform(10, 50) + rng.normal(0, 4, (size, size, 3)), 0, 255)
        skin = np.clip(rng.uniform(140, 255, 3) + rng.normal(0, 4, (side, side, 3)), 0, 255)
    room = size - side
    dy, dx = {"right": (0, 1), "left": (0, -1), "down": (1, 0), "up": (-1, 0)}[MOTIONS[label % 4]]
    if travel == "edge":
        speed = rng.uniform(0.6, 1.2) * room / frames
        start = 0.0
    else:  # half to all of the room, from a start that keeps the whole path inside
        distance = rng.uniform(0.5, 1.0) * room
        speed, start = distance / frames, rng.uniform(0, room - distance)
    y0 = rng.uniform(0, room) if dy == 0 else (start if dy > 0 else room - start)
    x0 = rng.uniform(0, room) if dx == 0 else (start if dx > 0 else room - start)
    video = np.empty((frames, size, size, 3), np.uint8)
    for t in range(frames):
        y = int(round(np.clip(y0 + dy * speed * t, 0, room)))
        x = int(round(np.clip(x0 + dx * speed * t, 0, room)))
        image = backdrop.copy()
        region = image[y:y + side, x:x + side]
        region[shape] = skin[shape]
        video[t] = np.clip(image, 0, 255).astype(np.uint8)
    return video


def write_video(path: Path, frames: np.ndarray, fps: int = 12) -> None:
    """(T, H, W, 3) uint8 -> an H.264 (yuv420p) MP4, as Kinetics clips are stored."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": "18", "preset": "veryfast"}
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_video_dataset(root: Path, num_classes: int = 4, train_per_class: int = 16, val_per_class: int = 4,
                        frames: int = 24, size: int = 64, seed: int = 0, background: str = "plain",
                        travel: str = "edge") -> Dict[str, Path]:
    """Moving-shape videos in the Kinetics list layout: ``videos/<split>/<id>.mp4`` plus
    ``train.csv`` / ``val.csv`` with ``<path> <label>`` lines (paths relative to ``root``) and
    ``classes.txt`` (one motion per line). ``background`` / ``travel``: :func:`render_video`'s."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    lists = {}
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        lines = []
        for c in range(num_classes):
            for i in range(count):
                rel = Path("videos") / split / f"{MOTIONS[c % 4]}_{c}_{i:04d}.mp4"
                write_video(root / rel, render_video(rng, c, frames, size, background, travel))
                lines.append(f"{rel} {c}")
        lists[split] = root / f"{split}.csv"
        lists[split].write_text("\n".join(lines) + "\n")
    (root / "classes.txt").write_text("\n".join(MOTIONS[c % 4] for c in range(num_classes)) + "\n")
    return lists
