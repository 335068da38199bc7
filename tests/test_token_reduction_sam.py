"""EViT, Evo-ViT and ToMe on SAM's encoder (sam_adapter/token_reduction.py): exactness at keep 1 /
r = 0 against segment-anything's encoder from an official-format file, the reduction itself,
ToMe's merge / unmerge, checkpoints, the CLIs' model names, and training."""
import logging

import pytest
import torch

from blvit.flops import count_macs_on_meta
from blvit.layers import set_attention_backend
from sam_adapter import build_sam_blvit, save_blvit_sam_checkpoint
from sam_adapter.build import build_sam_from_checkpoint, sam_model_registry
from sam_adapter.config import VARIANTS, make_config
from sam_adapter.token_reduction import TokenReductionImageEncoder, WindowTokens, bipartite_merge

from conftest import TINY, stock_sam

BASELINES = ("evit-b", "evit-h", "evovit-b", "evovit-h", "tome-b", "tome-h")
# the tiny layout (depth 4, globals 1 and 3, SAM's 14-token windows on a 16 x 16 grid: padded windows)
TINY_LAYERS = {"evit": dict(reduction_layers=(1, 2)), "evovit": dict(reduction_layers=(2,)),
               "tome": dict(reduction_layers=(0,))}
IDENTITY = {"evit": dict(keep_ratio=1.0), "evovit": dict(keep_ratio=1.0), "tome": dict(merge_r=0)}
REDUCED = {"evit": dict(keep_ratio=0.5), "evovit": dict(keep_ratio=0.5), "tome": dict(merge_r=20)}


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def _tiny(name, setting, window_size=14):
    method = VARIANTS[name]["reduction"]
    return dict(TINY, window_size=window_size, **TINY_LAYERS[method], **setting[method])


@pytest.fixture(scope="module")
def official_tiny(tmp_path_factory):
    """A stock SAM of the tiny layout with random weights, saved as an official file is."""
    torch.manual_seed(0)
    sam = stock_sam(TINY["embed_dim"], TINY["depth"], TINY["num_heads"], TINY["global_attn_indexes"], TINY["img_size"])
    with torch.no_grad():
        for p in sam.image_encoder.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path_factory.mktemp("official") / "sam_tiny.pth"
    torch.save(sam.state_dict(), path)
    return path, sam


@pytest.mark.parametrize("name", BASELINES)
def test_keep_one_or_no_merge_is_the_stock_encoder(official_tiny, name, caplog):
    """Every token kept / none merged: segment-anything's output from the same official file, which
    loads with nothing missing (the methods add no parameter)."""
    path, stock = official_tiny
    x = torch.randn(2, 3, 256, 256)
    with caplog.at_level(logging.INFO, logger="sam_adapter"):
        model = build_sam_blvit(name, sam_checkpoint=path, **_tiny(name, IDENTITY))
    assert "0 new encoder tensors" in caplog.text
    assert isinstance(model.image_encoder, TokenReductionImageEncoder)
    with torch.no_grad():
        ref = stock.image_encoder(x)
        assert rel_err(model.image_encoder(x), ref) < 1e-4
        reduced = build_sam_blvit(name, sam_checkpoint=path, **_tiny(name, REDUCED))
        assert rel_err(reduced.image_encoder(x), ref) > 1e-3  # the reducing path computes something else


@pytest.mark.parametrize("backend", ("sdpa", "folded"))
def test_both_attention_backends_are_the_stock_encoder(official_tiny, backend):
    """The bias as a tensor (sdpa, default) or folded into q and k: the same function."""
    path, stock = official_tiny
    x = torch.randn(1, 3, 256, 256)
    for name in ("evit-b", "tome-b"):
        model = build_sam_blvit(name, sam_checkpoint=path, **_tiny(name, IDENTITY))
        set_attention_backend(model, backend)
        with torch.no_grad():
            assert rel_err(model.image_encoder(x), stock.image_encoder(x)) < 1e-4, name


@pytest.mark.heavy
def test_keep_one_matches_stock_vit_b_at_1024(official_vit_b_1024):
    """The real ViT-B layout at 1024 (25 windows of 14 x 14 on 64 x 64, padded), EViT with its
    three reducing layers in place (the folded backend: the faster one on a CPU)."""
    path, x, ref, _ = official_vit_b_1024
    with torch.no_grad():
        model = set_attention_backend(build_sam_blvit("evit-b", sam_checkpoint=path, keep_ratio=1.0), "folded")
        assert rel_err(model.image_encoder(x), ref) < 1e-4


