"""timm's generic model tests (timm's ``tests/test_models.py``), rewritten for the 11 models this
toolkit registers: forward, backward, the pretrained cfg and classifier API, ``features_only``,
``forward_intermediates``, FX tracing (``torch.fx`` and torchvision's feature extractor) and
TorchScript (by ``torch.jit.trace``; ``torch.jit.script`` gets one clear error, documented in
docs/method.md). Tiny layouts of each registered name keep it fast on a CPU."""
import math
import warnings

import pytest
import timm
import torch

import blvit  # noqa: F401  (registers the models)

BATCH = 2
TINY = {
    "blvit": dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4, num_classes=10, e_embed_dim=32,
                  e_num_heads=2, blvit_layers=(1, 2, 3), predictor_layers=(1, 3), keep_ratio=0.5),
    "evit": dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4, num_classes=10,
                 reorganize_layers=(1, 3), keep_rate=0.5),
    "evovit": dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4, num_classes=10,
                   prune_start=1, stage_starts=(1, 3), keep_rate=0.5),
    "dynamicvit": dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4, num_classes=10,
                       prune_layers=(1, 3), keep_ratio=0.5),
    "vim": dict(img_size=32, patch_size=8, depth=4, embed_dim=32, num_classes=10),
}
# image models; the video models (videomamba_*: clips in, no 2-D feature maps) have tests/test_videomamba.py
MODELS = sorted(n for n in timm.list_models() if timm.models._registry._model_entrypoints[n].__module__.startswith("blvit.")
                and not n.startswith("videomamba_"))


def test_all_eleven_models_are_covered():
    assert len(MODELS) == 11, MODELS


def _create(name, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, **dict(TINY[name.split("_")[0]], **kwargs))


def _input():
    return torch.randn(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", MODELS)
def test_model_forward(name):
    model = _create(name).eval()
    out = model(_input())
    assert out.shape == (BATCH, 10) and not torch.isnan(out).any()


@pytest.mark.parametrize("name", MODELS)
def test_model_backward(name):
    """Every parameter gets a gradient in training (as timm asserts)."""
    model = _create(name).train()
    model(_input()).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    assert all(not torch.isnan(p.grad).any() for p in model.parameters())


@pytest.mark.parametrize("name", MODELS)
def test_model_default_cfg_and_classifier_api(name):
    model = _create(name).eval()
    cfg = model.pretrained_cfg
    for key in ("input_size", "mean", "std", "num_classes", "first_conv", "classifier", "crop_pct", "interpolation"):
        assert key in cfg, key
    first_conv = dict(model.named_modules())[cfg["first_conv"]]
    assert isinstance(first_conv, torch.nn.Conv2d) and first_conv.in_channels == 3
    assert model.get_classifier() is dict(model.named_modules())[cfg["classifier"]]
    x = _input()
    features = model.forward_features(x)
    assert features.dim() == 3 and features.shape[-1] == model.num_features
    assert model.forward_head(features, pre_logits=True).shape == (BATCH, model.num_features)
    model.reset_classifier(0)
    assert model(x).shape == (BATCH, model.num_features)
    model.reset_classifier(7)
    assert model(x).shape == (BATCH, 7)


def _check_maps(maps, channels, reductions):
    assert len(maps) == len(channels) >= 3
    for o, c, r in zip(maps, channels, reductions):
        assert o.shape[0] == BATCH and o.shape[1] == c
        assert o.shape[2] <= math.ceil(32 / r) + 1 and o.shape[3] <= math.ceil(32 / r) + 1
        assert not torch.isnan(o).any()


@pytest.mark.parametrize("name", MODELS)
def test_model_features_only(name):
    model = _create(name, features_only=True).eval()
    maps = model(_input())
    _check_maps(maps, model.feature_info.channels(), model.feature_info.reduction())
    assert model.feature_info.reduction() == [8, 8, 8]
    out_indices = _create(name, features_only=True, out_indices=(0, 2)).eval()
    assert [m.shape for m in out_indices(_input())] == [maps[0].shape] * 2


@pytest.mark.parametrize("name", MODELS)
def test_model_forward_intermediates(name):
    model = _create(name).eval()
    info = timm.models.FeatureInfo(model.feature_info, range(len(model.feature_info)))
    x = _input()
    final, maps = model.forward_intermediates(x)
    _check_maps(maps, info.channels(), info.reduction())
    torch.testing.assert_close(final, model.forward_features(x))
    tokens = model.forward_intermediates(x, indices=[1, 3], output_fmt="NLC", intermediates_only=True)
    grid = model.forward_intermediates(x, indices=[1, 3], intermediates_only=True, stop_early=True)
    assert len(tokens) == len(grid) == 2
    # the grid holds each token at its patch: all of them where nothing is dropped, the kept ones
    # (EViT / DynamicViT) where tokens are, zero elsewhere
    for t, g in zip(tokens, grid):
        flat = g.flatten(2).transpose(1, 2)  # (B, H*W, C)
        if t.shape[1] == flat.shape[1]:
            torch.testing.assert_close(t, flat)
        else:
            present = flat.abs().sum(-1) > 0
            assert (present.sum(1) <= t.shape[1]).all() and present.sum() > 0
            for row_t, row_g in zip(t, flat):
                for token in row_g[row_g.abs().sum(-1) > 0]:
                    assert torch.isclose(row_t, token).all(-1).any()
    with_prefix = model.forward_intermediates(x, indices=1, return_prefix_tokens=True, intermediates_only=True)
    assert with_prefix[0][1].shape == (BATCH, 1, model.num_features)
    normed = model.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)
    assert normed[0].shape == maps[-1].shape


