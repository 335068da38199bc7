"""The bLViT ImageNet classifier and the EViT baseline: DeiT equivalence, timm names,
checkpoints, selection, gradients, FLOPs."""

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models.vision_transformer import VisionTransformer

import blvit  # noqa: F401  (registers the timm names)
from blvit.models import (
    BigLittleViT,
    EViT,
    analytic_classifier_macs,
    classifier_macs,
    load_blvit_checkpoint,
    load_dense_checkpoint,
    make_config,
    reorganize_tokens,
    save_blvit_checkpoint,
)
from blvit.utils.io import CheckpointError

BT = "blvit_base_tiny_patch16_224"
ST = "blvit_small_tiny_patch16_224"
# A tiny DeiT-like layout: 32 x 32 images, 8 x 8 patches (16 patches + class token), width 64.
TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4, num_classes=10)
TINY_BT = dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4, num_classes=10,
               e_embed_dim=32, e_num_heads=2, blvit_layers=(1, 2, 3), predictor_layers=(1, 3))
TINY_EVIT = dict(TINY_VIT, reorganize_layers=(1, 3))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def perturb_(model: torch.nn.Module, std: float = 0.02) -> torch.nn.Module:
    """timm's init leaves LayerNorms at 1/0 and biases at 0; move every tensor so a swapped or
    ignored parameter would show."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)
    return model


def tiny_timm_vit(seed: int = 0, **overrides) -> VisionTransformer:
    torch.manual_seed(seed)
    return perturb_(VisionTransformer(**dict(TINY_VIT, **overrides))).eval()


def save(obj, path):
    torch.save(obj, path)
    return path


@pytest.fixture(scope="module")
def tiny_deit(tmp_path_factory):
    """A tiny timm ViT saved in both layouts: plain timm state dict and DeiT's {"model": sd}."""
    ref = tiny_timm_vit()
    folder = tmp_path_factory.mktemp("tiny_deit")
    sd = ref.state_dict()
    return ref, {"timm": save(sd, folder / "timm.pth"), "deit": save({"model": sd}, folder / "deit.pth")}


# ------------------------------------------------------------------------------------------
# Equivalence with DeiT at keep ratio 1.0
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["timm", "deit"])
def test_tiny_blvit_equals_timm_vit_at_keep_1(tiny_deit, layout):
    ref, paths = tiny_deit
    model = timm.create_model(BT, keep_ratio=1.0, dense_checkpoint=paths[layout], **TINY_BT).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = ref(x)
        assert rel_err(model(x), expected) < 1e-4
        assert rel_err(model.forward_features(x), ref.forward_features(x)) < 1e-4
        model.keep_ratio = 0.25  # the saving path computes something else
        assert rel_err(model(x), expected) > 1e-3


@pytest.mark.heavy
def test_deit_b_checkpoint_both_layouts_gives_deit_b_logits(tmp_path):
    """B+T built from a (random) DeiT-B file reproduces timm's deit_base_patch16_224; the
    original DeiT layout ({"model": sd}) loads the very same tensors."""
    torch.manual_seed(0)
    deit = timm.create_model("deit_base_patch16_224", pretrained=False).eval()
    with torch.no_grad():  # LayerNorms and biases away from 1 / 0 (cheap: 1-D tensors only)
        for p in deit.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.02)
    sd = deit.state_dict()
    plain = save(sd, tmp_path / "deit_base_timm.pth")
    wrapped = save({"model": sd}, tmp_path / "deit_base_patch16_224-original.pth")
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        expected = deit(x)
    del deit
    model = timm.create_model(BT, keep_ratio=1.0, dense_checkpoint=plain).eval()
    with torch.inference_mode():
        assert rel_err(model(x), expected) < 1e-4
    loaded = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    kept = load_dense_checkpoint(model, wrapped)
    assert kept and all(BigLittleViT.is_new_parameter(k) for k in kept)
    for k, v in model.state_dict().items():
        if k not in kept:
            assert torch.equal(v, loaded[k]), k


# ------------------------------------------------------------------------------------------
# timm registration, API, checkpoints
# ------------------------------------------------------------------------------------------


