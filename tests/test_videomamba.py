"""VideoMamba (blvit.mamba.videomamba): the official layout and checkpoints, the token order, and
the selective-scan backends on spatio-temporal sequences."""
import numpy as np
import pytest
import timm
import torch

import blvit  # noqa: F401  (registers the timm names)
from blvit.mamba import VideoMamba, load_videomamba_checkpoint, videomamba_macs
from blvit.utils.io import CheckpointError

TINY = dict(img_size=32, num_frames=4, depth=2, num_classes=5)


def official_state_dict(embed_dim: int, depth: int, frames: int, img_size: int, classes: int, seed: int = 0,
                        image_checkpoint: bool = False):
    """Random values under the key names and shapes of OpenGVLab/VideoMamba's ``VisionMamba``
    (written from its code, independently of this toolkit's module): d_inner 2C, d_state 16,
    dt_rank ceil(C / 16), conv 4, tubelet 1. ``image_checkpoint``: the ImageNet-pretrained file's
    layout (2-D patch kernel, no temporal embedding)."""
    g = torch.Generator().manual_seed(seed)
    c, di, n, r = embed_dim, 2 * embed_dim, 16, -(-embed_dim // 16)
    h = img_size // 16
    rnd = lambda *shape: torch.randn(*shape, generator=g) * 0.02  # noqa: E731
    sd = {"cls_token": rnd(1, 1, c), "pos_embed": rnd(1, 1 + h * h, c),
          "patch_embed.proj.weight": rnd(c, 3, 16, 16) if image_checkpoint else rnd(c, 3, 1, 16, 16),
          "patch_embed.proj.bias": rnd(c), "norm_f.weight": 1 + rnd(c), "head.weight": rnd(classes, c),
          "head.bias": rnd(classes)}
    if not image_checkpoint:
        sd["temporal_pos_embedding"] = rnd(1, frames, c)
    for i in range(depth):
        p = f"layers.{i}."
        sd[p + "norm.weight"] = 1 + rnd(c)
        sd[p + "mixer.in_proj.weight"] = rnd(2 * di, c)
        sd[p + "mixer.out_proj.weight"] = rnd(c, di)
        for sfx in ("", "_b"):
            sd[p + f"mixer.conv1d{sfx}.weight"] = rnd(di, 1, 4) * 10
            sd[p + f"mixer.conv1d{sfx}.bias"] = rnd(di)
            sd[p + f"mixer.x_proj{sfx}.weight"] = rnd(r + 2 * n, di) * 10
            sd[p + f"mixer.dt_proj{sfx}.weight"] = rnd(di, r) * 10
            sd[p + f"mixer.dt_proj{sfx}.bias"] = rnd(di) - 4.0
            sd[p + ("mixer.A_log" if sfx == "" else "mixer.A_b_log")] = torch.log(torch.arange(1, n + 1.0)).repeat(di, 1)
            sd[p + f"mixer.D{sfx}"] = 1 + rnd(di)
    return sd


def test_official_state_dict_loads_with_no_missing_or_unexpected_keys(tmp_path):
    sd = official_state_dict(192, 2, 4, 32, 5)
    torch.save({"model": sd}, tmp_path / "videomamba_t16_k400_f4.pth")
    model = timm.create_model("videomamba_tiny", checkpoint_path=str(tmp_path / "videomamba_t16_k400_f4.pth"), **TINY)
    own = model.state_dict()
    assert set(own) == set(sd)
    assert all(torch.equal(own[k], sd[k]) for k in sd)
    assert load_videomamba_checkpoint(model, tmp_path / "videomamba_t16_k400_f4.pth") == []
    out = model.eval()(torch.randn(2, 3, 4, 32, 32))
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    # a checkpoint of another model: one clear error naming the file (an image Mamba of the same
    # width has the same keys and loads as an image initialisation, as VideoMamba's in1k files do)
    deit = timm.create_model("deit_tiny_patch16_224", img_size=32, depth=2, num_classes=5)
    torch.save({"model": deit.state_dict()}, tmp_path / "deit.pth")
    with pytest.raises(CheckpointError, match="deit.pth"):
        load_videomamba_checkpoint(model, tmp_path / "deit.pth")
    wider = official_state_dict(384, 2, 4, 32, 5)
    torch.save({"model": wider}, tmp_path / "videomamba_s.pth")
    with pytest.raises(CheckpointError, match="videomamba_s.pth"):
        load_videomamba_checkpoint(model, tmp_path / "videomamba_s.pth")


def test_tokens_are_class_then_frames_with_spatial_and_temporal_embeddings():
    """The official order ``[cls, frame 0 patches, frame 1 patches, ...]``: patches get the
    spatial embedding of their place and the temporal embedding of their frame (the reference's
    two rearranges, written out here)."""
    torch.manual_seed(0)
    model = timm.create_model("videomamba_tiny", **TINY).eval()
    with torch.no_grad():
        model.temporal_pos_embedding.normal_()
        model.cls_token.normal_()
    x = torch.randn(2, 3, 4, 32, 32)
    tokens, index = model.embed(x)
    frames = torch.stack([model.patch_embed.proj(x[:, :, t:t + 1]).flatten(2).transpose(1, 2) for t in range(4)], 1)
    expected = frames + model.pos_embed[:, None, 1:] + model.temporal_pos_embedding[:, :, None]  # (B, T, hw, C)
    assert index == 0 and tokens.shape == (2, 1 + 4 * 4, 192)
    torch.testing.assert_close(tokens[:, 0], (model.cls_token + model.pos_embed[:, 0]).expand(2, 1, -1)[:, 0])
    torch.testing.assert_close(tokens[:, 1:], expected.reshape(2, 16, 192))
    # frame order matters (bidirectional scan over time): reversing the clip changes the logits
    with torch.no_grad():
        assert not torch.allclose(model(x), model(x.flip(2)), atol=1e-4)


def test_directions_are_summed_as_videomamba_does():
    """VideoMamba's mixer returns out_proj(y_fwd + y_bwd.flip) (no division by 2, unlike Vim's
    released models)."""
    model = timm.create_model("videomamba_tiny", **TINY)
    mixer = model.layers[0].mixer
    assert mixer.if_divide_out is False
    h = torch.randn(1, 9, 192)
    xz = mixer.in_proj(h).transpose(1, 2)
    y = mixer._direction(xz, "") + mixer._direction(xz.flip(-1), "_b").flip(-1)
    torch.testing.assert_close(mixer(h), mixer.out_proj(y.transpose(1, 2)))


def test_reference_and_chunked_scans_agree_forward_and_backward():
    """The sequential reference scan and the chunked (recomputing) PyTorch scan on the same
    VideoMamba: logits and every parameter's gradient, relative error < 1e-5 in float32."""
    sd = official_state_dict(192, 2, 4, 32, 5, seed=1)
    x = torch.randn(2, 3, 4, 32, 32, generator=torch.Generator().manual_seed(2))
    results = {}
    for backend in ("reference", "torch"):
        model = timm.create_model("videomamba_tiny", scan_backend=backend, **TINY)
        model.load_state_dict(sd)
        out = model(x)
        out.square().sum().backward()
        results[backend] = (out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    (ref_out, ref_grads), (out, grads) = results["reference"], results["torch"]
    rel = lambda a, b: ((a - b).norm() / b.norm().clamp(min=1e-12)).item()  # noqa: E731
    assert rel(out, ref_out) < 1e-5
    worst = max((rel(grads[n], ref_grads[n]), n) for n in ref_grads)
    assert worst[0] < 1e-5, worst


def test_image_checkpoint_is_inflated_and_temporal_embedding_interpolated(tmp_path, caplog):
    image = official_state_dict(192, 2, 4, 32, 1000, image_checkpoint=True)
    torch.save(image, tmp_path / "videomamba_t16_in1k_res224.pth")
    model = timm.create_model("videomamba_tiny", **TINY)
    with caplog.at_level("INFO"):
        kept = load_videomamba_checkpoint(model, tmp_path / "videomamba_t16_in1k_res224.pth")
    assert sorted(kept) == ["head.bias", "head.weight"]  # 1000 ImageNet classes vs 5
    torch.testing.assert_close(model.patch_embed.proj.weight[:, :, 0], image["patch_embed.proj.weight"])
    assert torch.count_nonzero(model.temporal_pos_embedding) == 0
    assert "inflated" in caplog.text
    # a static clip through the inflated model is the image model applied per frame, in time order
    video = official_state_dict(192, 2, 8, 32, 5)
    torch.save({"model": video}, tmp_path / "f8.pth")
    load_videomamba_checkpoint(model, tmp_path / "f8.pth")  # 8 frames into a 4-frame model
    expected = torch.nn.functional.interpolate(video["temporal_pos_embedding"].transpose(1, 2), size=4, mode="linear",
                                               align_corners=False).transpose(1, 2)
    torch.testing.assert_close(model.temporal_pos_embedding.detach(), expected)


def test_clip_shape_errors_and_macs():
    model = timm.create_model("videomamba_tiny", **TINY)
    with pytest.raises(ValueError, match=r"\(B, 3, 4, 32, 32\)"):
        model(torch.randn(1, 3, 8, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, 4, 32, 32\)"):
        model(torch.randn(1, 3, 32, 32))
    assert isinstance(model, VideoMamba)
    # per-frame cost of Vim-Ti (1.5 G at 224) times 8 frames, plus the class token
    tiny = videomamba_macs("videomamba_tiny", num_frames=8)["total"] / 1e9
    vim = blvit.mamba.vim_macs("vim_tiny_patch16_224")["total"] / 1e9
    print(f"VideoMamba-Ti 8x224: {tiny:.2f} GMACs; Vim-Ti 224: {vim:.2f}")
    assert 7.5 * vim < tiny < 8.5 * vim


def test_rmeeto_on_videomamba_keeps_the_video_task_schedule():
    """R-MeeTo's video_task: r = 40 (Ti) / 88 (S, M) at blocks 2, 4, ... (no compare override);
    VideoMamba-S at 8 x 224: 1569 tokens -> 601 after 11 merges; r = 0 is the unmerged model."""
    from blvit.tokens.rmeeto import apply_rmeeto, default_r, patch_tokens

    with torch.device("meta"):
        small = timm.create_model("videomamba_small")
        tiny = timm.create_model("videomamba_tiny")
        middle = timm.create_model("videomamba_middle")
    assert (default_r(tiny), default_r(small), default_r(middle)) == (40, 88, 88)
    assert patch_tokens(small) == 8 * 196
    merge = apply_rmeeto(small).token_merge
    assert merge.compare is None and sorted(merge.r_per_layer) == list(range(2, 23, 2))
    assert set(merge.r_per_layer.values()) == {88}
    assert 1 + 8 * 196 - 11 * 88 == 601
    assert sorted(apply_rmeeto(middle).token_merge.r_per_layer) == list(range(2, 31, 2))  # 32 blocks: 15 merges
    # on a small layout the schedule is the one run: 1 + 4 x 16 = 65 tokens, r 8 at blocks 2 and 4
    torch.manual_seed(0)
    model = timm.create_model("videomamba_tiny", img_size=64, num_frames=4, depth=6, embed_dim=64, num_classes=5).eval()
    x = torch.randn(2, 3, 4, 64, 64)
    with torch.no_grad():
        plain = model(x)
        apply_rmeeto(model, r=0)
        torch.testing.assert_close(model(x), plain)
        apply_rmeeto(model, r=8)
        merged = model(x)
    assert model.token_merge.token_counts == [65, 65, 57, 57, 49, 49]
    assert model.token_merge.cls_positions == [0] * 6  # the class token stays first
    assert (merged - plain).abs().max() > 1e-4
    with pytest.raises(ValueError, match="larger than allowed"):
        apply_rmeeto(model, r=40)


def test_merge_map_over_frames(tmp_path):
    """R-MeeTo on a VideoMamba traced to its patches: the groups partition the frames' patches,
    some span two frames, and the picture shows the frames side by side."""
    from PIL import Image

    from blvit.data.video import render_video
    from blvit.tokens import save_video_merge_map
    from blvit.tokens.rmeeto import apply_rmeeto

    torch.manual_seed(0)
    model = timm.create_model("videomamba_tiny", img_size=64, num_frames=4, depth=6, embed_dim=64, num_classes=5).eval()
    apply_rmeeto(model, r=12, trace_source=True)
    frames = render_video(np.random.default_rng(0), 0, frames=4, size=64)
    clip = torch.from_numpy(frames).permute(3, 0, 1, 2).float().div(255).unsqueeze(0)
    with torch.no_grad():
        model(clip)
    source = model.token_merge.source[0]
    assert source.shape == (64 - 24, 4 * 16)  # 64 patch tokens, 2 merges of 12
    assignment = save_video_merge_map(tmp_path / "merge.png", frames, source, grid=(4, 4))
    frame_of = np.arange(64) // 16
    spans = [len(set(frame_of[assignment == g])) for g in np.unique(assignment)]
    assert max(spans) >= 2  # tokens merge across frames: the sequence is all frames' patches
    picture = np.asarray(Image.open(tmp_path / "merge.png"))
    assert picture.shape[1] > 2.5 * picture.shape[0]  # four frames side by side


def test_multi_view_scores_average_softmax_probabilities_as_released():
    """OpenGVLab/VideoMamba engine_for_finetuning.py merge(): softmax per view, mean over the
    views. One over-confident view must not outvote two that agree (it does with mean logits)."""
    from blvit.train.classification import view_averaged_logits

    logits = torch.tensor([[[12.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 2.0, 0.0]],
                           [[1.0, 0.0, 3.0], [0.0, 1.0, 2.0], [0.5, 0.5, 0.5]]])  # (B=2, V=3, K=3)
    model = lambda x: logits.reshape(-1, 3)  # noqa: E731
    scores = view_averaged_logits(model, torch.zeros(2, 3, 3, 1, 1, 1))
    torch.testing.assert_close(scores.exp(), logits.softmax(-1).mean(1))
    assert scores[0].argmax().item() == 1 and logits[0].mean(0).argmax().item() == 0
    single = torch.randn(2, 3)
    torch.testing.assert_close(view_averaged_logits(lambda x: single, torch.zeros(2, 3, 1, 1, 1)), single)
