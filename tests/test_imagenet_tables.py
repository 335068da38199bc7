"""The bLViT paper's ImageNet tables: Evo-ViT (Table 1's token-reduction row), the ablation ladder's
switches (Table 3) and their configs, the sweeps of Tables 4 and 5."""
import copy
import json
from pathlib import Path

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

import blvit  # noqa: F401  (registers the timm names)
import blvit.models.evovit
from blvit.data.imagenet import write_imagefolder
from blvit.models import EvoViT, analytic_classifier_macs, classifier_macs
from blvit.models.evovit import checkpoint_filter_fn as evovit_filter
from blvit.train.classification import ClassifierTrainingModule, train
from blvit.train.config import load_config
from blvit.utils.io import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
BT = "blvit_base_tiny_patch16_224"
TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4, num_classes=10)
TINY_EVO = dict(TINY_VIT, prune_start=1, stage_starts=(1, 3))
TINY_BT = dict(TINY_VIT, e_embed_dim=32, e_num_heads=2, blvit_layers=(1, 2, 3), predictor_layers=(1, 3))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def perturbed(model: torch.nn.Module, std: float = 0.02) -> torch.nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)
    return model.eval()


@pytest.fixture(scope="module")
def tiny_deit_file(tmp_path_factory):
    torch.manual_seed(0)
    ref = perturbed(VisionTransformer(**TINY_VIT))
    path = tmp_path_factory.mktemp("deit") / "deit_tiny_layout.pth"
    torch.save({"model": ref.state_dict()}, path)
    return ref, path


# ------------------------------------------------------------------------------------------
# Evo-ViT
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", ["small", "base"])
def test_evovit_keep_1_equals_deit_logits(size, tmp_path):
    """DeiT-S / DeiT-B at 224 (random weights, official timm layout, saved as DeiT's .pth): Evo-ViT
    built from that file at keep rate 1.0 gives DeiT's logits."""
    torch.manual_seed(0)
    deit = perturbed(timm.create_model(f"deit_{size}_patch16_224"), 0.01)
    torch.save({"model": deit.state_dict()}, tmp_path / "deit.pth")
    evo = timm.create_model(f"evovit_{size}_patch16_224", keep_rate=1.0, dense_checkpoint=str(tmp_path / "deit.pth")).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = deit(x)
        assert rel_err(evo(x), expected) < 1e-4
        evo.keep_rate = 0.5
        assert rel_err(evo(x), expected) > 1e-3  # the reduction is really in the path


def test_evovit_gmacs_at_its_default_keep_rate():
    """Measured (FlopCounterMode) at keep 0.5, 224: 11.66 G (DeiT-B) and 3.03 G (DeiT-S); Evo-ViT's
    paper reports 11.6 and 3.0 GFLOPs (multiply-accumulates)."""
    base = classifier_macs("evovit_base_patch16_224") / 1e9
    small = classifier_macs("evovit_small_patch16_224") / 1e9
    print(f"Evo-ViT GMACs at keep 0.5: DeiT-B {base:.2f}, DeiT-S {small:.2f}")
    assert 11.5 < base < 11.8 and 2.95 < small < 3.1
    # keep 1.0 costs DeiT-B plus the class-attention rows (one query per head and layer: +0.01 %)
    dense, deit = classifier_macs("evovit_base_patch16_224", keep_rate=1.0), classifier_macs("deit_base_patch16_224")
    assert deit < dense < 1.001 * deit
    with torch.device("meta"):
        model = timm.create_model("evovit_base_patch16_224")
    assert model.slow_token_counts() == [197] * 4 + [99] * 8  # 196 -> 98 slow image tokens from layer 4


