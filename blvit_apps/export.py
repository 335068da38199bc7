"""``blvit-export``: a toolkit SAM model to ONNX, checked by ONNX Runtime against PyTorch.

    blvit-export --model b+t --checkpoint runs/sam_bt/checkpoints/best.pth --out exports/bt
    blvit-export --model vit_b --checkpoint sam_vit_b_01ec64.pth --out exports/sam_b --quantize

Writes into ``--out``:

- ``encoder.onnx``: the image encoder, input ``image`` (1, 3, S, S) normalised and padded as
  ``Sam.preprocess`` makes it (S = the model's input size, 1024 for the released models), output
  ``image_embeddings`` (1, C, S/16, S/16); a bLViT encoder also outputs ``routed_<layer>``, the
  (1, K) token indices each predictor picked (what the check compares);
- ``decoder.onnx`` / ``decoder_single.onnx``: prompt encoder + mask decoder + post-processing
  through segment-anything's own ``SamOnnxModel``: all four masks (the first is what
  ``SamPredictor.predict(multimask_output=False)`` returns, the other three its multimask answer) /
  one mask by SAM's web-demo rule (the best of the three for one or two points, else the first); inputs
  ``image_embeddings``, ``point_coords`` (1, P, 2) and ``point_labels`` (1, P) with a dynamic
  number of points P, ``mask_input``, ``has_mask_input``, ``orig_im_size``;
- ``encoder.int8.onnx`` with ``--quantize`` (onnxruntime dynamic int8 quantisation of the weights);
- ``encoder.fp16.onnx`` with ``--fp16`` (float16 weights and arithmetic, float32 inputs/outputs);
- ``export.json``: opset, exporter, input/output names and shapes, the check's errors.

The check runs every file with onnxruntime on a fixed input and fails (exit 3) when the maximum
absolute error against PyTorch exceeds ``--tolerance`` (default 1e-3 for fp32: outputs are of
order 1 after the encoder's LayerNorm; ops like the relative-position gathers reorder float sums)
or when any routed token index differs. The int8 and fp16 encoders are checked by cosine
similarity (>= 0.99 by default) since they change the numbers on purpose; whether their routed
indices still equal fp32's is reported, not required (a near-tie may flip).

Exporter: ``torch.onnx.export(..., dynamo=False)`` (TorchScript tracing). The routed encoders'
top-k / gather / index_add trace to TopK, Gather and ScatterND with static shapes (k is fixed), which
is what the tracing exporter handles; the dynamo exporter is selected with ``--dynamo``.
"""
import argparse
import contextlib
import io
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

OPSET = 17
DEFAULT_TOLERANCE = 1e-3


class EncoderForExport(nn.Module):
    """The image encoder with the routed token indices as extra outputs (bLViT encoders)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.routed = hasattr(encoder, "forward_with_selections") and bool(getattr(encoder.config, "predictor_layers", ()))

    def forward(self, image: torch.Tensor):
        if not self.routed:
            return self.encoder(image)
        out, selections = self.encoder.forward_with_selections(image)
        return (out, *[s.flat_index for s in selections.values()])

    def output_names(self) -> List[str]:
        if not self.routed:
            return ["image_embeddings"]
        return ["image_embeddings"] + [f"routed_{layer}" for layer in self.encoder.config.predictor_layers]


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: not a warning per constant folded in a float16 graph
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _example_image(size: int, seed: int = 0) -> torch.Tensor:
    """A fixed, image-like normalised input: smooth shapes plus noise, zero padding at the bottom."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    base = torch.stack([torch.sin(3 * xx + 1), torch.cos(2 * yy), (xx * xx + yy * yy < 0.4).float()])
    image = base + 0.3 * torch.randn(3, size, size, generator=g)
    image[:, int(size * 0.75):] = 0  # the padding a non-square image leaves
    return image[None]


def export_encoder(sam, out: Path, opset: int, dynamo: bool) -> Dict[str, Any]:
    wrapper = EncoderForExport(sam.image_encoder).eval()
    size = int(sam.image_encoder.img_size)
    example = _example_image(size)
    path = out / "encoder.onnx"
    names = wrapper.output_names()
    with torch.no_grad():
        torch.onnx.export(wrapper, (example,), str(path), input_names=["image"], output_names=names,
                          opset_version=opset, dynamo=dynamo)
    return {"file": path.name, "inputs": {"image": [1, 3, size, size]}, "outputs": names, "routed": wrapper.routed}


