"""Selective scan backends, causal conv1d and the Vision Mamba model (blvit.mamba)."""
import argparse
import importlib.util
import logging

import pytest
import torch
import torch.nn.functional as F

import blvit  # noqa: F401  (registers the Vim models with timm)
from blvit.mamba import (
    VARIANTS,
    Mamba,
    VisionMamba,
    causal_conv1d,
    count_scan_macs,
    load_vim_checkpoint,
    selective_scan,
    selective_scan_macs,
    vim_macs,
)
from blvit.utils.io import CheckpointError

TINY_VIM = dict(img_size=32, patch_size=8, depth=3, embed_dim=32, num_classes=10)


def _scan_inputs(batch=2, dim=6, length=197, n=5, bc="var", seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    u = rnd(batch, dim, length)
    delta = rnd(batch, dim, length) * 0.5
    A = -torch.exp(rnd(dim, n) * 0.5 + 0.5)  # A < 0, like -exp(A_log)
    shapes = {"var": (batch, n, length), "group2": (batch, 2, n, length), "fixed": (dim, n)}
    b_kind, c_kind = (bc, bc) if bc != "mixed" else ("group2", "var")
    B = rnd(*shapes[b_kind])
    C = rnd(*shapes[c_kind])
    return dict(u=u, delta=delta, A=A, B=B, C=C, D=rnd(dim), z=rnd(batch, dim, length), delta_bias=rnd(dim) * 0.3)


CASES = [
    # length, B/C kind, with D, with z, with delta_bias, softplus, chunk
    (197, "var", True, True, True, True, 32),
    (197, "var", False, False, False, False, 32),
    (197, "group2", True, True, True, True, 64),
    (33, "fixed", True, False, True, True, 7),
    (40, "mixed", False, True, True, True, 16),
    (1, "var", True, True, False, True, 32),
    (50, "var", True, True, True, True, 1000),  # one chunk longer than the sequence
]


@pytest.mark.parametrize("length,bc,with_d,with_z,with_bias,softplus,chunk", CASES)
def test_torch_scan_matches_reference(length, bc, with_d, with_z, with_bias, softplus, chunk):
    inp = _scan_inputs(length=length, bc=bc)
    if not softplus:  # keep delta >= 0 without softplus so that the decays stay in (0, 1]
        inp["delta"] = inp["delta"].abs()
    kwargs = dict(D=inp["D"] if with_d else None, z=inp["z"] if with_z else None,
                  delta_bias=inp["delta_bias"] if with_bias else None, delta_softplus=softplus)
    args = [inp[k] for k in ("u", "delta", "A", "B", "C")]
    ref, ref_state = selective_scan(*args, backend="reference", return_last_state=True, **kwargs)
    out, state = selective_scan(*args, backend="torch", return_last_state=True, chunk_size=chunk, **kwargs)
    assert out.shape == inp["u"].shape and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
    torch.testing.assert_close(state, ref_state, rtol=1e-4, atol=1e-5 * ref_state.abs().max().item())
    # backend=None on CPU is the torch path
    torch.testing.assert_close(selective_scan(*args, **kwargs), out, rtol=1e-5, atol=1e-6)


def test_scan_reference_is_the_recurrence():
    """The reference backend against the textbook recurrence, one channel at a time."""
    inp = _scan_inputs(batch=1, dim=2, length=9, n=3)
    out = selective_scan(inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"], inp["D"], inp["z"],
                         inp["delta_bias"], True, backend="reference")
    for d in range(2):
        h = torch.zeros(3)
        for t in range(9):
            dt = F.softplus(inp["delta"][0, d, t] + inp["delta_bias"][d])
            h = torch.exp(dt * inp["A"][d]) * h + dt * inp["B"][0, :, t] * inp["u"][0, d, t]
            y = (inp["C"][0, :, t] * h).sum() + inp["D"][d] * inp["u"][0, d, t]
            y = y * F.silu(inp["z"][0, d, t])
            torch.testing.assert_close(out[0, d, t], y, rtol=1e-5, atol=1e-6)


def test_scan_low_precision_inputs_and_stability():
    inp = _scan_inputs(length=64)
    # very large steps: exp(delta * A) underflows to 0 instead of overflowing anywhere
    big = inp["delta"].abs() * 200
    args = (inp["u"].bfloat16(), big.bfloat16(), inp["A"], inp["B"].bfloat16(), inp["C"].bfloat16())
    out = selective_scan(*args, inp["D"], inp["z"].bfloat16(), backend="torch")
    ref = selective_scan(*args, inp["D"], inp["z"].bfloat16(), backend="reference")
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=1e-2)