def test_timm_names_and_classifier_api():
    assert {BT, ST} <= set(timm.list_models("blvit_*"))
    assert {"evit_base_patch16_224", "evit_small_patch16_224"} <= set(timm.list_models("evit_*"))
    model = timm.create_model(BT, **TINY_BT).eval()
    assert isinstance(model, BigLittleViT) and model.num_classes == 10 and model.keep_ratio == 0.25
    for cfg in (model.pretrained_cfg, model.default_cfg):
        assert cfg["mean"] == IMAGENET_DEFAULT_MEAN and cfg["std"] == IMAGENET_DEFAULT_STD
        assert cfg["input_size"] == (3, 224, 224) and cfg["classifier"] == "head"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 17, 64)
        assert model.forward_head(feats).shape == (2, 10)
        assert model.forward_head(feats, pre_logits=True).shape == (2, 64)
        assert torch.equal(model(x), model.forward_head(feats))
    nwd = model.no_weight_decay()
    gammas = {n for n, _ in model.named_parameters() if "gamma" in n}
    assert len(gammas) == 3 * 3 and {"pos_embed", "cls_token"} | gammas <= nwd
    model.reset_classifier(5)
    assert model.num_classes == 5 and model(x).shape == (2, 5)
    model.reset_classifier(0)
    assert model(x).shape == (2, 64)
    # the paper's layouts (built on meta: shapes only)
    with torch.device("meta"):
        bt = timm.create_model(BT)
        st = timm.create_model(ST, keep_ratio=0.5)
    assert bt.config.blvit_layers == tuple(range(1, 12)) and bt.config.predictor_layers == (1, 4, 7, 10)
    assert type(bt.blocks[0]).__name__ == "DenseBlock"
    assert bt.blocks[5].attn.qkv.weight.shape == (3 * 768, 768)
    assert bt.blocks[5].e_block.attn.qkv.weight.shape == (3 * 192, 768)
    assert bt.blocks[5].e_block.attn.num_heads == 3 and bt.blocks[5].attn.num_heads == 12
    assert bt.config.num_selected == 1 + 49
    assert st.embed_dim == 384 and st.blocks[1].attn.num_heads == 6 and st.config.num_selected == 1 + 98
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model(BT, pretrained=True)
    with pytest.raises(ValueError, match="valid keys"):
        timm.create_model(BT, keep_ratoi=0.5)
    with pytest.raises(ValueError, match="needs a predictor"):
        make_config("b+t", predictor_layers=(4, 7))
    with pytest.raises(ValueError, match="keep_ratio"):
        model.keep_ratio = 0.0


def test_checkpoint_path_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model(BT, **TINY_BT).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gamma" in name:
                p.fill_(0.3)  # trained-looking: every path contributes
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    plain = save(model.state_dict(), tmp_path / "plain.pth")
    ours = tmp_path / "blvit.pth"
    save_blvit_checkpoint(model, ours, extra={"epoch": 3})
    for path in (plain, ours):
        loaded = timm.create_model(BT, checkpoint_path=str(path), **TINY_BT).eval()
        with torch.no_grad():
            assert torch.allclose(loaded(x), expected, rtol=1e-5, atol=1e-6), path
    assert load_blvit_checkpoint(loaded, ours)["epoch"] == 3
    other = timm.create_model(BT, **dict(TINY_BT, e_embed_dim=16))
    with pytest.raises(CheckpointError, match="e_embed_dim"):
        load_blvit_checkpoint(other, ours)
    # a dense DeiT file given as a bLViT checkpoint gets pointed at dense_checkpoint=
    deit = save(tiny_timm_vit().state_dict(), tmp_path / "deit.pth")
    with pytest.raises(CheckpointError, match="dense_checkpoint"):
        timm.create_model(BT, checkpoint_path=str(deit), **TINY_BT)