def _dynamic_crop_onnx_model():
    """segment-anything's ``SamOnnxModel`` with its padding crop kept dynamic in the graph.

    The released 1.0 crops the upsampled masks to the resized image with ``int()`` of a tensor,
    which the tracing exporter freezes at the example's size: every image then got the example's
    crop (a 4:3 one) and, on any other aspect ratio, masks away from their clicks. Slicing with the
    tensors themselves is the same computation and stays an input-dependent Slice.
    """
    import torch.nn.functional as F
    from segment_anything.utils.onnx import SamOnnxModel

    class DynamicCropSamOnnxModel(SamOnnxModel):
        def mask_postprocessing(self, masks: torch.Tensor, orig_im_size: torch.Tensor) -> torch.Tensor:
            masks = F.interpolate(masks, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
            prepadded_size = self.resize_longest_image_size(orig_im_size, self.img_size)
            masks = masks[..., : prepadded_size[0], : prepadded_size[1]]
            orig_im_size = orig_im_size.to(torch.int64)
            return F.interpolate(masks, size=(orig_im_size[0], orig_im_size[1]), mode="bilinear", align_corners=False)

    return DynamicCropSamOnnxModel


def export_decoders(sam, out: Path, opset: int, dynamo: bool) -> Dict[str, Any]:
    SamOnnxModel = _dynamic_crop_onnx_model()

    embed_dim = sam.prompt_encoder.embed_dim
    grid = sam.prompt_encoder.image_embedding_size
    low_res = [4 * grid[0], 4 * grid[1]]
    inputs = {
        "image_embeddings": torch.randn(1, embed_dim, *grid),
        "point_coords": torch.randint(0, int(sam.image_encoder.img_size), (1, 5, 2)).float(),
        "point_labels": torch.randint(0, 4, (1, 5)).float(),
        "mask_input": torch.randn(1, 1, *low_res),
        "has_mask_input": torch.tensor([1.0]),
        "orig_im_size": torch.tensor([480.0, 640.0]),
    }
    files = {}
    for name, single in (("decoder.onnx", False), ("decoder_single.onnx", True)):
        model = SamOnnxModel(sam, return_single_mask=single).eval()
        with torch.no_grad():
            torch.onnx.export(model, tuple(inputs.values()), str(out / name), input_names=list(inputs),
                              output_names=["masks", "iou_predictions", "low_res_masks"], opset_version=opset,
                              dynamic_axes={"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}},
                              dynamo=dynamo)
        files["single" if single else "multimask"] = name
    return {"files": files, "inputs": {k: list(v.shape) for k, v in inputs.items()},
            "dynamic": {"point_coords": [1], "point_labels": [1]},
            "outputs": ["masks", "iou_predictions", "low_res_masks"], "mask_input_size": low_res}


def check_encoder(sam, out: Path, meta: Dict[str, Any], tolerance: float) -> Dict[str, Any]:
    """ORT vs PyTorch on the fixed example: max abs error of the embeddings, routed indices equal."""
    wrapper = EncoderForExport(sam.image_encoder).eval()
    example = _example_image(int(sam.image_encoder.img_size))
    with torch.no_grad():
        ref = wrapper(example)
    ref = [t.numpy() for t in (ref if isinstance(ref, tuple) else (ref,))]
    got = _session(out / meta["file"]).run(None, {"image": example.numpy()})
    error = float(np.abs(got[0] - ref[0]).max())
    # top-k returns its picks unordered: compare the sets, window by window they are the same
    routed_equal = all(np.array_equal(np.sort(g, -1), np.sort(r, -1)) for g, r in zip(got[1:], ref[1:]))
    result = {"max_abs_error": error, "tolerance": tolerance, "routed_indices_equal": routed_equal,
              "routed_layers": len(ref) - 1, "passed": error <= tolerance and routed_equal}
    pos_embed = getattr(sam.image_encoder, "pos_embed", None)
    if not routed_equal and pos_embed is not None and not bool(pos_embed.detach().any()):
        # seen with a freshly built b+t at 1024: the example's zero padding gives identical tokens,
        # their routing scores tie exactly, and PyTorch and ORT break the tie differently
        result["note"] = ("the encoder's pos_embed is all zero (untrained?): identical tokens in the example's zero "
                          "padding score exactly alike and top-k breaks such ties differently in onnxruntime; "
                          "check a trained checkpoint")
    return result


def check_decoders(sam, out: Path, meta: Dict[str, Any], tolerance: float) -> Dict[str, Any]:
    from segment_anything.utils.onnx import SamOnnxModel

    g = torch.Generator().manual_seed(1)
    grid = sam.prompt_encoder.image_embedding_size
    size = int(sam.image_encoder.img_size)
    results = {}
    for kind, name in meta["files"].items():
        model = SamOnnxModel(sam, return_single_mask=kind == "single").eval()
        session = _session(out / name)
        errors = []
        for points in (1, 3, 7):  # the dynamic number of points, a box's two corners among them
            inputs = {
                "image_embeddings": torch.randn(1, sam.prompt_encoder.embed_dim, *grid, generator=g),
                "point_coords": torch.rand(1, points, 2, generator=g) * size,
                "point_labels": torch.tensor([[1.0] + [0.0, 2.0, 3.0, -1.0, 1.0, 0.0][: points - 1]]),
                "mask_input": torch.zeros(1, 1, 4 * grid[0], 4 * grid[1]),
                "has_mask_input": torch.tensor([0.0]),
                "orig_im_size": torch.tensor([300.0, 400.0]),
            }
            with torch.no_grad():
                ref = [t.numpy() for t in model(*inputs.values())]
            got = session.run(None, {k: v.numpy() for k, v in inputs.items()})
            # mask logits: compare where they decide something (|logit| large is still exact-ish)
            errors.append(max(float(np.abs(a - b).max()) for a, b in zip(got, ref)))
        results[kind] = {"max_abs_error": max(errors), "points_tried": [1, 3, 7]}
    passed = all(r["max_abs_error"] <= tolerance for r in results.values())
    return dict(results, tolerance=tolerance, passed=passed)


def compare_variant(out: Path, meta: Dict[str, Any], sam, target: Path, min_cosine: float) -> Dict[str, Any]:
    """A reduced-precision encoder file against the fp32 one under onnxruntime on the fixed input:
    cosine similarity of the embeddings (passes at ``min_cosine``) and whether the routed token
    indices are still the same (reported: lower precision may legitimately flip a near-tie)."""
    example = {"image": _example_image(int(sam.image_encoder.img_size)).numpy()}
    full = _session(out / meta["file"]).run(None, example)
    reduced = _session(target).run(None, example)
    a, b = full[0].ravel().astype(np.float64), reduced[0].ravel().astype(np.float64)
    cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))
    routed_equal = all(np.array_equal(x, y) for x, y in zip(full[1:], reduced[1:]))
    return {"file": target.name, "cosine_to_fp32": cosine, "min_cosine": min_cosine, "passed": cosine >= min_cosine,
            "routed_indices_equal": routed_equal, "bytes": target.stat().st_size,
            "fp32_bytes": (out / meta["file"]).stat().st_size}