def test_torch_scan_gradients_match_reference():
    inp = _scan_inputs(batch=2, dim=4, length=37, n=3, bc="group2", seed=1)
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
    grads = {}
    for backend in ("reference", "torch"):
        leaves = {k: inp[k].clone().requires_grad_(True) for k in names}
        out = selective_scan(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"], leaves["D"],
                             leaves["z"], leaves["delta_bias"], True, backend=backend, chunk_size=8)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads[backend] = {k: leaves[k].grad for k in names}
    for k in names:
        ref = grads["reference"][k]
        assert grads["torch"][k] is not None, k
        torch.testing.assert_close(grads["torch"][k], ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item(), msg=k)


SEQ_KEYS = ("u", "delta", "B", "C", "z")  # the inputs with a sequence axis (the last one)
SCAN_KEYS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """||got - ref|| / ||ref||."""
    return ((got.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def _scan_with_grads(inputs, backend, device="cpu", chunk_size=32):
    """Output, last state and the gradients of every input of one scan (float32)."""
    leaves = {k: inputs[k].to(device).clone().requires_grad_(True) for k in SCAN_KEYS}
    out, state = selective_scan(*(leaves[k] for k in SCAN_KEYS), delta_softplus=True, backend=backend,
                                return_last_state=True, chunk_size=chunk_size)
    weight = torch.linspace(-1, 1, out.numel(), device=device).view_as(out)
    ((out * weight).sum() + state.float().sum()).backward()
    return out.detach().cpu(), state.detach().cpu(), {k: leaves[k].grad.detach().cpu() for k in SCAN_KEYS}


def _both_directions(inp):
    """The inputs as the forward branch sees them and flipped along the sequence, as Vim's backward
    branch scans them (``xz.flip(-1)``)."""
    return {"forward": inp, "backward": {k: (v.flip(-1) if k in SEQ_KEYS else v) for k, v in inp.items()}}


@pytest.mark.parametrize("bc", ["var", "group2"])
def test_fast_scan_matches_reference_in_both_directions_with_gradients(bc):
    """The chunked "torch" scan against the sequential reference on random inputs (Vim's 197 tokens,
    N = 16), on the sequence and on its flip, outputs, final states and the gradients of all eight
    inputs: relative error (||fast - ref|| / ||ref||) below 1e-4 in float32."""
    inp = _scan_inputs(batch=2, dim=8, length=197, n=16, bc=bc, seed=7)
    outs = {}
    for direction, x in _both_directions(inp).items():
        ref_out, ref_state, ref_grads = _scan_with_grads(x, "reference")
        out, state, grads = _scan_with_grads(x, "torch")
        assert _rel_err(out, ref_out) < 1e-4, direction
        assert _rel_err(state, ref_state) < 1e-4, direction
        for k in SCAN_KEYS:
            assert _rel_err(grads[k], ref_grads[k]) < 1e-4, (direction, k)
        outs[direction] = out
    # the two directions really are different scans (the recurrence is not symmetric in time)
    assert _rel_err(outs["backward"].flip(-1), outs["forward"]) > 1e-2


def test_mixer_fast_and_reference_backends_agree_in_both_directions_with_gradients():
    """The bidirectional mixer (forward branch + backward branch on the flipped sequence) with the
    torch scan against the reference scan: output and every parameter's gradient, including the
    backward branch's own conv1d_b / x_proj_b / dt_proj_b / A_b_log / D_b."""
    torch.manual_seed(0)
    mixer = Mamba(16, d_state=8)
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    hidden = torch.randn(2, 65, 16)
    results = {}
    for backend in ("reference", "torch"):
        mixer.zero_grad()
        mixer.scan_backend = backend
        out = mixer(hidden)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results[backend] = (out.detach(), {n: p.grad.clone() for n, p in mixer.named_parameters()})
    (ref, ref_grads), (out, grads) = results["reference"], results["torch"]
    assert _rel_err(out, ref) < 1e-4
    assert {"A_b_log", "D_b", "conv1d_b.weight", "x_proj_b.weight", "dt_proj_b.weight"} <= set(grads)
    for name, g in grads.items():
        assert ref_grads[name].abs().sum() > 0, name
        assert _rel_err(g, ref_grads[name]) < 1e-4, name


_HAS_MAMBA_SSM = importlib.util.find_spec("mamba_ssm") is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the mamba_ssm kernel runs on CUDA only")
@pytest.mark.skipif(not _HAS_MAMBA_SSM, reason="mamba_ssm is not installed: there is no fused CUDA scan to compare")
@pytest.mark.parametrize("bc", ["var", "group2"])
def test_cuda_scan_matches_reference_in_both_directions_with_gradients(bc):
    """mamba_ssm's fused kernel (backend="cuda") against the sequential reference, as above."""
    inp = _scan_inputs(batch=2, dim=8, length=197, n=16, bc=bc, seed=7)
    for direction, x in _both_directions(inp).items():
        ref_out, ref_state, ref_grads = _scan_with_grads(x, "reference")
        out, state, grads = _scan_with_grads(x, "cuda", device="cuda")
        assert _rel_err(out, ref_out) < 1e-4, direction
        assert _rel_err(state, ref_state) < 1e-4, direction
        for k in SCAN_KEYS:
            assert _rel_err(grads[k], ref_grads[k]) < 1e-4, (direction, k)


def test_scan_backend_errors():
    inp = _scan_inputs(length=8)
    args = [inp[k] for k in ("u", "delta", "A", "B", "C")]
    with pytest.raises(ValueError, match="unknown selective_scan backend"):
        selective_scan(*args, backend="triton")
    with pytest.raises(RuntimeError, match="backend 'cuda'"):
        selective_scan(*args, backend="cuda")  # CPU tensors (and, here, no mamba_ssm)
    with pytest.raises(ValueError, match="B must be"):
        selective_scan(inp["u"], inp["delta"], inp["A"], inp["B"][:, :3], inp["C"])


def test_scan_mac_counter_and_meta():
    u = torch.empty(2, 6, 11, device="meta")
    A = torch.empty(6, 4, device="meta")
    B = torch.empty(2, 4, 11, device="meta")
    with count_scan_macs() as counter:
        out = selective_scan(u, u, A, B, B, torch.empty(6, device="meta"), z=u)
    assert out.shape == u.shape and out.device.type == "meta"
    assert counter.calls == 1 and counter.macs == selective_scan_macs(2, 6, 11, 4) == 2 * 6 * 11 * (4 * 4 + 3)


@pytest.mark.parametrize("weight_shape", ["d1w", "dw"])
def test_causal_conv1d_matches_padded_conv(weight_shape):
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(6, 6, 4, groups=6, padding=3)
    x = torch.randn(2, 6, 13)
    ref = F.silu(conv(x)[..., :13])
    w = conv.weight if weight_shape == "d1w" else conv.weight[:, 0]
    torch.testing.assert_close(causal_conv1d(x, w, conv.bias, activation="silu"), ref)
    torch.testing.assert_close(causal_conv1d(x, w, None, activation=None), conv(x)[..., :13] - conv.bias[:, None])


# ----------------------------------------------------------------------------------------------
# Vision Mamba
# ----------------------------------------------------------------------------------------------


def _tiny_vim(seed=0, **overrides):
    import timm

    torch.manual_seed(seed)
    model = timm.create_model("vim_tiny_patch16_224", **dict(TINY_VIM, **overrides)).eval()
    with torch.no_grad():  # move every parameter off its structured init so that loading is visible
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def test_official_key_layout_and_shapes():
    import timm

    with torch.device("meta"):
        model = timm.create_model("vim_tiny_patch16_224")
    sd = model.state_dict()
    expected = {
        "cls_token": (1, 1, 192), "pos_embed": (1, 197, 192), "patch_embed.proj.weight": (192, 3, 16, 16),
        "norm_f.weight": (192,), "head.weight": (1000, 192), "layers.23.norm.weight": (192,),
        "layers.0.mixer.in_proj.weight": (768, 192), "layers.0.mixer.conv1d.weight": (384, 1, 4),
        "layers.0.mixer.conv1d.bias": (384,), "layers.0.mixer.x_proj.weight": (44, 384),
        "layers.0.mixer.dt_proj.weight": (384, 12), "layers.0.mixer.dt_proj.bias": (384,),
        "layers.0.mixer.A_log": (384, 16), "layers.0.mixer.D": (384,), "layers.0.mixer.out_proj.weight": (192, 384),
        "layers.0.mixer.conv1d_b.weight": (384, 1, 4), "layers.0.mixer.x_proj_b.weight": (44, 384),
        "layers.0.mixer.dt_proj_b.weight": (384, 12), "layers.0.mixer.A_b_log": (384, 16), "layers.0.mixer.D_b": (384,),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert len([k for k in sd if k.startswith("layers.0.")]) == 17
    assert {k for k in sd if not k.startswith("layers.")} == {
        "cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm_f.weight", "head.weight",
        "head.bias"}
    for name, width in (("vim_small_patch16_224", 384), ("vim_base_patch16_224", 768)):
        with torch.device("meta"):
            m = timm.create_model(name)
        assert m.embed_dim == width and len(m.layers) == 24 and m.layers[0].mixer.d_inner == 2 * width


def test_timm_checkpoint_path_loads_official_layout(tmp_path):
    import timm

    source = _tiny_vim(seed=1)
    ema = _tiny_vim(seed=2)
    path = tmp_path / "vim_t_midclstok_tiny.pth"
    torch.save({"model": source.state_dict(), "model_ema": ema.state_dict(), "epoch": 299,
                "args": argparse.Namespace(model="vim_tiny")}, path)
    x = torch.randn(2, 3, 32, 32)
    loaded = timm.create_model("vim_tiny_patch16_224", checkpoint_path=str(path), **TINY_VIM).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), source(x))  # "model" preferred over timm's default "model_ema"
        ema_model = VisionMamba(**TINY_VIM).eval()
        load_vim_checkpoint(ema_model, path, use_ema=True)
        assert torch.equal(ema_model(x), ema(x))


def test_wrong_checkpoint_names_path_and_keys(tmp_path):
    import timm
    from timm.models.vision_transformer import VisionTransformer

    deit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)
    path = tmp_path / "deit_tiny.pth"
    torch.save({"model": deit.state_dict()}, path)
    with pytest.raises(CheckpointError) as err:
        timm.create_model("vim_tiny_patch16_224", checkpoint_path=str(path), **TINY_VIM)
    msg = str(err.value)
    assert str(path) in msg and "blocks.0.attn.qkv.weight" in msg and "layers.0.mixer.in_proj.weight" in msg
    # a Vim of another width: shape mismatches are named
    other = _tiny_vim(embed_dim=48)
    path2 = tmp_path / "vim_wide.pth"
    torch.save({"model": other.state_dict()}, path2)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_vim_checkpoint(VisionMamba(**TINY_VIM), path2)


