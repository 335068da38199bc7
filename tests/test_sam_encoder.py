"""bLViT-SAM: equivalence with the stock encoder, selection, SAM APIs, FLOPs, bad input."""
import numpy as np
import pytest
import torch
from segment_anything import SamAutomaticMaskGenerator, SamPredictor, sam_model_registry as stock_registry

from blvit.flops import analytic_sam_encoder_macs, count_macs_on_meta
from blvit.utils.io import CheckpointError
from sam_adapter import BigLittleImageEncoder, build_sam_blvit, make_config, save_blvit_sam_checkpoint
from sam_adapter.checkpoint import load_e_blocks_from_sam
from sam_adapter.config import VARIANTS

from conftest import TINY, TINY_BT, stock_sam


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.heavy
def test_b_plus_t_from_official_vit_b_reproduces_stock_encoder(official_vit_b_1024):
    """The real ViT-B layout at 1024 x 1024, random weights, saved as an official .pth."""
    path, x, ref, stock = official_vit_b_1024
    with torch.no_grad():
        blvit = build_sam_blvit("b+t", sam_checkpoint=path, keep_ratio=1.0)
        err = rel_err(blvit.image_encoder(x), ref)
    assert ref.shape == (1, 256, 64, 64)
    assert err < 1e-4, err
    # the prompt encoder and mask decoder are the checkpoint's
    for name in ("prompt_encoder", "mask_decoder"):
        for (k, a), b in zip(getattr(blvit, name).state_dict().items(), getattr(stock, name).state_dict().values()):
            assert torch.equal(a, b), k


def test_h_plus_b_reduced_reproduces_stock_encoder(tmp_path):
    """h+b's layout (dense prefix, E-blocks every second layer) at reduced width and depth."""
    torch.manual_seed(1)
    depth, globals_ = 8, (3, 7)
    stock = stock_sam(64, depth, 4, globals_, img_size=256)
    path = tmp_path / "sam_h_small.pth"
    torch.save(stock.state_dict(), path)
    overrides = dict(img_size=256, embed_dim=64, depth=depth, num_heads=4, global_attn_indexes=globals_,
                     e_embed_dim=32, e_num_heads=2, blvit_layers=range(3, 8), e_block_layers=(3, 5, 7),
                     predictor_layers=(3, 5))
    x = torch.randn(2, 3, 256, 256)
    model = build_sam_blvit("h+b", sam_checkpoint=path, keep_ratio=1.0, **overrides)
    with torch.no_grad():
        assert rel_err(model.image_encoder(x), stock.image_encoder(x)) < 1e-4
        model.image_encoder.config.keep_ratio = 0.25  # the saving path computes something else
        assert rel_err(model.image_encoder(x), stock.image_encoder(x)) > 1e-3


def test_dense_variant_matches_stock(tiny_sam_checkpoint):
    path, stock = tiny_sam_checkpoint
    model = build_sam_blvit("vit_b", sam_checkpoint=path, keep_ratio=1.0, **TINY)
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        assert rel_err(model.image_encoder(x), stock.image_encoder(x)) < 1e-4


def test_quarter_keep_ratio_selects_49_per_window_at_1024():
    cfg = make_config("b+t", embed_dim=32, num_heads=2, depth=3, global_attn_indexes=(2,), e_embed_dim=16,
                      e_num_heads=1, blvit_layers=(1, 2), predictor_layers=(1,), keep_ratio=0.25)
    encoder = BigLittleImageEncoder(cfg).eval()
    with torch.no_grad():
        out, selections = encoder.forward_with_selections(torch.randn(2, 3, 1024, 1024))
    assert out.shape == (2, 256, 64, 64)
    (sel,) = selections.values()
    assert sel.local_index.shape == (2, 25, 49)
    assert bool(sel.valid.all())  # no padding token is ever selected
    assert all(sel.flat_index[b].unique().numel() == 25 * 49 for b in range(2))