@pytest.mark.parametrize("name", BASELINES)
def test_reduction_processes_fewer_tokens_and_costs_less(name):
    """At the tiny layout's reducing settings (8 x 8 windows: no padding, which the dense encoder
    never projects): fewer grid tokens processed after the first reducing layer, fewer MACs than
    the dense encoder, and every output finite."""
    cfg = make_config(name, **_tiny(name, REDUCED, window_size=8))
    dense = make_config("vit_b", **TINY, window_size=8)
    torch.manual_seed(0)
    encoder = TokenReductionImageEncoder(cfg).eval()
    encoder.record_selections = True
    with torch.no_grad():
        out = encoder(torch.randn(1, 3, 256, 256))
    assert out.shape == (1, 256, 16, 16) and torch.isfinite(out).all()
    processed = {layer: int(mask.sum()) for layer, mask in encoder.last_selections.items()}
    assert processed and all(n < 256 for n in processed.values()), processed
    macs = count_macs_on_meta(lambda: TokenReductionImageEncoder(cfg), (1, 3, 256, 256))
    dense_macs = count_macs_on_meta(lambda: build_sam_blvit("vit_b", keep_ratio=1.0, **TINY, window_size=8).image_encoder,
                                    (1, 3, 256, 256))
    assert macs < 0.95 * dense_macs, (macs, dense_macs)
    assert dense.reduction == ""


def test_default_settings_give_the_flops_of_b_plus_t_and_h_plus_b():
    """The variants' defaults are chosen to cost what B+T / H+B cost (within 5 % of dense)."""
    shape = (1, 3, 1024, 1024)

    def macs(name):
        return count_macs_on_meta(lambda: sam_model_registry[name]().image_encoder, shape)

    for family, ours in (("b", "b+t"), ("h", "h+b")):
        dense, target = macs(f"dense_vit_{family}"), macs(ours)
        for method in ("evit", "evovit", "tome"):
            ratio = macs(f"{method}-{family}") / dense
            assert abs(ratio - target / dense) < 0.05, (method, family, ratio, target / dense)


def test_tome_merges_the_most_similar_pair_and_unmerges_to_every_source():
    """Window of 4 tokens (A = 0, 2; B = 1, 3); token 2 is token 3 again: r = 1 merges 2 into 3."""
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 3.0], [-1.0, 3.0]])[None, None]
    row = torch.tensor([[[0, 0, 1, 1]]])
    col = torch.tensor([[[0, 1, 0, 1]]])
    t = WindowTokens(x, row, col, torch.zeros(1, 1, 4, dtype=torch.bool), torch.ones(1, 1, 4))
    merged, new_index = bipartite_merge(t, x, 1)
    assert merged.x.shape == (1, 1, 3, 2)
    assert new_index.tolist() == [[[0, 1, 2, 2]]]  # 0 stays (first), 1 and 3 are B, 2 went into 3
    assert merged.size.tolist() == [[[1.0, 1.0, 2.0]]]
    torch.testing.assert_close(merged.x[0, 0, 2], torch.tensor([-1.0, 3.0]))
    assert (merged.row[0, 0, 2], merged.col[0, 0, 2]) == (1, 1)  # the destination's position
    unmerged = merged.x.gather(2, new_index[..., None].expand(-1, -1, -1, 2))
    torch.testing.assert_close(unmerged[0, 0, 2], unmerged[0, 0, 3])
    # size-weighted: merging a token of size 2 with one of size 1
    t2 = WindowTokens(torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0], [3.0, 0.3]])[None, None], row, col,
                      torch.zeros(1, 1, 4, dtype=torch.bool), torch.tensor([[[2.0, 1.0, 1.0, 1.0]]]))
    merged2, _ = bipartite_merge(t2, t2.x, 1)
    torch.testing.assert_close(merged2.x[0, 0, -1], torch.tensor([3.0, 0.1]))
    assert merged2.size[0, 0, -1] == 3.0


def test_padding_and_extra_tokens_never_merge():
    x = torch.randn(1, 1, 4, 3)
    x[0, 0, 2] = x[0, 0, 3]  # the most similar pair, but 3 is window padding
    pad = torch.tensor([[[False, False, False, True]]])
    t = WindowTokens(x, torch.zeros(1, 1, 4, dtype=torch.long), torch.arange(4)[None, None], pad,
                     (~pad).float())
    merged, new_index = bipartite_merge(t, x, 1)
    assert new_index[0, 0, 2] != new_index[0, 0, 3]  # 2 did not go into the padding
    assert merged.pad.sum() == 1