def quantize_encoder(out: Path, meta: Dict[str, Any], sam, min_cosine: float) -> Dict[str, Any]:
    """``encoder.int8.onnx``: onnxruntime's dynamic int8 quantisation of the weights (CPU).

    ``reduce_range``: weights in 7 bits. x86 CPUs without VNNI (AVX2, AVX-512F) multiply u8
    activations by s8 weights with ``vpmaddubsw``, whose int16 pair sums saturate with full 8-bit
    weights: on such a CPU (an AMD EPYC with AVX2) the tiny b+t encoder's int8 embeddings had
    cosine 0.981 to fp32, 0.9997 with 7-bit weights. The file is made once and run on whatever
    CPU the user has, so it is always made safe for the saturating path (onnxruntime's
    quantisation guide gives the same advice)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    target = out / "encoder.int8.onnx"
    with contextlib.redirect_stdout(io.StringIO()):  # the quantiser prints shape-inference notes
        quantize_dynamic(str(out / meta["file"]), str(target), weight_type=QuantType.QInt8, reduce_range=True)
    return compare_variant(out, meta, sam, target, min_cosine)


def half_encoder(out: Path, meta: Dict[str, Any], sam, min_cosine: float) -> Dict[str, Any]:
    """``encoder.fp16.onnx``: weights and activations in float16 with float32 inputs and outputs
    (``keep_io_types``: the same predictor feeds it), for GPU and WebGPU runtimes; half the file.
    onnxruntime's own converter (``onnxruntime.transformers.float16``). On a CPU it runs, with
    casts, but slower than fp32: CPUs have few fp16 kernels."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    target = out / "encoder.fp16.onnx"
    model = onnx.load(str(out / meta["file"]))
    # the routing's scatter-add stays float32: onnxruntime's CPU kernel has no float16 reduction
    keep_fp32 = list(DEFAULT_OP_BLOCK_LIST) + ["ScatterND"]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        half = convert_float_to_float16(model, keep_io_types=True, op_block_list=keep_fp32)
    onnx.save(half, str(target))
    return compare_variant(out, meta, sam, target, min_cosine)