def test_random_vim_ti_in_official_layout_loads_with_no_missing_or_unexpected_keys(tmp_path):
    """A full-size Vim-Ti built at random and saved as the official files are ({"model": ...,
    "epoch", "args"}) loads back through every entry point with nothing missing, nothing unexpected."""
    import timm
    from timm.models import load_checkpoint

    torch.manual_seed(0)
    source = timm.create_model("vim_tiny_patch16_224")
    state = source.state_dict()
    path = tmp_path / "vim_t_midclstok_random.pth"
    torch.save({"model": state, "epoch": 299, "args": argparse.Namespace(model="vim_tiny_patch16_224")}, path)
    saved = torch.load(path, weights_only=False)["model"]
    fresh = timm.create_model("vim_tiny_patch16_224")
    assert set(saved) == set(fresh.state_dict()) and len(saved) == 7 + 24 * 17

    result = fresh.load_state_dict(saved)  # strict
    assert result.missing_keys == [] and result.unexpected_keys == []
    result = load_checkpoint(timm.create_model("vim_tiny_patch16_224"), str(path))  # timm's loader
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert load_vim_checkpoint(VisionMamba(**VARIANTS["vim_tiny_patch16_224"]), path) == []  # nothing left at init
    loaded = timm.create_model("vim_tiny_patch16_224", checkpoint_path=str(path))
    loaded_state = loaded.state_dict()
    for key, value in state.items():
        assert torch.equal(loaded_state[key], value), key


