"""Reading images for inference: PIL only (no torch), shared by the evaluation and the demo."""
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, UnidentifiedImageError


def read_image(path: Union[str, Path]) -> np.ndarray:
    """(H, W, 3) uint8 RGB; a clear error naming the file if it is not a readable image."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"{path}: not a readable image ({err})") from err
    except Image.DecompressionBombError as err:  # a small file that would decode to gigabytes
        raise ValueError(f"{path}: image refused, too many pixels ({err})") from err