def test_bad_dense_checkpoints_name_the_file(tmp_path, tiny_sam_checkpoint):
    resnet = save(timm.create_model("resnet10t", pretrained=False).state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(CheckpointError, match="not a ViT / DeiT checkpoint") as err:
        timm.create_model(BT, dense_checkpoint=resnet, **TINY_BT)
    assert str(resnet) in str(err.value) and "conv1" in str(err.value)
    sam_path, _ = tiny_sam_checkpoint
    with pytest.raises(CheckpointError, match="SAM checkpoint") as err:
        timm.create_model(BT, dense_checkpoint=sam_path, **TINY_BT)
    assert str(sam_path) in str(err.value)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pth"):
        timm.create_model(BT, dense_checkpoint=garbage, **TINY_BT)
    # DeiT-S for the B model: every width-dependent tensor is listed with both shapes
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in timm.create_model("deit_small_patch16_224").state_dict().items()}
    deit_s = save({"model": {k: torch.zeros(s) for k, s in shapes.items()}}, tmp_path / "deit_small.pth")
    with pytest.raises(CheckpointError) as err:
        timm.create_model(BT, dense_checkpoint=deit_s)
    message = str(err.value)
    assert str(deit_s) in message and "deit_base_patch16_224" in message
    assert "cls_token: checkpoint (1, 1, 384) vs model (1, 1, 768)" in message
    assert "embed_dim 384" in message


def test_other_head_size_and_grid_resampled(tiny_deit):
    """A 10-class checkpoint initialises a 7-class model (head left random) and a 48 x 48 one
    (pos_embed resampled from 4 x 4 to 6 x 6)."""
    ref, paths = tiny_deit
    model = timm.create_model(BT, dense_checkpoint=paths["timm"], **dict(TINY_BT, num_classes=7, img_size=48))
    assert model.pos_embed.shape == (1, 1 + 36, 64)
    torch.testing.assert_close(model.cls_token, ref.cls_token)
    torch.testing.assert_close(model.blocks[2].mlp.lin1.weight, ref.blocks[2].mlp.fc1.weight)
    assert model(torch.randn(1, 3, 48, 48)).shape == (1, 7)


def test_e_blocks_from_deit_tiny_file(tmp_path):
    t = tiny_timm_vit(seed=3, embed_dim=32, num_heads=2)
    path = save(t.state_dict(), tmp_path / "deit_tiny.pth")
    model = timm.create_model(BT, e_checkpoint=path, **TINY_BT)
    for i in (1, 2, 3):
        torch.testing.assert_close(model.blocks[i].e_block.mlp.lin1.weight, t.blocks[i].mlp.fc1.weight)
        torch.testing.assert_close(model.blocks[i].e_block.mlp.lin2.bias, t.blocks[i].mlp.fc2.bias)
    wide = save(tiny_timm_vit().state_dict(), tmp_path / "wide.pth")
    with pytest.raises(CheckpointError, match="E-blocks are 32 wide"):
        timm.create_model(BT, e_checkpoint=wide, **TINY_BT)


# ------------------------------------------------------------------------------------------
# Selection and training signal at keep ratio 0.25
# ------------------------------------------------------------------------------------------


def test_quarter_keep_class_token_selected_and_gradients_reach_all_parts():
    torch.manual_seed(0)
    model = timm.create_model(BT, **TINY_BT)
    model.train()
    model.record_selections = True
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):  # gammas start at 0: after one step every path carries gradient
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert sorted(model.last_selections) == [1, 3]
    for sel in model.last_selections.values():
        assert sel.flat_index.shape == (4, 1 + round(0.25 * 16))
        assert bool((sel.flat_index == 0).any(-1).all())  # the class token, every image
        assert all(row.unique().numel() == row.numel() for row in sel.flat_index)
    named = dict(model.named_parameters())
    for name in ["predictors.1.score.weight", "predictors.3.score.weight", "blocks.1.gamma_router",
                 "blocks.2.gamma_e_attn", "blocks.3.gamma_e_mlp", "blocks.2.attn.qkv.weight",
                 "blocks.3.mlp.lin1.weight", "blocks.2.e_block.attn.qkv.weight", "blocks.1.e_block.mlp.down.weight",
                 "blocks.3.e_block.mlp.up.weight", "blocks.0.attn.qkv.weight", "head.weight", "pos_embed"]:
        grad = named[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


@pytest.mark.parametrize("name, kwargs", [(BT, TINY_BT), ("evit_base_patch16_224", TINY_EVIT)])
def test_stochastic_depth_dropout_and_grad_checkpointing(name, kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, drop_path_rate=0.5, drop_rate=0.1, **kwargs)
    plain = timm.create_model(name, **kwargs)
    plain.load_state_dict(model.state_dict())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))  # training mode: layers / branches dropped
        model.eval(), plain.eval()
        torch.testing.assert_close(model(x), plain(x))  # eval: the identity
    model.train()
    model.set_grad_checkpointing()
    model(x).sum().backward()
    assert model.blocks[1].attn.qkv.weight.grad is not None