def test_vim_intermediates_after_a_merge_are_tokens_not_a_grid():
    from blvit.tokens import apply_rmeeto

    model = apply_rmeeto(_create("vim_tiny_patch16_224").eval(), r=2, layers=[2])
    x = _input()
    before, after = model.forward_intermediates(x, indices=[1, 3], output_fmt="NLC", intermediates_only=True)
    assert before.shape[1] == 16 and after.shape[1] == 14
    assert model.forward_intermediates(x, indices=[1], intermediates_only=True)[0].shape == (BATCH, 32, 4, 4)
    with pytest.raises(ValueError, match="block 3: its tokens are merged .* output_fmt='NLC'"):
        model.forward_intermediates(x, indices=[3])


@pytest.mark.parametrize("name", MODELS)
def test_model_forward_fx(name):
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    model = _create(name).eval()
    x = _input()
    graph = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(graph(x), model(x))
    blocks = "layers" if name.startswith("vim") else "blocks"
    nodes = dict(zip(("train", "eval"), get_graph_node_names(model)))  # DynamicViT's differ by mode

    def wanted(names):
        return {[n for n in names if n.startswith(f"{blocks}.2")][-1]: "block2", names[-1]: "out"}

    extractor = create_feature_extractor(model, train_return_nodes=wanted(nodes["train"]),
                                         eval_return_nodes=wanted(nodes["eval"]))
    out = extractor(x)  # dead code eliminated: only what the return nodes need, which must be exact
    torch.testing.assert_close(out["out"], model(x))
    assert out["block2"].shape[0] == BATCH


def test_fx_refuses_vim_with_merging_clearly():
    from blvit.tokens import apply_rmeeto

    model = apply_rmeeto(_create("vim_tiny_patch16_224").eval(), r=2, layers=[2])
    with pytest.raises(NotImplementedError, match="token merging installed.*remove_rmeeto"):
        torch.fx.symbolic_trace(model)


@pytest.mark.parametrize("name", MODELS)
def test_model_torchscript(name):
    """TorchScript by tracing works at a fixed input size; scripting gets one clear error."""
    model = _create(name).eval()
    x = _input()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, x, check_trace=False)
        torch.testing.assert_close(traced(x), model(x))
        with pytest.raises(RuntimeError, match="torch.jit.script does not compile .*torch.jit.trace"):
            torch.jit.script(model)
