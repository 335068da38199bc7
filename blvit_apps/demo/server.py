"""The demo's local web page (``blvit-demo --serve``): a Flask app around one SAM model.

Each image's embedding is computed once, when it is uploaded, and kept in an LRU cache keyed by
a hash of its pixels and bounded both in entries and in bytes (image + features); a prompt then
runs only the prompt encoder and mask decoder of ``SamPredictor`` on the cached features. One
lock guards the model and the predictor, so requests from several tabs never mix up images'
embeddings. Memory stays bounded under load: an upload is limited in bytes (413), its header
is checked against a pixel limit before anything is decoded (413), and at most
``decode_workers`` uploads are decoded at once.

API (JSON errors ``{"error": message}`` with a 4xx status on bad input; the server keeps serving):

- ``GET /``: the page; ``GET /api/info``: model, limits, whether the weights are random.
- ``POST /api/image``: multipart field ``image`` (a file), or form/query ``sample=astronaut``
  for a bundled photograph -> ``{"image_id", "width", "height", "encoder_ms", "cached"}``.
- ``GET /api/image/<image_id>.png``: the image as the model sees it (RGB).
- ``GET /api/embedding/<image_id>``: the image embedding, raw float32, shape in ``X-Embedding-Shape``;
  ``GET /api/decoder.onnx``: the prompt encoder + mask decoder as ONNX; ``GET
  /vendor/onnxruntime-web/<file>``: onnxruntime-web (``blvit-demo --install-web-runtime``). With
  these the page runs the mask decoder itself: a click costs no request, as in SAM's web demo.
- ``POST /api/predict``: ``{"image_id", "points": [[x, y], ...], "labels": [1 | 0, ...],
  "box": [x0, y0, x1, y1] | null, "multimask": false (a JSON boolean)}`` in image pixels ->
  ``{"mask": "data:image/png;base64,..." (RGBA, the image's size), "score", "scores",
  "segmentation" (COCO RLE), "area", "encoder_ms" (0: cached), "decoder_ms"}``.
"""
import base64
import hashlib
import io
import ipaddress
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
from PIL import Image

from . import web_runtime
from .core import (SAMPLE_IMAGES, DemoInputError, ImageTooLarge, check_encodable, check_prompts, decode_image, mask_png, mask_record,
                   predict, sample_image)

logger = logging.getLogger(__name__)
STATIC = Path(__file__).resolve().parent / "static"
SERVICE_KEY = "blvit_demo"


class UnknownImage(KeyError):
    """An image id that is not (or no longer) in the cache."""


@dataclass
class ImageEntry:
    image_id: str
    image: np.ndarray
    features: Any  # (1, 256, g, g) tensor on the model's device
    original_size: Tuple[int, int]
    input_size: Tuple[int, int]
    encoder_ms: float

    @property
    def nbytes(self) -> int:
        """What this entry holds in memory: the image and its embedding."""
        return int(self.image.nbytes) + int(self.features.numel() * self.features.element_size())