@pytest.mark.parametrize("name", ("evit-b", "evovit-b", "tome-b"))
def test_checkpoint_round_trip_and_model_names(tmp_path, name):
    """Saved by the toolkit, rebuilt by build_sam_from_checkpoint with the same output; blvit-eval's
    loader refuses a checkpoint of another method; blvit-bench parses NAME@VALUE."""
    from blvit_apps.sam_benchmark import encoder_options
    from eval.sam_eval import load_sam_model

    torch.manual_seed(0)
    sam = build_sam_blvit(name, **_tiny(name, REDUCED))
    path = tmp_path / f"{name}.pth"
    save_blvit_sam_checkpoint(sam, path)
    again = build_sam_from_checkpoint(path)
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        torch.testing.assert_close(again.image_encoder(x), sam.image_encoder(x))
    loaded, info = load_sam_model(name, str(path))
    assert info["layout"] == name and info["encoder"] == "TokenReductionImageEncoder"
    with pytest.raises(ValueError, match="asks for"):
        load_sam_model("b+t", str(path))
    setting = encoder_options(name, "7")
    assert setting == ({"merge_r": 7} if name.startswith("tome") else {"keep_ratio": 7.0})
    assert encoder_options(name, "") == {}


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="blvit_layers must be empty"):
        make_config("evit-b", blvit_layers=(1, 2))
    with pytest.raises(ValueError, match="reduction_layers"):
        make_config("evit-b", reduction_layers=(12,))
    with pytest.raises(ValueError, match="reduction 'dropout'"):
        make_config("vit_b", reduction="dropout", reduction_layers=(1,))
    with pytest.raises(ValueError, match="after layer 0"):
        make_config("evovit-b", reduction_layers=(0,))


@pytest.mark.parametrize("name", ("evit-b", "evovit-b"))
def test_gradients_reach_every_block(name):
    """Training through the reduced path: finite gradients in every block, the patch embedding
    and the neck (the reduced tokens' return path carries gradient)."""
    torch.manual_seed(0)
    encoder = TokenReductionImageEncoder(make_config(name, **_tiny(name, REDUCED))).train()
    encoder(torch.randn(2, 3, 256, 256)).square().mean().backward()
    for pname, p in encoder.named_parameters():
        if "rel_pos" in pname:
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", ("evit-b", "evovit-b", "tome-b"))
def test_activation_checkpointing_gives_the_same_gradients(name):
    torch.manual_seed(0)
    encoder = TokenReductionImageEncoder(make_config(name, **_tiny(name, REDUCED))).train()
    x = torch.randn(1, 3, 256, 256)
    grads = []
    for flag in (False, True):
        encoder.zero_grad()
        encoder.grad_checkpointing = flag
        encoder(x).square().mean().backward()
        grads.append(encoder.patch_embed.proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


LEARN_DATA = dict(height=120, width=160, kinds=(3,), flat=True, max_objects=3)
LEARN_LAYOUT = "img_size: 128, embed_dim: 64, depth: 4, num_heads: 4, global_attn_indexes: [1, 3], window_size: 4, out_chans: 64"
LEARN_SETTINGS = {"evit-b": "reduction_layers: [1, 2], keep_ratio: 0.5", "evovit-b": "reduction_layers: [2], keep_ratio: 0.5",
                  "tome-b": "reduction_layers: [0], merge_r: 3"}


@pytest.fixture(scope="module")
def learning_data(tmp_path_factory):
    from blvit.data.synthetic import write_sa1b

    root = tmp_path_factory.mktemp("reduction_learning")
    write_sa1b(root / "train", 120, seed=10, **LEARN_DATA)
    write_sa1b(root / "val", 8, seed=11, **LEARN_DATA)
    return root


@pytest.mark.heavy
@pytest.mark.parametrize("name", ("evit-b", "evovit-b", "tome-b"))
def test_each_family_learns_with_the_quick_start_recipe(learning_data, tmp_path, name):
    """The quick-start teacher's recipe (SAM's prompts and loss, trainer and data of the quick start)
    on a reduced encoder from scratch, 300 steps: held-out box mIoU well above the untrained model's."""
    import json
    from pathlib import Path

    from blvit.train.config import load_config
    from sam_adapter.trainer import train

    config = Path(__file__).resolve().parents[1] / "configs/sam/quickstart_teacher.yaml"
    cfg = load_config(config, [f"data.root={learning_data / 'train'}", f"data.val_root={learning_data / 'val'}",
                               f"output_dir={tmp_path}", f"model.variant={name}",
                               f"model.overrides={{{LEARN_LAYOUT}, {LEARN_SETTINGS[name]}}}",
                               "train.max_steps=300", "train.epochs=100", "train.lr=1e-3", "train.save_every=300"])
    train(cfg)
    val = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if "val_box_miou" in line]
    before, after = val[0]["val_box_miou"], val[-1]["val_box_miou"]
    print(f"{name}: held-out box mIoU {before:.3f} untrained -> {after:.3f} after {val[-1]['step']} steps")
    assert val[0]["step"] == 0 and val[-1]["step"] == 300
    assert after > before + 0.15, (before, after)