def export(model: str, checkpoint: Optional[str], out: Path, opset: int = OPSET, tolerance: float = DEFAULT_TOLERANCE,
           quantize: bool = False, min_cosine: float = 0.99, dynamo: bool = False, keep_ratio: Optional[float] = None,
           check: bool = True, fp16: bool = False) -> Dict[str, Any]:
    """Export ``model`` (a name ``blvit-eval --model`` takes) and check it; returns export.json's content."""
    from eval.sam_eval import load_sam_model

    sam, info = load_sam_model(model, checkpoint, keep_ratio)
    sam = sam.eval().float()
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    meta: Dict[str, Any] = {"model": info, "opset": opset, "img_size": int(sam.image_encoder.img_size),
                            "exporter": "torch.onnx.export(dynamo=True)" if dynamo else
                            "torch.onnx.export(dynamo=False): TorchScript tracing",
                            "torch": torch.__version__, "mask_threshold": float(sam.mask_threshold),
                            "pixel_mean": sam.pixel_mean.flatten().tolist(), "pixel_std": sam.pixel_std.flatten().tolist()}
    meta["encoder"] = export_encoder(sam, out, opset, dynamo)
    meta["decoder"] = export_decoders(sam, out, opset, dynamo)
    if check:
        meta["check"] = {"encoder": check_encoder(sam, out, meta["encoder"], tolerance),
                         "decoder": check_decoders(sam, out, meta["decoder"], tolerance)}
    if quantize:
        meta["encoder_int8"] = quantize_encoder(out, meta["encoder"], sam, min_cosine)
    if fp16:
        meta["encoder_fp16"] = half_encoder(out, meta["encoder"], sam, min_cosine)
    meta["seconds"] = round(time.time() - started, 1)
    (out / "export.json").write_text(json.dumps(meta, indent=2))
    return meta


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="as blvit-eval --model: vit_b, dense_vit_b, b+t, h+b, evit-b, ...")
    parser.add_argument("--checkpoint", help="official SAM file or a checkpoint of this toolkit (none: random weights)")
    parser.add_argument("--keep-ratio", type=float, help="override a bLViT model's keep ratio")
    parser.add_argument("--out", type=Path, required=True, help="folder for the .onnx files and export.json")
    parser.add_argument("--opset", type=int, default=OPSET)
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE, help="max abs error, ORT vs PyTorch (fp32)")
    parser.add_argument("--quantize", action="store_true", help="also write encoder.int8.onnx (dynamic int8)")
    parser.add_argument("--fp16", action="store_true", help="also write encoder.fp16.onnx (float16 inside, float32 in and out)")
    parser.add_argument("--min-cosine", type=float, default=0.99, help="int8 / fp16 encoder vs fp32: least cosine similarity")
    parser.add_argument("--dynamo", action="store_true", help="the dynamo-based exporter instead of TorchScript tracing")
    parser.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison")
    args = parser.parse_args(argv)
    meta = export(args.model, args.checkpoint, args.out, args.opset, args.tolerance, args.quantize, args.min_cosine,
                  args.dynamo, args.keep_ratio, not args.no_check, args.fp16)
    check = meta.get("check", {})
    for part, result in check.items():
        if "max_abs_error" in result:
            error = result["max_abs_error"]
        else:  # the decoders: the worst of the two files
            error = max(r["max_abs_error"] for r in result.values() if isinstance(r, dict))
        routed = ""
        if result.get("routed_layers"):
            routed = "; routed indices " + ("equal" if result["routed_indices_equal"] else "DIFFER")
        print(f"{part}: max abs error {error:.2e} (tolerance {result['tolerance']:g}){routed} "
              f"-> {'ok' if result['passed'] else 'FAILED'}")
        if "note" in result:
            print(f"{part}: {result['note']}")
    variants = [key for key in ("encoder_int8", "encoder_fp16") if key in meta]
    for key in variants:
        q = meta[key]
        routed = "" if meta["encoder"]["outputs"] == ["image_embeddings"] else \
            f", routed indices {'equal' if q['routed_indices_equal'] else 'differ'}"
        print(f"{key[8:]} encoder: cosine to fp32 {q['cosine_to_fp32']:.4f}{routed}, {q['bytes'] / 2**20:.1f} MiB "
              f"(fp32 {q['fp32_bytes'] / 2**20:.1f} MiB) -> {'ok' if q['passed'] else 'FAILED'}")
    print(f"wrote {args.out} (export.json)")
    failed = [p for p, r in check.items() if not r["passed"]] + [key for key in variants if not meta[key]["passed"]]
    if failed:
        print(f"blvit-export: check FAILED for {', '.join(failed)} (see {args.out / 'export.json'})", file=sys.stderr)
        raise SystemExit(3)


if __name__ == "__main__":
    main()