# ------------------------------------------------------------------------------------------
# EViT
# ------------------------------------------------------------------------------------------


def test_evit_keep_1_equals_deit_and_token_counts(tiny_deit):
    ref, paths = tiny_deit
    model = timm.create_model("evit_base_patch16_224", keep_rate=1.0, dense_checkpoint=paths["deit"], **TINY_EVIT)
    model.eval()
    assert isinstance(model, EViT)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = ref(x)
        assert rel_err(model(x), expected) < 1e-4
        # timm's checkpoint_path= takes a DeiT file as it is: EViT has exactly DeiT's parameters
        same = timm.create_model("evit_base_patch16_224", keep_rate=1.0, checkpoint_path=str(paths["timm"]),
                                 **TINY_EVIT).eval()
        assert rel_err(same(x), expected) < 1e-4
        model.keep_rate = 0.7
        counts = []
        hooks = [b.register_forward_hook(lambda m, i, o: counts.append(o.shape[1])) for b in model.blocks]
        logits = model(x)
        feats = model.forward_features(x)
        for h in hooks:
            h.remove()
    # 16 patches -> 12 kept + 1 fused; 13 -> 10 kept + 1 fused
    assert counts[:4] == model.token_counts() == [17, 14, 14, 12]
    assert logits.shape == (2, 10) and feats.shape == (2, 12, 64)
    assert rel_err(logits, expected) > 1e-3
    # the paper's layout: DeiT-B at 224, reorganised at layers 3, 6, 9
    with torch.device("meta"):
        base = timm.create_model("evit_base_patch16_224")
    assert base.keep_rate == 0.7 and base.reorganize_layers == (3, 6, 9)
    assert base.token_counts() == [197] * 3 + [140] * 3 + [100] * 3 + [72] * 3
    assert base.token_counts(0.6)[-1] == 46  # 196 -> 118 + 1 -> 72 + 1 -> 44 + 1, plus the class token


def test_evit_reorganisation_keeps_attentive_tokens_and_fuses_the_rest():
    x = torch.randn(2, 1 + 5, 3)
    cls_attn = torch.tensor([[0.1, 0.4, 0.05, 0.3, 0.15], [0.3, 0.1, 0.2, 0.25, 0.15]])
    out = reorganize_tokens(x, cls_attn, keep_rate=0.4)  # ceil(0.4 * 5) = 2 kept
    assert out.shape == (2, 1 + 2 + 1, 3)
    torch.testing.assert_close(out[:, 0], x[:, 0])
    torch.testing.assert_close(out[0, 1:3], x[0, [2, 4]])  # image tokens 1 and 3, by attention
    torch.testing.assert_close(out[1, 1:3], x[1, [1, 4]])
    fused0 = 0.1 * x[0, 1] + 0.05 * x[0, 3] + 0.15 * x[0, 5]
    torch.testing.assert_close(out[0, 3], fused0)
    assert reorganize_tokens(x, cls_attn, keep_rate=0.4, fuse=False).shape == (2, 3, 3)
    assert reorganize_tokens(x, cls_attn, keep_rate=1.0) is x


