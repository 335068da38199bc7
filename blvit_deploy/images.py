"""Reading images for inference: PIL only (no torch), shared by the evaluation and the demo."""
from pathlib import Path
from typing import Tuple, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Pillow's modes of 16- and 32-bit single-channel images (a 16-bit greyscale PNG opens as one)
_WIDE_GREY = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def resize_longest_side(height: int, width: int, size: int) -> Tuple[int, int]:
    """(new_h, new_w) with the long side ``size``: segment-anything's ``ResizeLongestSide``."""
    scale = size / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def to_rgb(im: Image.Image, exif_transpose: bool = False) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a PIL image.

    16-bit greyscale is scaled to 8 bits (Pillow's ``convert("RGB")`` clips it at 255, turning an
    image nearly white). ``exif_transpose``: turn the pixels as the EXIF orientation tag says, as
    image viewers show a phone photo (and as segment-anything's ``amg.py`` reads it with OpenCV), so
    that coordinates read off a viewer land where they point.
    """
    if exif_transpose:
        im = ImageOps.exif_transpose(im)
    if im.mode in _WIDE_GREY:
        grey = np.asarray(im, dtype=np.float64)
        if im.mode != "I" or grey.max() > 255:  # "I" also holds 8-bit values
            grey = grey / 257.0
        grey = np.clip(np.round(grey), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    return np.asarray(im.convert("RGB"))


def read_image(path: Union[str, Path], exif_transpose: bool = False) -> np.ndarray:
    """(H, W, 3) uint8 RGB (:func:`to_rgb`); a clear error naming the file if it is not a readable
    image. The evaluation reads the stored pixels (the sizes of COCO / LVIS / SA-1B annotations);
    the demo turns a photo by its EXIF orientation."""
    try:
        with Image.open(path) as im:
            return to_rgb(im, exif_transpose)
    except FileNotFoundError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"{path}: not a readable image ({err})") from err
    except Image.DecompressionBombError as err:  # a small file that would decode to gigabytes
        raise ValueError(f"{path}: image refused, too many pixels ({err})") from err