def test_evovit_slow_tokens_are_the_attentive_ones_and_fast_tokens_wait(tiny_deit_file, monkeypatch):
    """At a stage start the image tokens are sorted by the running class attention; only the first
    int(keep N) (+ class token) go through the layer; fast tokens keep their value (released code)
    or get the representative's update (the paper); every setting changes the function."""
    _, path = tiny_deit_file
    model = timm.create_model("evovit_base_patch16_224", keep_rate=0.5, dense_checkpoint=str(path), **TINY_EVO).eval()
    x = torch.randn(2, 3, 32, 32)
    lengths = []  # the tokens each layer runs on (the layers are called through _layer)
    original = model._layer
    model._layer = lambda block, t: (lengths.append(t.shape[1]), original(block, t))[1]
    sorts = []
    rank = blvit.models.evovit.rank_tokens
    monkeypatch.setattr(blvit.models.evovit, "rank_tokens", lambda score: (sorts.append(1), rank(score))[1])
    with torch.no_grad():
        stage = model(x)
        stage_sorts = len(sorts)
        model.schedule = "layer"
        model(x)
        layer_sorts = len(sorts) - stage_sorts
        model.schedule, model.fast_update = "stage", "representative"
        rep = model(x)
    assert lengths[:4] == [17, 9, 9, 9] and lengths[8:] == [17, 10, 10, 10]  # 16 patches -> 8 slow (+1 representative)
    assert (stage_sorts, layer_sorts) == (2, 3)  # at the stage starts 1 and 3, or before each of layers 1-3
    assert rel_err(rep, stage) > 1e-4
    # fast tokens wait: layer 1's input tokens beyond the slow ones come out unchanged
    model.fast_update = "none"
    embedded = model._embed(x)
    with torch.no_grad():
        after0, _ = model._layer(model.blocks[0], embedded)
        _, attn0 = model._layer(model.blocks[0], embedded)
        order = attn0.argsort(1, descending=True)
        out, _ = model._blocks_taking(embedded, (), 1)
    fast = after0[:, 1:].gather(1, order[:, 8:, None].expand(-1, -1, 64))
    torch.testing.assert_close(out[:, 9:], fast)
    # the schedule the released training uses: layer-wise for two thirds of the epochs
    model.set_epoch(199, 300)
    assert model.schedule == "layer"
    model.set_epoch(200, 300)
    assert model.schedule == "stage"