def test_encoder_gradients_reach_all_parts():
    sam = build_sam_blvit("b+t", keep_ratio=0.25, **TINY_BT)
    enc = sam.image_encoder.train()
    opt = torch.optim.SGD(enc.parameters(), lr=0.01)
    x = torch.randn(1, 3, 256, 256)
    for _ in range(2):
        opt.zero_grad()
        enc(x).pow(2).mean().backward()
        opt.step()
    for name, p in enc.named_parameters():
        if name.startswith("predictors.") and name.endswith("score.bias"):
            continue  # a constant added to every logit of a window changes no softmax
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.fixture(scope="module")
def tiny_blvit_sam():
    torch.manual_seed(0)
    return build_sam_blvit("b+t", keep_ratio=0.25, **TINY_BT)


def test_sam_predictor_points_and_box(tiny_blvit_sam):
    image = (np.random.default_rng(0).random((180, 240, 3)) * 255).astype(np.uint8)
    predictor = SamPredictor(tiny_blvit_sam)
    predictor.set_image(image)
    masks, scores, _ = predictor.predict(point_coords=np.array([[100, 80]]), point_labels=np.array([1]))
    assert masks.shape == (3, 180, 240) and scores.shape == (3,)
    masks, _, _ = predictor.predict(box=np.array([20, 30, 200, 150]), multimask_output=False)
    assert masks.shape == (1, 180, 240)


def test_automatic_mask_generator_runs(tiny_blvit_sam):
    image = np.zeros((96, 128, 3), np.uint8)
    image[20:70, 30:90] = (200, 40, 40)
    generator = SamAutomaticMaskGenerator(tiny_blvit_sam, points_per_side=4, pred_iou_thresh=0.0,
                                          stability_score_thresh=0.0)
    records = generator.generate(image)
    assert isinstance(records, list)
    for r in records:
        assert r["segmentation"].shape == (96, 128)


def test_encoder_flops_at_1024():
    stock_b = count_macs_on_meta(lambda: stock_registry["vit_b"]().image_encoder, (1, 3, 1024, 1024))
    stock_h = count_macs_on_meta(lambda: stock_registry["vit_h"]().image_encoder, (1, 3, 1024, 1024))
    results = {}
    for variant in ("b+t", "h+b"):
        cfg = make_config(variant)
        results[variant] = count_macs_on_meta(lambda: BigLittleImageEncoder(cfg), (1, 3, 1024, 1024))
        assert results[variant] == pytest.approx(analytic_sam_encoder_macs(cfg)["total"], rel=1e-6)
    assert 480e9 < stock_b < 490e9 and 2960e9 < stock_h < 3000e9  # the note's 484 G / 2973 G
    assert results["b+t"] <= 0.6 * stock_b
    assert results["h+b"] < stock_h


def test_cpu_flop_count_includes_attention():
    from blvit.flops import count_flops

    enc = BigLittleImageEncoder(make_config("vit_b", **TINY)).eval()
    real = count_flops(enc, torch.randn(1, 3, 256, 256))
    assert real // 2 == count_macs_on_meta(lambda: BigLittleImageEncoder(make_config("vit_b", **TINY)), (1, 3, 256, 256))


def test_wrong_variant_checkpoint_names_file_and_shapes(tiny_sam_checkpoint):
    path, _ = tiny_sam_checkpoint
    with pytest.raises(CheckpointError) as err:
        build_sam_blvit("b+t", sam_checkpoint=path, **dict(TINY_BT, embed_dim=96, num_heads=4))
    msg = str(err.value)
    assert str(path) in msg and "pos_embed" in msg and "(1, 16, 16, 64)" in msg and "(1, 16, 16, 96)" in msg


