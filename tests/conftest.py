import sys
from functools import partial
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# CI machines are small (2 cores) and often shared: with more than one intra-op thread the tiny
# models' many small ops wait on descheduled threads (a tiny training step measured 2.7 s with 2
# threads, 6 ms with one). One thread for the whole suite; torchrun tests set OMP_NUM_THREADS=1.
torch.set_num_threads(1)


def pytest_collection_modifyitems(session, config, items):
    """The longest files first. CI runs the suite on two workers (``-n 2 --dist worksteal`` in
    setup.cfg): each worker starts on one half of this order and an idle one takes tests from the
    end of the other's queue, so with the long files at the front the run ends on short tests
    instead of one worker running a long file alone (``--dist loadfile`` hands out files by test
    count, which put the 165 s R-MeeTo test last: 15 min). A file's length is guessed from its
    ``heavy`` tests: ``seconds`` where the marker gives it (the few single tests of minutes),
    else 30 each."""
    cost = {}
    for item in items:
        mark = item.get_closest_marker("heavy")
        cost[item.path] = cost.get(item.path, 0) + (0 if mark is None else mark.kwargs.get("seconds", 30))
    order = {path: rank for rank, path in enumerate(sorted(cost, key=lambda p: -cost[p]))}
    items.sort(key=lambda item: order[item.path])  # stable: the order inside a file is kept

# Small shapes for CI: a 256 x 256 input gives a 16 x 16 grid, so windows of 14 are padded to
# 28 x 28 and border windows hold few real tokens (the hard case for per-window selection).
TINY = dict(img_size=256, embed_dim=64, depth=4, num_heads=4, global_attn_indexes=(1, 3))
TINY_BT = dict(TINY, e_embed_dim=32, e_num_heads=2, blvit_layers=(1, 2, 3), predictor_layers=(1, 3))


def randomize_(module: torch.nn.Module, std: float = 0.5) -> torch.nn.Module:
    """Stock SAM zero-initialises rel-pos tables and pos_embed; give them values so that a
    test comparing two encoders would notice if either were ignored."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "rel_pos" in name or "pos_embed" in name:
                p.normal_(0, std)
    return module


def stock_sam(embed_dim: int, depth: int, num_heads: int, global_attn_indexes, img_size: int = 1024):
    """A stock segment-anything ``Sam`` of any size, in the official layout."""
    from segment_anything.modeling import ImageEncoderViT

    from sam_adapter import sam_from_encoder

    encoder = ImageEncoderViT(
        depth=depth,
        embed_dim=embed_dim,
        img_size=img_size,
        mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=num_heads,
        patch_size=16,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=tuple(global_attn_indexes),
        window_size=14,
        out_chans=256,
    )
    return randomize_(sam_from_encoder(encoder)).eval()


@pytest.fixture(scope="session")
def tiny_sam_checkpoint(tmp_path_factory):
    """A stock SAM with the TINY encoder, saved as a plain state dict like the official files."""
    torch.manual_seed(0)
    sam = stock_sam(TINY["embed_dim"], TINY["depth"], TINY["num_heads"], TINY["global_attn_indexes"], TINY["img_size"])
    path = tmp_path_factory.mktemp("ckpt") / "sam_tiny.pth"
    torch.save(sam.state_dict(), path)
    return path, sam


@pytest.fixture(scope="session")
def official_vit_b_1024(tmp_path_factory):
    """SAM ViT-B in the official layout with random weights, saved as an official .pth, one
    1024 x 1024 input and the stock encoder's output on it: (path, x, ref, stock Sam)."""
    from segment_anything import sam_model_registry as stock_registry

    torch.manual_seed(0)
    stock = randomize_(stock_registry["vit_b"](), std=0.05)
    path = tmp_path_factory.mktemp("official_vit_b") / "sam_vit_b_random.pth"
    torch.save(stock.state_dict(), path)
    x = torch.randn(1, 3, 1024, 1024)
    with torch.no_grad():
        ref = stock.image_encoder(x)
    return path, x, ref, stock


def interrupted_copy(run_dir: Path, copy_dir: Path, step: int) -> Path:
    """What a run killed right after checkpoint ``step`` leaves behind: ``run_dir``'s checkpoints
    up to that step, copied to ``copy_dir``/checkpoints with ``latest.txt`` pointing at it."""
    import shutil

    ckpts = Path(copy_dir) / "checkpoints"
    shutil.copytree(Path(run_dir) / "checkpoints", ckpts)
    for path in ckpts.glob("step_*.pth"):
        if int(path.stem.split("_")[1]) > step:
            path.unlink()
    (ckpts / "latest.txt").write_text(f"step_{step}.pth")
    return ckpts


def tiny_dense_checkpoint(path: Path) -> Path:
    """A randomly initialised dense SAM of this toolkit's format, small enough for a CPU test."""
    import torch

    from sam_adapter import build_sam_blvit
    from sam_adapter.checkpoint import FORMAT, FORMAT_VERSION

    sam = build_sam_blvit("vit_b", keep_ratio=1.0, img_size=256, embed_dim=64, depth=2, num_heads=4,
                          global_attn_indexes=(1,), out_chans=64)
    torch.save({"format": FORMAT, "version": FORMAT_VERSION, "config": sam.image_encoder.config.to_dict(),
                "model": sam.state_dict()}, path)
    return path