def test_vim_small_file_into_vim_tiny_names_the_shape_mismatches(tmp_path):
    """A checkpoint of another Vim size: the error names the file, the two architectures and, per
    key, both shapes."""
    import timm

    from blvit.train.classification import create_classifier

    torch.manual_seed(0)
    path = tmp_path / "vim_s_midclstok_random.pth"
    torch.save({"model": timm.create_model("vim_small_patch16_224").state_dict()}, path)
    loaders = {
        "load_vim_checkpoint": lambda: load_vim_checkpoint(VisionMamba(**VARIANTS["vim_tiny_patch16_224"]), path),
        "timm checkpoint_path": lambda: timm.create_model("vim_tiny_patch16_224", checkpoint_path=str(path)),
        "trainer": lambda: create_classifier("vim_tiny_patch16_224", {}, checkpoint=str(path)),
    }
    for how, load in loaders.items():
        with pytest.raises(CheckpointError) as err:
            load()
        msg = str(err.value)
        assert str(path) in msg and "shape mismatches" in msg, how
        assert ("(checkpoint: embed_dim 384, depth 24, 1000 classes; "
                "model: embed_dim 192, depth 24, 1000 classes)") in msg, how
        assert "pos_embed: checkpoint (1, 197, 384) vs model (1, 197, 192)" in msg, how
        assert "layers.0.mixer.in_proj.weight: checkpoint (1536, 384) vs model (768, 192)" in msg, how