def test_not_a_sam_checkpoint(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="notes.pth: not a readable PyTorch checkpoint"):
        build_sam_blvit("b+t", sam_checkpoint=text, **TINY_BT)
    other = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(3)}, other)
    with pytest.raises(CheckpointError, match="resnet.pth: not a SAM checkpoint.*conv1.weight"):
        build_sam_blvit("b+t", sam_checkpoint=other, **TINY_BT)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_sam_blvit("b+t", sam_checkpoint=tmp_path / "missing.pth", **TINY_BT)


def test_bad_images_give_clear_errors(tiny_blvit_sam):
    enc = tiny_blvit_sam.image_encoder
    with pytest.raises(ValueError, match=r"shape \(B, 3, 256, 256\), got \(1, 3, 200, 256\)"):
        enc(torch.zeros(1, 3, 200, 256))
    with pytest.raises(ValueError, match="got \\(3, 256, 256\\)"):
        enc(torch.zeros(3, 256, 256))
    with pytest.raises(TypeError, match="float tensor.*torch.uint8"):
        enc(torch.zeros(1, 3, 256, 256, dtype=torch.uint8))


def test_gpu_saved_checkpoint_loads_on_cpu(tmp_path, monkeypatch, tiny_sam_checkpoint):
    """Tag the storages as cuda:0, as a file saved on a GPU is; plain torch.load then fails here."""
    path, stock = tiny_sam_checkpoint
    gpu_path = tmp_path / "saved_on_gpu.pth"
    monkeypatch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
    torch.save(stock.state_dict(), gpu_path)
    monkeypatch.undo()
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(gpu_path, weights_only=True)
    model = build_sam_blvit("b+t", sam_checkpoint=gpu_path, keep_ratio=1.0, **TINY_BT)
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        assert rel_err(model.image_encoder(x), stock.image_encoder(x)) < 1e-4


def test_blvit_checkpoint_roundtrip_and_wrong_variant(tmp_path, tiny_blvit_sam):
    path = tmp_path / "blvit.pth"
    save_blvit_sam_checkpoint(tiny_blvit_sam, path)
    again = build_sam_blvit("b+t", checkpoint=path, **TINY_BT)
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        torch.testing.assert_close(again.image_encoder(x), tiny_blvit_sam.image_encoder(x))
    with pytest.raises(CheckpointError, match="blvit.pth: saved for bLViT-SAM 'b\\+t'.*e_embed_dim: checkpoint 32 vs requested 48"):
        build_sam_blvit("b+t", checkpoint=path, **dict(TINY_BT, e_embed_dim=48))
    with pytest.raises(CheckpointError, match="plain SAM state dict"):
        sam_file = tmp_path / "plain.pth"
        torch.save(tiny_blvit_sam.state_dict(), sam_file)
        build_sam_blvit("b+t", checkpoint=sam_file, **TINY_BT)


def test_checkpoint_brings_its_keep_ratio_and_a_foreign_config_names_the_file(tmp_path, tiny_blvit_sam):
    """build_sam_blvit(checkpoint=) runs at the keep ratio the checkpoint was saved with (not the
    variant's 0.25) unless the call gives one; a saved config this version cannot read is a
    CheckpointError naming the file."""
    from sam_adapter.build import build_sam_from_checkpoint

    tiny_blvit_sam.image_encoder.config.keep_ratio = 0.5
    path = tmp_path / "half.pth"
    save_blvit_sam_checkpoint(tiny_blvit_sam, path)
    assert build_sam_blvit("b+t", checkpoint=path, **TINY_BT).image_encoder.config.keep_ratio == 0.5
    assert build_sam_blvit("b+t", checkpoint=path, keep_ratio=0.25, **TINY_BT).image_encoder.config.keep_ratio == 0.25
    assert build_sam_from_checkpoint(path).image_encoder.config.keep_ratio == 0.5
    obj = torch.load(path, weights_only=False)
    obj["config"]["semi_cross"] = True
    foreign = tmp_path / "newer.pth"
    torch.save(obj, foreign)
    # a ToMe checkpoint (merge_r 15) asked for as b+t: the layouts' difference, not "merge_r has no effect"
    tome = tmp_path / "tome.pth"
    save_blvit_sam_checkpoint(build_sam_blvit("tome-b", **TINY), tome)
    with pytest.raises(CheckpointError, match="tome.pth: saved for bLViT-SAM 'tome-b', which differs from the requested 'b"):
        build_sam_blvit("b+t", checkpoint=tome, **TINY_BT)
    for load in (lambda: build_sam_from_checkpoint(foreign), lambda: build_sam_blvit("b+t", checkpoint=foreign, **TINY_BT)):
        with pytest.raises(CheckpointError, match=r"newer.pth: its encoder config has fields .*\['semi_cross'\]"):
            load()


