"""``OnnxSamPredictor``: ``SamPredictor``'s ``set_image`` / ``predict`` on ONNX Runtime sessions."""
import json
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import onnxruntime as ort

from .images import resize_longest_side


class OnnxSamPredictor:
    """Prompted masks from the files ``blvit-export`` writes (``export.json`` names them).

    ``set_image(image)`` runs the encoder once; ``predict(...)`` runs the prompt encoder and mask
    decoder for points and / or a box in the image's pixel coordinates, as ``SamPredictor.predict``
    does, and returns masks at the image's size (bool), their predicted IoUs and the low-resolution
    logits (to feed back as ``mask_input``).

    Preprocessing follows ``SamPredictor``: long side resized to the model's input size, pixels
    normalised with the export's mean / std, zero padding to a square. The resize uses OpenCV
    (area interpolation when shrinking, bilinear when enlarging) instead of PIL's antialiased
    bilinear, so the embedding differs slightly from PyTorch's for the same photo (the masks agree;
    tests/test_deploy.py measures it).
    """

    def __init__(self, onnx_dir: Union[str, Path], encoder: str = "encoder.onnx",
                 providers: Sequence[str] = ("CPUExecutionProvider",)) -> None:
        self.dir = Path(onnx_dir)
        meta_path = self.dir / "export.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path}: not an export folder of blvit-export (no export.json)")
        self.meta: Dict[str, Any] = json.loads(meta_path.read_text())
        self.img_size = int(self.meta["img_size"])
        self.mask_threshold = float(self.meta.get("mask_threshold", 0.0))
        self.pixel_mean = np.array(self.meta["pixel_mean"], np.float32)
        self.pixel_std = np.array(self.meta["pixel_std"], np.float32)
        options = list(providers)
        files = self.meta["decoder"]["files"]
        encoder_path, decoder_path = self.dir / encoder, self.dir / files["multimask"]
        for path in (encoder_path, decoder_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path}: missing (export.json in {self.dir} names it; re-run blvit-export)")
        self.encoder = ort.InferenceSession(str(encoder_path), providers=options)
        self.decoder = ort.InferenceSession(str(decoder_path), providers=options)
        image_shape = list(self.encoder.get_inputs()[0].shape)
        if image_shape != [1, 3, self.img_size, self.img_size]:
            raise ValueError(f"{encoder_path}: takes images of shape {image_shape}, but export.json says "
                             f"{self.img_size} px (the file is from another export)")
        produced = list(self.encoder.get_outputs()[0].shape)
        expected = list(self.decoder.get_inputs()[0].shape)
        if produced != expected:
            raise ValueError(f"{encoder_path} makes image embeddings of shape {produced} but {decoder_path} takes "
                             f"{expected}: the encoder and decoder come from different models or sizes")
        self.mask_input_size = tuple(self.meta["decoder"]["mask_input_size"])
        self.features: Optional[np.ndarray] = None
        self.original_size: Optional[Tuple[int, int]] = None
        self.input_size: Optional[Tuple[int, int]] = None

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 RGB -> (1, 3, S, S) float32, normalised and padded."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image must be (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}")
        h, w = image.shape[:2]
        new_h, new_w = resize_longest_side(h, w, self.img_size)
        shrinking = new_h * new_w < h * w
        resized = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
        x = (resized.astype(np.float32) - self.pixel_mean) / self.pixel_std
        padded = np.zeros((self.img_size, self.img_size, 3), np.float32)
        padded[:new_h, :new_w] = x
        return padded.transpose(2, 0, 1)[None]

    def set_image(self, image: np.ndarray) -> None:
        self.original_size = image.shape[:2]
        self.input_size = resize_longest_side(*self.original_size, self.img_size)
        self.features = self.encoder.run(["image_embeddings"], {"image": self.preprocess(image)})[0]

    def _to_input_frame(self, coords: np.ndarray) -> np.ndarray:
        h, w = self.original_size
        new_h, new_w = self.input_size
        coords = np.asarray(coords, np.float32).copy()
        coords[..., 0] *= new_w / w
        coords[..., 1] *= new_h / h
        return coords

    def predict(self, point_coords: Optional[np.ndarray] = None, point_labels: Optional[np.ndarray] = None,
                box: Optional[np.ndarray] = None, mask_input: Optional[np.ndarray] = None,
                multimask_output: bool = True) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Like ``SamPredictor.predict``: points (N, 2) xy with labels (N,) 1 / 0, a box (4,) xyxy,
        the previous low-res logits (1, h, w). Returns masks (K, H, W) bool, scores (K,), low-res
        logits (K, h, w); K = 3 with ``multimask_output``, else 1."""
        if self.features is None:
            raise RuntimeError("call set_image first")
        coords, labels = [], []
        if point_coords is not None:
            if point_labels is None or len(point_labels) != len(point_coords):
                raise ValueError("point_labels must give one label per point")
            coords.append(np.asarray(point_coords, np.float32).reshape(-1, 2))
            labels.append(np.asarray(point_labels, np.float32).reshape(-1))
        if box is not None:
            coords.append(np.asarray(box, np.float32).reshape(2, 2))
            labels.append(np.array([2, 3], np.float32))
        elif coords:  # SAM's ONNX convention: a padding point when there is no box
            coords.append(np.zeros((1, 2), np.float32))
            labels.append(np.array([-1], np.float32))
        if not coords:
            raise ValueError("give points and / or a box")
        feed = {
            "image_embeddings": self.features,
            "point_coords": self._to_input_frame(np.concatenate(coords))[None],
            "point_labels": np.concatenate(labels)[None],
            "mask_input": np.zeros((1, 1, *self.mask_input_size), np.float32) if mask_input is None
            else np.asarray(mask_input, np.float32).reshape(1, 1, *self.mask_input_size),
            "has_mask_input": np.array([0.0 if mask_input is None else 1.0], np.float32),
            "orig_im_size": np.array(self.original_size, np.float32),
        }
        # The multimask file returns the decoder's four outputs: the first is SamPredictor's single
        # mask, the other three its multimask answer. (decoder_single.onnx is SAM's web-demo rule
        # instead: the best of the three for one or two points, the first with more.)
        masks, scores, low_res = self.decoder.run(None, feed)
        pick = slice(1, None) if multimask_output else slice(0, 1)
        return masks[0, pick] > self.mask_threshold, scores[0, pick], low_res[0, pick]