def image_key(image: np.ndarray) -> str:
    """Content hash of the decoded pixels (the same picture in two file formats is one entry)."""
    digest = hashlib.sha256()
    digest.update(repr(image.shape).encode())
    digest.update(np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()[:24]


class DemoService:
    """The model, one ``SamPredictor``, and the LRU cache of image embeddings, behind one lock.

    The cache keeps at most ``cache_size`` images and at most ``cache_mb`` megabytes of images
    plus embeddings (the newest entry is always kept, whatever its size).
    """

    def __init__(self, sam, info: Dict[str, Any], cache_size: int = 8, cache_mb: float = 1024.0) -> None:
        from segment_anything import SamPredictor

        if cache_size < 1:
            raise ValueError(f"cache_size must be at least 1, got {cache_size}")
        if cache_mb <= 0:
            raise ValueError(f"cache_mb must be positive, got {cache_mb}")
        self.sam, self.info, self.cache_size, self.cache_bytes = sam.eval(), dict(info), cache_size, int(cache_mb * 2**20)
        self.predictor = SamPredictor(self.sam)
        self.cache: "OrderedDict[str, ImageEntry]" = OrderedDict()
        self.lock = threading.Lock()
        self.encodings = 0  # how many times the image encoder ran (tests, logs)
        self.predictions = 0  # prompts the server decoded (the in-browser decoder sends none)
        self._decoder_onnx: Optional[bytes] = None

    def cached_bytes(self) -> int:
        return sum(e.nbytes for e in self.cache.values())

    def add_image(self, image: np.ndarray) -> Tuple[ImageEntry, bool]:
        """Encode an image (or find it in the cache): (entry, was it cached)."""
        key = image_key(image)
        with self.lock:
            if key in self.cache:
                self.cache.move_to_end(key)
                return self.cache[key], True
            check_encodable(image, self.predictor.transform.target_length)
            start = time.perf_counter()
            self.predictor.set_image(image)
            elapsed = (time.perf_counter() - start) * 1000
            p = self.predictor
            entry = ImageEntry(key, image, p.features, tuple(p.original_size), tuple(p.input_size), elapsed)
            self.predictor.reset_image()
            self.encodings += 1
            self.cache[key] = entry
            while len(self.cache) > 1 and (len(self.cache) > self.cache_size or self.cached_bytes() > self.cache_bytes):
                dropped, _ = self.cache.popitem(last=False)
                logger.info("embedding cache full (%d images, %.0f MB): dropped image %s", self.cache_size,
                            self.cache_bytes / 2**20, dropped)
            return entry, False

    def get(self, image_id: str) -> ImageEntry:
        with self.lock:
            entry = self.cache.get(image_id)
            if entry is None:
                raise UnknownImage(image_id)
            return entry

    def predict(self, image_id: str, points, labels, box, multimask: bool = False) -> Dict[str, Any]:
        """Prompt a cached image: only the prompt encoder and mask decoder run."""
        entry = self.get(image_id)
        height, width = entry.original_size
        coords, labs, box_arr = check_prompts(points, labels, box, width, height)
        with self.lock:
            p = self.predictor
            p.features, p.original_size, p.input_size, p.is_image_set = (entry.features, entry.original_size,
                                                                          entry.input_size, True)
            try:
                start = time.perf_counter()
                masks, scores = predict(p, coords, labs, box_arr, multimask)
                decoder_ms = (time.perf_counter() - start) * 1000
            finally:
                p.reset_image()  # never leave one image's features behind for another request
            self.predictions += 1
        best = masks[0]
        record = mask_record(best, scores[0])
        return {"image_id": image_id, "mask": "data:image/png;base64," + base64.b64encode(mask_png(best)).decode(),
                "score": float(scores[0]), "scores": [float(s) for s in scores], "segmentation": record["segmentation"],
                "area": record["area"], "bbox": record["bbox"], "encoder_ms": 0.0, "cached_encoder_ms": entry.encoder_ms,
                "decoder_ms": decoder_ms}


    def decoder_onnx(self) -> bytes:
        """The prompt encoder + mask decoder as ONNX (segment-anything's ``SamOnnxModel``, all four
        masks, as ``blvit-export`` writes ``decoder.onnx``) for the page's in-browser decoder;
        exported on the first request, then kept."""
        with self.lock:
            if self._decoder_onnx is None:
                import tempfile

                from ..export import OPSET, export_decoders

                start = time.perf_counter()
                with tempfile.TemporaryDirectory() as tmp:
                    meta = export_decoders(self.sam, Path(tmp), OPSET, dynamo=False)
                    self._decoder_onnx = (Path(tmp) / meta["files"]["multimask"]).read_bytes()
                logger.info("exported the mask decoder for the browser in %.1f s (%.1f MB)",
                            time.perf_counter() - start, len(self._decoder_onnx) / 2**20)
            return self._decoder_onnx


def _client_info(service: DemoService, max_upload_mb: float, max_megapixels: float) -> Dict[str, Any]:
    info = {k: v for k, v in service.info.items() if isinstance(v, (str, int, float, bool, type(None)))}
    return {"model": info, "random": bool(service.info.get("random")), "warning": service.info.get("warning"),
            "max_upload_mb": max_upload_mb, "max_megapixels": max_megapixels, "cache_size": service.cache_size,
            "cache_mb": service.cache_bytes / 2**20, "samples": list(SAMPLE_IMAGES),
            # the page can run the mask decoder itself once onnxruntime-web is installed
            "browser_decoder": web_runtime.is_installed(), "web_runtime_version": web_runtime.VERSION,
            "img_size": int(service.sam.image_encoder.img_size), "mask_threshold": float(service.sam.mask_threshold)}


def create_app(sam, info: Dict[str, Any], max_upload_mb: float = 20.0, cache_size: int = 8,
               max_megapixels: float = 36.0, cache_mb: float = 1024.0, decode_workers: int = 2):
    """The Flask app for one model. ``app.extensions["blvit_demo"]`` is the :class:`DemoService`.

    Limits: uploads of at most ``max_upload_mb`` bytes and ``max_megapixels`` pixels (413
    otherwise), at most ``decode_workers`` decoded at once, and the embedding cache bounded by
    ``cache_size`` images and ``cache_mb`` megabytes.
    """
    from flask import Flask, jsonify, request, send_file, send_from_directory
    from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

    for name, value in (("max_upload_mb", max_upload_mb), ("max_megapixels", max_megapixels),
                        ("decode_workers", decode_workers)):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    app = Flask(__name__, static_folder=str(STATIC), static_url_path="/static")
    app.config["MAX_CONTENT_LENGTH"] = int(max_upload_mb * 1024 * 1024)
    service = DemoService(sam, info, cache_size, cache_mb)
    app.extensions[SERVICE_KEY] = service
    max_pixels = int(max_megapixels * 1e6)
    decoding = threading.BoundedSemaphore(decode_workers)  # decoded images are the big allocations

    def error(status: int, message: str):
        return jsonify({"error": message}), status

    @app.errorhandler(ImageTooLarge)
    def too_many_pixels(err: ImageTooLarge):
        return error(413, str(err))

    @app.errorhandler(DemoInputError)
    def bad_input(err: DemoInputError):
        return error(400, str(err))

    @app.errorhandler(UnknownImage)
    def unknown_image(err: UnknownImage):
        return error(404, f"unknown image id {err.args[0]!r}: it was never uploaded or the embedding cache "
                          f"(the last {service.cache_size} images) dropped it; upload the image again")

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(err: RequestEntityTooLarge):
        return error(413, f"upload too large: the limit is {max_upload_mb:g} MB (blvit-demo --serve --max-upload-mb)")

    @app.errorhandler(HTTPException)
    def http_error(err: HTTPException):
        return error(err.code or 500, f"{err.name}: {err.description}")

    @app.errorhandler(Exception)
    def internal(err: Exception):
        logger.exception("request failed")
        return error(500, f"internal error: {type(err).__name__}: {err}")

    @app.get("/")
    def index():
        return send_from_directory(STATIC, "index.html")

    @app.get("/api/info")
    def api_info():
        return jsonify(_client_info(service, max_upload_mb, max_megapixels))

    @app.post("/api/image")
    def api_image():
        upload = request.files.get("image")
        sample = request.values.get("sample")
        with decoding:
            if upload is not None and upload.filename != "":
                image = decode_image(upload.read(), upload.filename or "upload", max_pixels)
            elif sample:
                image = sample_image(sample)
            else:
                raise DemoInputError("no image: send a file in the multipart field 'image' or sample=<name>")
            entry, cached = service.add_image(image)
            del image  # the cache holds it now (or dropped it); the next decode may start
        height, width = entry.original_size
        return jsonify({"image_id": entry.image_id, "width": width, "height": height, "cached": cached,
                        "encoder_ms": 0.0 if cached else entry.encoder_ms, "first_encoder_ms": entry.encoder_ms,
                        "url": f"/api/image/{entry.image_id}.png", "input_size": list(entry.input_size),
                        "embedding_url": f"/api/embedding/{entry.image_id}"})

    @app.get("/api/embedding/<image_id>")
    def api_embedding(image_id: str):
        """The image embedding (1, C, g, g) as raw little-endian float32; its shape in a header."""
        entry = service.get(image_id)
        features = entry.features.detach().float().cpu().numpy().astype("<f4")
        response = app.response_class(features.tobytes(), mimetype="application/octet-stream")
        response.headers["X-Embedding-Shape"] = ",".join(str(d) for d in features.shape)
        response.headers["Cache-Control"] = "private, max-age=3600"
        return response

    @app.get("/api/decoder.onnx")
    def api_decoder_onnx():
        response = app.response_class(service.decoder_onnx(), mimetype="application/octet-stream")
        response.headers["Cache-Control"] = "private, max-age=3600"
        return response

    @app.get("/vendor/onnxruntime-web/<name>")
    def vendor_web_runtime(name: str):
        if name not in web_runtime.FILES:
            return error(404, f"not a file of onnxruntime-web's page runtime: {name}")
        if not web_runtime.is_installed():
            return error(404, "onnxruntime-web is not installed: run blvit-demo --install-web-runtime")
        mimetype = {".wasm": "application/wasm", ".mjs": "text/javascript", ".js": "text/javascript"}[Path(name).suffix]
        return send_from_directory(web_runtime.runtime_dir(), name, mimetype=mimetype, max_age=86400)

    @app.get("/api/image/<image_id>.png")
    def api_image_png(image_id: str):
        entry = service.get(image_id)
        buf = io.BytesIO()
        Image.fromarray(entry.image).save(buf, format="PNG")
        buf.seek(0)
        return send_file(buf, mimetype="image/png", max_age=3600)

    @app.post("/api/predict")
    def api_predict():
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            raise DemoInputError("expected a JSON object: {\"image_id\", \"points\", \"labels\", \"box\"}")
        image_id = body.get("image_id")
        if not isinstance(image_id, str) or not image_id:
            raise DemoInputError("missing image_id: upload an image first")
        points, labels, box = body.get("points") or [], body.get("labels"), body.get("box")
        if not isinstance(points, list) or not all(isinstance(p, list) for p in points):
            raise DemoInputError("points: expected a list of [x, y] pairs")
        labels = [1] * len(points) if labels is None else labels
        if not isinstance(labels, list):
            raise DemoInputError("labels: expected a list of 1 (positive) / 0 (negative)")
        if box is not None and not isinstance(box, list):
            raise DemoInputError("box: expected [x0, y0, x1, y1] or null")
        multimask = body.get("multimask", False)
        if not isinstance(multimask, bool):
            raise DemoInputError(f"multimask: expected true or false (a JSON boolean), got {multimask!r:.40}")
        return jsonify(service.predict(image_id, points, labels, box, multimask))

    return app


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_server(app, host: str = "127.0.0.1", port: int = 7860):
    """A threaded WSGI server (``port=0``: a free port; see ``server.server_port``)."""
    from werkzeug.serving import make_server as werkzeug_server

    return werkzeug_server(host, port, app, threaded=True)


def serve(sam, info: Dict[str, Any], host: str = "127.0.0.1", port: int = 7860, max_upload_mb: float = 20.0,
          cache_size: int = 8, max_megapixels: float = 36.0, cache_mb: float = 1024.0) -> None:
    """Serve the page until interrupted (Ctrl-C)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    app = create_app(sam, info, max_upload_mb=max_upload_mb, cache_size=cache_size, max_megapixels=max_megapixels,
                     cache_mb=cache_mb)
    if not is_loopback(host):
        logger.warning("listening on %s: the page is reachable from other machines; this demo server has no "
                       "authentication (use the default 127.0.0.1 to keep it local)", host)
    server = make_server(app, host, port)
    shown = f"[{host}]" if ":" in host else host
    print(f"blvit-demo: serving {info.get('model')} on http://{shown}:{server.server_port}/ (Ctrl-C to stop)", flush=True)
    if info.get("random"):
        print("WARNING: RANDOMLY INITIALISED model: the masks will be meaningless", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