def _released_layout(state):
    """This toolkit's Evo-ViT state dict -> the released repository's key names (qks, vs, norms, projs)."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "blocks" and parts[2:4] == ["attn", "qkv"]:
            c = value.shape[0] // 3
            out[f"qks.{parts[1]}.qk.{parts[4]}"] = value[: 2 * c]
            out[f"vs.{parts[1]}.v.{parts[4]}"] = value[2 * c:]
        elif parts[0] == "blocks" and parts[2:4] == ["attn", "proj"]:
            out[f"projs.{parts[1]}.{parts[4]}"] = value
        elif parts[0] == "blocks" and parts[2] == "norm1":
            out[f"norms.{parts[1]}.{parts[3]}"] = value
        elif parts[0] == "blocks" and parts[2] == "mlp":
            out[key.replace("lin1", "fc1").replace("lin2", "fc2")] = value
        else:
            out[key] = value
    return out


def test_released_evovit_checkpoint_loads_and_a_class_token_model_refuses_it(tmp_path):
    torch.manual_seed(0)
    source = perturbed(timm.create_model("evovit_base_patch16_224", global_pool="avg", **TINY_EVO))
    released = _released_layout(source.state_dict())
    assert "qks.0.qk.weight" in released and "head_cls.weight" in released and "norm_cls.bias" in released
    torch.save({"model": released}, tmp_path / "evo_deit.pth")
    x = torch.randn(2, 3, 32, 32)
    loaded = timm.create_model("evovit_base_patch16_224", global_pool="avg", checkpoint_path=str(tmp_path / "evo_deit.pth"),
                               **TINY_EVO).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source(x))
        assert loaded.auxiliary_logits(loaded.forward_features(x)).shape == (2, 10)
    token_model = timm.create_model("evovit_base_patch16_224", **TINY_EVO)
    with pytest.raises(CheckpointError, match="global_pool='avg'"):
        evovit_filter(released, token_model)
    assert token_model.auxiliary_logits(torch.zeros(1, 17, 64)) is None


def test_auxiliary_head_enters_the_supervised_loss():
    """global_pool='avg' trains as released: 0.5 CE(mean-pooled head) + 0.5 CE(class-token head)."""
    torch.manual_seed(0)
    model = timm.create_model("evovit_base_patch16_224", global_pool="avg", **TINY_EVO).train()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    cfg = {"smoothing": 0.0, "distill": "none", "distill_weight": 0.0, "ratio_weight": 0.0}
    loss = ClassifierTrainingModule(model, None, cfg, None)(x, y)["supervised"]
    torch.manual_seed(1)
    features = model.forward_features(x)  # drop_path is 0: the same features
    ce = torch.nn.functional.cross_entropy
    expected = 0.5 * ce(model.forward_head(features), y) + 0.5 * ce(model.auxiliary_logits(features), y)
    torch.testing.assert_close(loss, expected)


@pytest.mark.heavy
def test_evovit_learns_on_the_generated_imagefolder(tmp_path):
    """Evo-ViT (released head: mean-pooled + class-token head, stage-wise after the layer-wise
    epochs) through tools/train.py on the generated ImageFolder: top-1 well above chance."""
    root = tmp_path / "folder"
    write_imagefolder(root, num_classes=4, train_per_class=48, val_per_class=12, seed=0)
    kwargs = ("{img_size: 64, patch_size: 8, num_classes: 4, embed_dim: 64, depth: 4, num_heads: 4, "
              "prune_start: 1, stage_starts: [1, 3], keep_rate: 0.5, global_pool: avg}")
    train(load_config(ROOT / "configs/imagenet/quickstart.yaml",
                      [f"data.root={root}", f"output_dir={tmp_path / 'run'}", "train.epochs=12",
                       "model.name=evovit_base_patch16_224", f"model.kwargs={kwargs}"]))
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    val = [r["val_top1"] for r in rows if "val_top1" in r]
    print(f"Evo-ViT top-1: untrained {val[0]:.1f} %, trained {max(val):.1f} % (chance 25 %)")
    assert max(val) >= 60.0 and val[0] < 50.0


# ------------------------------------------------------------------------------------------
# The ablation ladder (Table 3): every switch changes the model
# ------------------------------------------------------------------------------------------


def _bt(**extra):
    torch.manual_seed(0)
    return timm.create_model(BT, **dict(TINY_BT, keep_ratio=0.25, **extra)).eval()


@pytest.mark.parametrize("switch", [{"selector": "cls_attn"}, {"selector": "uniform"}, {"selector": "random"},
                                    {"semi_cross": False}, {"e_embed_dim": 0}])
def test_every_ladder_switch_changes_the_model(switch):
    final = _bt()
    ablated = _bt(**switch)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        differs = rel_err(ablated(x), final(x)) > 1e-4
    macs_final, macs_ablated = classifier_macs(final), classifier_macs(ablated)
    assert differs or macs_ablated != macs_final
    assert macs_ablated == analytic_classifier_macs(ablated.config)["total"]  # the analytic count follows the switch
    if switch.get("selector", "predictor") != "predictor":
        assert len(ablated.predictors) == 0 and macs_ablated != macs_final
        selection = ablated.forward_features_with_selections(x)[1][1]
        assert (selection.flat_index == 0).any(-1).all()  # the class token is always in
        assert selection.num_selected == final.config.num_selected
    if "semi_cross" in switch or "e_embed_dim" in switch:
        assert macs_ablated < macs_final


def test_class_attention_selection_picks_the_attended_tokens():
    model = _bt(selector="cls_attn")
    x = torch.randn(1, 3, 32, 32)
    tokens = model._embed(x)
    block = model.blocks[1]
    with torch.no_grad():
        sel = model._select(1, block, tokens)
        xn = block.norm1(tokens)
        qkv = block.attn.qkv(xn).view(1, 17, 3, 4, 16).permute(2, 0, 3, 1, 4)
        attn = ((qkv[0] @ qkv[1].transpose(-2, -1)) / 4.0).softmax(-1).mean(1)[0, 0]  # (17,)
    expected = set(attn[1:].topk(sel.num_selected - 1).indices.add(1).tolist()) | {0}
    assert set(sel.flat_index[0].tolist()) == expected
    assert (sel.scores == 0).all()  # no router: the P-block output is not scaled


def test_p_blocks_from_scratch_keeps_their_initialisation(tiny_deit_file):
    ref, path = tiny_deit_file
    loaded = timm.create_model(BT, dense_checkpoint=str(path), **TINY_BT)
    torch.manual_seed(0)
    scratch = timm.create_model(BT, dense_checkpoint=str(path), p_blocks_from_dense=False, **TINY_BT)
    deit = ref.state_dict()
    torch.testing.assert_close(loaded.blocks[2].attn.qkv.weight, deit["blocks.2.attn.qkv.weight"])
    assert not torch.allclose(scratch.blocks[2].attn.qkv.weight, deit["blocks.2.attn.qkv.weight"])
    # everything outside the P-blocks still comes from the dense file
    torch.testing.assert_close(scratch.blocks[0].attn.qkv.weight, deit["blocks.0.attn.qkv.weight"])
    torch.testing.assert_close(scratch.pos_embed, deit["pos_embed"])
    torch.testing.assert_close(scratch.head.weight, deit["head.weight"])


def test_distillation_weight_changes_the_loss(tiny_deit_file):
    ref, _ = tiny_deit_file
    student = _bt().train()
    teacher = timm.create_model("deit_tiny_patch16_224", **TINY_VIT).eval()
    teacher.load_state_dict(ref.state_dict())
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    totals = {}
    for weight in (0.0, 2.5):
        cfg = {"smoothing": 0.1, "distill": "cosine", "distill_weight": weight, "ratio_weight": 0.0}
        out = ClassifierTrainingModule(student, teacher, cfg, None)(x, y)
        totals[weight] = out["loss"].item()
        assert out["distill"].item() > 0
    assert totals[2.5] > totals[0.0]


LADDER = sorted((ROOT / "configs/imagenet/ablation").glob("*.yaml"))


def test_the_ladder_has_its_rows_in_order():
    names = [p.stem for p in LADDER]
    assert names == ["0_evovit_b50", "1_early_prune", "2_e_block", "3_predictor", "4_semi_cross", "5_dense_init",
                     "6_distill"]
    kwargs = [load_config(p, [])["model"]["kwargs"] for p in LADDER[1:]]
    # each row adds exactly one thing to the row before it (the defaults are the final model)
    steps = [{k: v for k, v in a.items() if b.get(k) != v} for a, b in zip(kwargs, kwargs[1:])]
    assert steps[:4] == [{"e_embed_dim": 0}, {"selector": "cls_attn"}, {"semi_cross": False}, {"p_blocks_from_dense": False}]
    final = load_config(LADDER[-1], [])
    assert final["loss"]["distill"] == "cosine" and final["loss"]["distill_weight"] == 2.5
    assert load_config(LADDER[-2], [])["loss"]["distill"] == "none"


@pytest.mark.heavy(seconds=5)
@pytest.mark.parametrize("config", LADDER, ids=[p.stem for p in LADDER])
def test_every_ladder_config_trains_on_generated_data(config, tiny_deit_file, tmp_path_factory, tmp_path):
    """Each row's recipe (mixup, cutmix, RandAugment, repeated augmentation...) for 3 steps on the
    generated ImageFolder, its model shrunk to the tiny layout, its DeiT files replaced by a tiny one."""
    ref, path = tiny_deit_file
    root = tmp_path_factory.getbasetemp() / "ladder_folder"
    if not root.exists():
        write_imagefolder(root, num_classes=4, train_per_class=8, val_per_class=2, seed=0)
    cfg = load_config(config, [f"data.root={root}", f"output_dir={tmp_path}", "data.workers=0", "train.batch_size=4",
                               "train.global_batch=null", "train.max_steps=3", "train.warmup_steps=1", "train.amp=none"])
    tiny = dict(TINY_VIT, num_classes=4)
    if cfg["model"]["name"].startswith("evovit"):
        tiny.update(prune_start=1, stage_starts=[1, 3])
    else:
        tiny.update(e_embed_dim=32, e_num_heads=2, blvit_layers=[1, 2, 3], predictor_layers=[1, 3])
        if cfg["model"]["kwargs"].get("e_embed_dim") == 0:
            tiny["e_embed_dim"] = 0
    cfg["model"]["kwargs"] = dict(copy.deepcopy(cfg["model"]["kwargs"]), **tiny)
    cfg["model"]["dense_checkpoint"] = str(path)
    if cfg["teacher"]["name"]:
        torch.save(dict(ref.state_dict(), **{"head.weight": ref.head.weight[:4], "head.bias": ref.head.bias[:4]}),
                   tmp_path / "teacher.pth")
        cfg["teacher"].update(name="deit_tiny_patch16_224", checkpoint=str(tmp_path / "teacher.pth"),
                              kwargs=dict(TINY_VIT, num_classes=4))
    summary = train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert summary["steps"] == 3 and len(losses) >= 1 and all(torch.isfinite(torch.tensor(losses)))
    if cfg["teacher"]["name"]:
        assert any(r.get("distill", 0) > 0 for r in rows)
