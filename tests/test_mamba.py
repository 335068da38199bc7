"""Selective scan backends, causal conv1d and the Vision Mamba model (blvit.mamba)."""
import argparse

import pytest
import torch
import torch.nn.functional as F

import blvit  # noqa: F401  (registers the Vim models with timm)
from blvit.mamba import (
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

# Two shared cores: more than one intra-op thread oversubscribes them (forwards 100x slower).
torch.set_num_threads(1)

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


def test_pos_embed_resampled_with_middle_class_token(tmp_path):
    source = _tiny_vim()
    path = tmp_path / "vim.pth"
    torch.save({"model": source.state_dict()}, path)
    bigger = VisionMamba(**dict(TINY_VIM, img_size=48))  # 4x4 -> 6x6 grid
    load_vim_checkpoint(bigger, path)
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