def test_evit_class_attention_matches_explicit_attention():
    """The class-token row computed next to SDPA equals the full softmax map's row."""
    torch.manual_seed(0)
    model = EViT(**TINY_EVIT).eval()
    block = model.blocks[1]
    xn = torch.randn(2, 17, 64)
    out, cls_attn = block.attention_with_cls_attn(xn)
    q, k, v = block.attn.qkv(xn).view(2, 17, 3, 4, 16).permute(2, 0, 3, 1, 4)
    attn = ((q @ k.transpose(-2, -1)) * 16**-0.5).softmax(-1)
    torch.testing.assert_close(cls_attn, attn[:, :, 0, 1:].mean(1))
    torch.testing.assert_close(out, block.attn(xn), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------
# FLOPs
# ------------------------------------------------------------------------------------------


def test_flops_bt_at_most_0_6_of_deit_b():
    deit_b = classifier_macs("deit_base_patch16_224")
    bt = classifier_macs(BT, keep_ratio=0.25)
    evit = classifier_macs("evit_base_patch16_224", keep_rate=0.7)
    assert 17.4e9 < deit_b < 17.7e9  # DeiT-B: 17.6 GMACs
    assert bt / deit_b <= 0.6, (bt, deit_b)
    assert 9e9 < bt < 10.5e9  # the paper: about 9-10 G
    assert 11.4e9 < evit < 11.8e9  # EViT-DeiT-B 0.7: 11.6 G in its paper
    assert classifier_macs("evit_base_patch16_224", keep_rate=1.0) == deit_b
    assert bt == analytic_classifier_macs(make_config("b+t", keep_ratio=0.25))["total"]
    # a built module is counted the same way, without touching its weights
    model = timm.create_model(BT, **TINY_BT)
    before = model.blocks[1].attn.qkv.weight.clone()
    assert classifier_macs(model) == analytic_classifier_macs(make_config("b+t", **TINY_BT))["total"]
    assert torch.equal(model.blocks[1].attn.qkv.weight, before) and model.training


# ------------------------------------------------------------------------------------------
# DynamicViT
# ------------------------------------------------------------------------------------------
TINY_DYN = dict(TINY_VIT, prune_layers=(1, 3))


def test_dynamicvit_keep_1_equals_deit_token_counts_and_flops(tiny_deit):
    from blvit.models import DynamicViT

    ref, paths = tiny_deit
    model = timm.create_model("dynamicvit_base_patch16_224", keep_ratio=1.0, dense_checkpoint=paths["deit"],
                              **TINY_DYN).eval()
    assert isinstance(model, DynamicViT)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = ref(x)
        assert rel_err(model(x), expected) < 1e-4
        model.keep_ratio = 0.5
        counts = []
        hooks = [b.register_forward_hook(lambda m, i, o: counts.append(o.shape[1])) for b in model.blocks]
        logits = model(x)
        for h in hooks:
            h.remove()
    assert counts == model.token_counts() == [17, 9, 9, 5]  # 16 -> int(16 * 0.5) = 8 -> int(16 * 0.25) = 4
    assert rel_err(logits, expected) > 1e-3
    with torch.device("meta"):
        base = timm.create_model("dynamicvit_base_patch16_224")
    assert base.token_counts() == [197] * 3 + [138] * 3 + [97] * 3 + [68] * 3  # 196 -> 137 -> 96 -> 67
    deit_b = classifier_macs("deit_base_patch16_224")
    dyn = classifier_macs("dynamicvit_base_patch16_224")
    assert 11.0e9 < dyn < 11.6e9, dyn  # DynamicViT-B/0.7: 11.2 G in its paper; 11.5 here, predictors included
    assert classifier_macs("dynamicvit_base_patch16_224", keep_ratio=1.0) == deit_b  # nothing pruned, no predictor runs


def test_dynamicvit_masked_training_path_equals_the_pruned_path():
    """With the same kept set, the training path (all tokens, pruned ones masked out of
    attention) gives the kept tokens exactly the values the inference path (gather) gives."""
    from blvit.models.dynamicvit import attention_with_policy

    torch.manual_seed(0)
    model = perturb_(timm.create_model("dynamicvit_base_patch16_224", **TINY_DYN)).eval()
    block = model.blocks[2]
    x = torch.randn(2, 17, 64)
    keep = torch.zeros(2, 17)
    keep[:, 0] = 1
    keep[0, [1, 4, 5, 9, 16]] = 1
    keep[1, [2, 3, 7, 8, 11]] = 1
    with torch.no_grad():
        masked = x + attention_with_policy(block, block.norm1(x), keep)
        masked = masked + block.mlp(block.norm2(masked))
        for i in range(2):
            index = keep[i].nonzero()[:, 0]
            torch.testing.assert_close(masked[i, index], block(x[i : i + 1, index])[0], rtol=1e-5, atol=1e-5)


def test_dynamicvit_training_step_sends_gradients_to_the_predictors_and_the_ratio_loss_counts():
    torch.manual_seed(0)
    model = timm.create_model("dynamicvit_base_patch16_224", keep_ratio=0.5, **TINY_DYN).train()
    x = torch.randn(4, 3, 32, 32)
    features = model.forward_features(x)
    assert features.shape == (4, 17, 64)  # training keeps every token in the tensor
    ratio = model.pruning_loss()
    assert ratio.item() >= 0 and len(model._keep_fractions) == 2
    (model.forward_head(features).logsumexp(-1).mean() + 2.0 * ratio).backward()
    for name in ("predictors.1.out_conv.4.weight", "predictors.3.in_conv.1.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    model.eval()
    with torch.no_grad():
        model(x)
    assert model.pruning_loss().item() == 0.0
    with pytest.raises(ValueError, match=r"keep_ratio 1.5 must be in \(0, 1\]"):
        timm.create_model("dynamicvit_base_patch16_224", keep_ratio=1.5, **TINY_DYN)


def test_dynamicvit_ratio_loss_is_per_image_as_released_and_drop_path_rate_is_accepted():
    """raoyongming/DynamicViT losses.py (dynamic=False, main.py's default): each image's kept
    fraction is pulled to rho**s, ((score.mean(1) - ratio)**2).mean(); two images 25 points
    either side of the target are not "on target" because their mean is."""
    model = timm.create_model("dynamicvit_small_patch16_224", keep_ratio=0.7, **TINY_DYN)
    fractions = [torch.tensor([0.7**s + 0.25, 0.7**s - 0.25]) for s in (1, 2)]
    model._keep_fractions = fractions
    assert model.pruning_loss().item() == pytest.approx(0.25**2)
    released = torch.stack([((f - 0.7 ** (s + 1)) ** 2).mean() for s, f in enumerate(fractions)]).mean()
    assert model.pruning_loss().item() == pytest.approx(released.item())
    dynamic = timm.create_model("dynamicvit_small_patch16_224", keep_ratio=0.7, dynamic_ratio=True, **TINY_DYN)
    dynamic._keep_fractions = fractions
    assert dynamic.pruning_loss().item() == pytest.approx(0.0, abs=1e-12)  # the released dynamic=True
    # stochastic depth as timm's VisionTransformer: linear from 0 to the rate at the last layer
    torch.manual_seed(0)
    model = timm.create_model("dynamicvit_small_patch16_224", drop_path_rate=0.5, **TINY_DYN)
    assert [b.drop_path for b in model.blocks] == pytest.approx([0.0, 0.5 / 3, 1.0 / 3, 0.5])
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        plain = timm.create_model("dynamicvit_small_patch16_224", **TINY_DYN).eval()
        plain.load_state_dict(model.state_dict())
        torch.testing.assert_close(model(x), plain(x))  # no drop at eval
        model.train()
        torch.manual_seed(1)
        a = model.forward_features(x)
        torch.manual_seed(2)
        assert not torch.allclose(a, model.forward_features(x))  # layers dropped per sample in training


def test_evit_keep_rate_warms_up_as_released_and_eval_uses_the_base_rate():
    """youweiliang/evit helpers.py adjust_keep_rate with run_code.sh's --shrink_start_epoch 10
    --shrink_epochs 100 of 300: 1 before epoch 10, a half cosine to the base rate by epoch 110,
    the base rate after; set per epoch to the mean of the released per-iteration rates."""
    import math

    from blvit.models.evit import evit_keep_rate_schedule

    def released(it, epoch, warmup_epochs, total_epochs, iters_per_epoch, base_keep_rate):
        if epoch < warmup_epochs:
            return 1
        if epoch >= total_epochs:
            return base_keep_rate
        total_iters = iters_per_epoch * (total_epochs - warmup_epochs)
        it = it - iters_per_epoch * warmup_epochs
        return base_keep_rate + (1 - base_keep_rate) * (math.cos(it / total_iters * math.pi) + 1) * 0.5

    model = timm.create_model("evit_base_patch16_224", keep_rate=0.5, **TINY_EVIT)
    for epoch in (0, 9, 10, 11, 35, 60, 109, 110, 299):
        model.set_epoch(epoch, 300, steps_per_epoch=7)
        mean = sum(released(epoch * 7 + i, epoch, 10, 110, 7, 0.5) for i in range(7)) / 7
        assert model.train_keep_rate == pytest.approx(mean), epoch
    # a one-epoch run warms up inside its epoch (released: from 1 to 0.5 over its first third)
    model.set_epoch(0, 1)
    assert 0.5 < model.train_keep_rate < 0.7
    assert evit_keep_rate_schedule(60, 10, 100, 0.5) == pytest.approx(0.75)
    # a shorter run: the released 10 / 100 of 300 epochs scaled to 1 / 10 of 30
    assert model.shrink_schedule(30) == (1.0, 10.0)
    own = timm.create_model("evit_base_patch16_224", keep_rate=0.5, shrink_start_epoch=0, shrink_epochs=4, **TINY_EVIT)
    assert own.shrink_schedule(30) == (0.0, 4.0)
    own.set_epoch(4, 30)
    assert own.train_keep_rate == 0.5
    # training forwards use the warm-up's rate, eval the base rate; nothing new in the state dict
    x = torch.randn(2, 3, 32, 32)
    model.set_epoch(0, 300)
    with torch.no_grad():
        assert model.train().forward_features(x).shape[1] == 17  # keep rate 1: every token
        assert model.eval().forward_features(x).shape[1] == model.token_counts()[-1] < 17
    assert set(model.state_dict()) == set(timm.create_model("evit_base_patch16_224", **TINY_EVIT).state_dict())


def test_deit_based_baselines_declare_deits_eval_crop():
    """DeiT's released eval (resize 256, centre crop 224: crop_pct 0.875), which EViT's and
    DynamicViT's DeiT comparisons use; timm's DeiT cfg says 0.9."""
    for name in ("evit_base_patch16_224", "evit_small_patch16_224", "dynamicvit_base_patch16_224",
                 "dynamicvit_small_patch16_224", "blvit_base_tiny_patch16_224", "blvit_small_tiny_patch16_224",
                 "evovit_base_patch16_224", "evovit_small_patch16_224"):
        assert timm.models.get_pretrained_cfg(name).crop_pct == 0.875, name


def test_own_checkpoint_at_another_img_size_resamples_pos_embed_and_names_the_file(tmp_path):
    """A trainer checkpoint (NAME@img_size=64:best.pth) goes through the model module's
    checkpoint filter as any other file: pos_embed resampled to the new grid; a checkpoint
    that does not fit raises CheckpointError naming it."""
    from blvit.models.blvit_vit import resample_abs_pos_embed
    from blvit.train.classification import FORMAT, create_classifier, load_classifier

    torch.manual_seed(0)
    model = perturb_(timm.create_model(BT, **TINY_BT))
    payload = {"format": FORMAT, "arch": BT, "kwargs": dict(TINY_BT), "merge": {"method": "none"},
               "classes": [f"n{i:08d}" for i in range(10)], "model": model.state_dict()}
    path = save(payload, tmp_path / "best.pth")
    bigger, classes = load_classifier(BT, {"img_size": 64}, None, str(path))
    assert bigger.pos_embed.shape[1] == 1 + 64 and classes == payload["classes"]
    expected = resample_abs_pos_embed(model.pos_embed.detach(), [8, 8], num_prefix_tokens=1)
    torch.testing.assert_close(bigger.pos_embed.detach(), expected)
    torch.testing.assert_close(bigger.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)
    with pytest.raises(CheckpointError, match="best.pth"):
        create_classifier(BT, {"embed_dim": 48}, None, str(path))