def test_checkpoint_of_another_image_size_is_an_error_unless_resampling_is_asked(tmp_path, caplog):
    """A Vim-Ti file saved at 64 px (4 x 4 patches) into a Vim-Ti at 224 (14 x 14), and the
    reverse: a CheckpointError naming the file, both grids and the opt-in; with
    resample_pos_embed=True the embedding is resampled and a log line says so."""
    import timm

    torch.manual_seed(0)
    small = timm.create_model("vim_tiny_patch16_224", img_size=64)
    small_path = tmp_path / "vim_t_64px.pth"
    torch.save({"model": small.state_dict()}, small_path)
    full_path = tmp_path / "vim_t_224px.pth"
    torch.save({"model": timm.create_model("vim_tiny_patch16_224").state_dict()}, full_path)

    attempts = [
        (small_path, lambda: timm.create_model("vim_tiny_patch16_224", checkpoint_path=str(small_path)),
         "a 4x4 patch grid (img_size 64 at patch 16), the model has a 14x14 grid (img_size 224)"),
        (small_path, lambda: load_vim_checkpoint(VisionMamba(), small_path),
         "a 4x4 patch grid (img_size 64 at patch 16), the model has a 14x14 grid (img_size 224)"),
        (full_path, lambda: timm.create_model("vim_tiny_patch16_224", img_size=64, checkpoint_path=str(full_path)),
         "a 14x14 patch grid (img_size 224 at patch 16), the model has a 4x4 grid (img_size 64)"),
    ]
    for path, load, grids in attempts:
        with pytest.raises(CheckpointError) as err:
            load()
        msg = str(err.value)
        assert str(path) in msg and grids in msg and "resample_pos_embed=True" in msg

    with caplog.at_level(logging.INFO, logger="blvit.mamba.vim"):
        model = timm.create_model("vim_tiny_patch16_224", checkpoint_path=str(small_path), resample_pos_embed=True)
    assert "resampling pos_embed from a 4x4 patch grid (img_size 64 at patch 16) to a 14x14 grid" in caplog.text
    assert model.pos_embed.shape == (1, 197, 192)
    assert torch.equal(model.pos_embed[:, 98], small.pos_embed[:, 8])  # class-token entry kept in the middle
    assert torch.equal(model.layers[5].mixer.in_proj.weight, small.layers[5].mixer.in_proj.weight)
    assert load_vim_checkpoint(VisionMamba(), small_path, resample_pos_embed=True) == []