def test_settings_a_layout_never_reads_are_refused():
    with pytest.raises(ValueError, match="merge_r=3 has no effect on this layout \\(bLViT\\)"):
        make_config("b+t", merge_r=3)
    with pytest.raises(ValueError, match="score_momentum=0.9 has no effect.*'evit'"):
        make_config("evit-b", score_momentum=0.9)
    with pytest.raises(ValueError, match="e_num_heads=6 has no effect on this layout \\(dense\\)"):
        make_config("vit_b", e_num_heads=6)
    with pytest.raises(ValueError, match="window_size 0 must be >= 1"):
        make_config("b+t", window_size=0)
    make_config("vit_b", window_size=0)  # stock SAM: every layer global
    make_config("tome-b", keep_ratio=1.0)  # callers pass a keep ratio to every variant


def test_e_block_head_width_mismatch_names_the_file(tmp_path):
    torch.manual_seed(2)
    small_b = stock_sam(32, 4, 2, (1, 3), img_size=256)  # heads 16 wide
    path = tmp_path / "sam_b_small.pth"
    torch.save(small_b.state_dict(), path)
    with pytest.raises(CheckpointError, match="sam_b_small.pth: blocks.0.attn.rel_pos_h has heads 16 wide.*e_num_heads"):
        build_sam_blvit("h+b", e_checkpoint=path, img_size=256, embed_dim=64, depth=6, num_heads=4,
                        global_attn_indexes=(2, 5), e_embed_dim=32, e_num_heads=4, blvit_layers=range(2, 6),
                        e_block_layers=(2, 3, 4, 5), predictor_layers=(2,))


def test_e_blocks_from_vit_b_file(tmp_path):
    torch.manual_seed(2)
    small_b = stock_sam(32, 4, 2, (1, 3), img_size=256)
    path = tmp_path / "sam_b_small.pth"
    torch.save(small_b.state_dict(), path)
    model = build_sam_blvit("h+b", e_checkpoint=path, img_size=256, embed_dim=64, depth=6, num_heads=4,
                            global_attn_indexes=(2, 5), e_embed_dim=32, e_num_heads=2, blvit_layers=range(2, 6),
                            e_block_layers=(2, 3, 4, 5), predictor_layers=(2,))
    e = model.image_encoder.blocks[3].e_block
    assert torch.equal(e.mlp.lin1.weight, small_b.image_encoder.blocks[1].mlp.lin1.weight)
    with pytest.raises(CheckpointError, match="E-blocks are 48 wide"):
        load_e_blocks_from_sam(build_sam_blvit("b+t", **dict(TINY_BT, e_embed_dim=48)).image_encoder, path)


def test_unknown_config_key_lists_valid_keys():
    with pytest.raises(ValueError, match="unknown bLViT-SAM config key.*'keep_ratoi'.*valid keys.*keep_ratio"):
        make_config("b+t", keep_ratoi=0.5)
    with pytest.raises(ValueError, match="unknown bLViT-SAM variant"):
        make_config("b+s")
    with pytest.raises(ValueError, match="keep_ratio 1.5"):
        make_config("b+t", keep_ratio=1.5)
    assert set(VARIANTS) >= {"b+t", "h+b"}