def test_pos_embed_resampled_with_middle_class_token(tmp_path):
    source = _tiny_vim()
    path = tmp_path / "vim.pth"
    torch.save({"model": source.state_dict()}, path)
    bigger = VisionMamba(**dict(TINY_VIM, img_size=48))  # 4x4 -> 6x6 grid
    with pytest.raises(CheckpointError, match="resample_pos_embed=True"):
        load_vim_checkpoint(bigger, path)  # not without being asked
    load_vim_checkpoint(bigger, path, resample_pos_embed=True)
    assert torch.equal(bigger.pos_embed[:, 18], source.pos_embed[:, 8])  # class token entry moved to the new middle
    assert bigger(torch.randn(1, 3, 48, 48)).shape == (1, 10)


def test_scan_backends_give_same_logits():
    model = _tiny_vim()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model.set_scan_backend("reference")
        ref = model(x)
        model.set_scan_backend("torch")
        out = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def _rms(x, w, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _sequential_direction(mixer: Mamba, x_seq, z_seq, sfx):
    """One direction of the mixer, written out token by token. x_seq, z_seq: (L, d_inner)."""
    conv = getattr(mixer, f"conv1d{sfx}")
    x_proj = getattr(mixer, f"x_proj{sfx}").weight
    dt_proj = getattr(mixer, f"dt_proj{sfx}")
    a = -torch.exp(mixer.A_log if sfx == "" else mixer.A_b_log)
    skip = getattr(mixer, f"D{sfx}")
    length, width = x_seq.shape[0], conv.weight.shape[-1]
    h = torch.zeros_like(a)
    ys = []
    for t in range(length):
        acc = conv.bias.clone()
        for k in range(width):  # causal: taps on t - width + 1 .. t
            src = t - width + 1 + k
            if src >= 0:
                acc = acc + conv.weight[:, 0, k] * x_seq[src]
        xc = F.silu(acc)
        dbl = x_proj @ xc
        dt, b, c = dbl[: mixer.dt_rank], dbl[mixer.dt_rank: mixer.dt_rank + mixer.d_state], dbl[mixer.dt_rank + mixer.d_state:]
        delta = F.softplus(dt_proj.weight @ dt + dt_proj.bias)
        h = torch.exp(delta[:, None] * a) * h + (delta * xc)[:, None] * b[None, :]
        y = h @ c + skip * xc
        ys.append(y * F.silu(z_seq[t]))
    return torch.stack(ys)


def test_mixer_against_sequential_formula():
    torch.manual_seed(0)
    mixer = Mamba(8, d_state=4, expand=2)
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    hidden = torch.randn(2, 7, 8)
    with torch.no_grad():
        out = mixer(hidden)
        for b in range(2):
            xz = hidden[b] @ mixer.in_proj.weight.T  # (L, 2 d_inner)
            x, z = xz[:, :16], xz[:, 16:]
            fwd = _sequential_direction(mixer, x, z, "")
            bwd = _sequential_direction(mixer, x.flip(0), z.flip(0), "_b").flip(0)
            expected = ((fwd + bwd) / 2) @ mixer.out_proj.weight.T
            torch.testing.assert_close(out[b], expected, rtol=1e-4, atol=1e-5)


def test_model_forward_order():
    """Middle class token, fused add + norm order, final norm and head on the class token."""
    model = _tiny_vim()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        patches = model.patch_embed.proj(x).flatten(2).transpose(1, 2)  # (B, 16, C)
        tokens = torch.cat([patches[:, :8], model.cls_token.expand(2, -1, -1), patches[:, 8:]], 1) + model.pos_embed
        hidden, residual = tokens, None
        for layer in model.layers:
            residual = hidden if residual is None else residual + hidden
            hidden = layer.mixer(_rms(residual, layer.norm.weight))
        final = _rms(residual + hidden, model.norm_f.weight)
        expected = model.head(final[:, 8])
        out = model(x)
    assert model.token_position == 8
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_vim_trains_and_counts_flops():
    model = _tiny_vim().train()
    model(torch.randn(2, 3, 32, 32)).square().mean().backward()
    assert model.layers[0].mixer.A_b_log.grad is not None and model.layers[-1].mixer.D.grad.abs().sum() > 0
    macs = vim_macs(model)
    d_inner, length = 64, 17
    assert macs["scan"] == 3 * 2 * selective_scan_macs(1, d_inner, length, 16)
    assert macs["total"] == macs["counted"] + macs["scan"] and macs["counted"] > 0


@pytest.mark.parametrize("bc", ["var", "fixed", "group2"])
@pytest.mark.parametrize("last_state", [False, True])
def test_recomputed_chunks_give_plain_autograds_gradients(bc, last_state, monkeypatch):
    """Training through the torch scan recomputes each chunk in backward with the recurrence's
    written-out adjoint: the same outputs, last state and gradients of every input as autograd
    through every chunk (the scan computes in float32: equal to 1e-5, rounding apart)."""
    scan = importlib.import_module("blvit.mamba.selective_scan")
    inp = {k: (v.double() if torch.is_tensor(v) else v) for k, v in _scan_inputs(batch=2, dim=4, length=45, n=3, bc=bc, seed=3).items()}
    results = {}
    for recompute in (False, True):
        monkeypatch.setattr(scan, "RECOMPUTE_IN_BACKWARD", recompute)
        leaves = {k: inp[k].clone().requires_grad_(True) for k in SCAN_KEYS}
        out = selective_scan(*(leaves[k] for k in SCAN_KEYS), delta_softplus=True, backend="torch", chunk_size=8,
                             return_last_state=last_state)
        out, state = out if last_state else (out, None)
        loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum()
        if state is not None:
            loss = loss + (state * state).sum()
        loss.backward()
        results[recompute] = (out.detach(), state, {k: leaves[k].grad for k in SCAN_KEYS})
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-5, atol=1e-5)
    for k in SCAN_KEYS:
        torch.testing.assert_close(results[True][2][k], results[False][2][k], rtol=1e-5, atol=1e-5, msg=k)


def test_training_scan_keeps_no_sequence_by_state_tensor():
    """What autograd keeps for one scan (saved-tensor hooks): with chunk recomputation no saved
    tensor has (batch, D, L, N) elements and the total is a fraction of plain autograd's."""
    scan = importlib.import_module("blvit.mamba.selective_scan")
    batch, dim, length, n = 1, 32, 197, 16
    inp = _scan_inputs(batch=batch, dim=dim, length=length, n=n, bc="var", seed=0)
    saved = {}
    for recompute in (False, True):
        sizes = []
        leaves = {k: inp[k].clone().requires_grad_(True) for k in SCAN_KEYS}
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            scan._selective_scan_torch(*(leaves[k] for k in SCAN_KEYS), delta_softplus=True, recompute=recompute)
        saved[recompute] = sizes
    full = batch * dim * length * n
    assert max(saved[True]) < full / 4, max(saved[True])
    assert sum(saved[True]) < sum(saved[False]) / 8, (sum(saved[True]), sum(saved[False]))
