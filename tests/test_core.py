"""The bLViT core: windows, relative-position bias, routing, blocks."""
import pytest
import torch
from segment_anything.modeling.image_encoder import add_decomposed_rel_pos

from blvit.blocks import BigLittleBlock, DenseBlock
from blvit.layers import decomposed_rel_pos_bias, window_partition, window_unpartition
from blvit.routing import TokenPredictor, gather_tokens, select_global, select_windowed


def test_window_roundtrip_and_padding():
    x = torch.randn(2, 16 * 20, 8)
    w = window_partition(x, (16, 20), 14)
    assert w.shape == (2 * 4, 196, 8)
    assert torch.equal(window_unpartition(w, (16, 20), 14), x)
    # the window at the bottom-right holds 2 x 6 real tokens, the rest is zero padding
    assert (w[3].abs().sum(-1) > 0).sum() == 12


@pytest.mark.parametrize("size", [14, 64])
def test_rel_pos_bias_matches_segment_anything(size):
    torch.manual_seed(0)
    heads, hd = 3, 8
    q = torch.randn(2, heads, size * size, hd)
    rh, rw = torch.randn(2 * size - 1, hd), torch.randn(2 * size - 1, hd)
    pos = torch.arange(size * size)[None]
    ours = decomposed_rel_pos_bias(q, pos // size, pos % size, rh, rw, (size, size))
    zeros = torch.zeros(2 * heads, size * size, size * size)
    ref = add_decomposed_rel_pos(zeros, q.reshape(2 * heads, size * size, hd), rh, rw, (size, size), (size, size))
    torch.testing.assert_close(ours.reshape_as(ref), ref, rtol=1e-5, atol=1e-5)


def test_windowed_selection_fixed_k_no_padding():
    torch.manual_seed(0)
    logits = torch.randn(2, 64 * 64)
    sel = select_windowed(logits, (64, 64), 14, 0.25)
    assert sel.local_index.shape == (2, 25, 49)
    assert bool(sel.valid.all())
    # picks are distinct real tokens, and each is the top-49 of its window
    for b in range(2):
        assert sel.flat_index[b].unique().numel() == 25 * 49
    windows = window_partition(logits.unsqueeze(-1), (64, 64), 14).view(2, 25, 196)
    real = window_partition(torch.ones(1, 4096, 1), (64, 64), 14).view(25, 196) > 0
    kth = windows.masked_fill(~real, float("-inf")).topk(49, -1).values[..., -1:]
    picked = windows.gather(-1, sel.local_index)
    assert bool((picked >= kth).all())


def test_windowed_selection_border_windows():
    # 16 x 16 grid: the corner window has 2 x 2 real tokens; k = 49 > 4 there.
    logits = torch.randn(1, 256)
    sel = select_windowed(logits, (16, 16), 14, 0.25)
    valid = sel.valid.view(4, 49).sum(-1).tolist()
    assert valid == [49, 28, 28, 4]
    real_flat = sel.flat_index[sel.valid]
    assert real_flat.unique().numel() == real_flat.numel() == 49 + 28 + 28 + 4
    # keep ratio 1.0 selects every real token exactly once
    sel = select_windowed(logits, (16, 16), 14, 1.0)
    assert sorted(sel.flat_index[sel.valid].tolist()) == list(range(256))


def test_global_selection_keeps_class_token():
    logits = torch.randn(3, 197)
    logits[:, 0] = -1e9
    sel = select_global(logits, 0.25, num_prefix_tokens=1)
    assert sel.flat_index.shape == (3, 1 + 49)
    assert bool((sel.flat_index == 0).any(-1).all())
    torch.testing.assert_close(sel.scores.sum(-1) <= 197, torch.ones(3, dtype=torch.bool))


@pytest.mark.parametrize("window_size", [14, 0])
def test_semi_cross_attention_equals_dense_rows(window_size):
    """P-block attention on the selected queries equals dense attention at those rows."""
    torch.manual_seed(0)
    grid = (16, 16)
    block = DenseBlock(32, 4, use_rel_pos=True, window_size=window_size, grid=grid)
    with torch.no_grad():
        block.attn.rel_pos_h.normal_()
        block.attn.rel_pos_w.normal_()
    x = torch.randn(2, 256, 32)
    sel = select_windowed(torch.randn(2, 256), grid, 14, 0.25)
    dense = block.attn(x, grid, window_size)
    semi = block.attn(x, grid, window_size, sel)
    valid = sel.valid.unsqueeze(-1)
    torch.testing.assert_close(semi * valid, gather_tokens(dense, sel) * valid, rtol=1e-5, atol=1e-5)


def _big_little(e_dim=16, **kw):
    torch.manual_seed(0)
    block = BigLittleBlock(32, 4, use_rel_pos=True, window_size=14, grid=(16, 16), e_dim=e_dim, e_num_heads=2, **kw)
    with torch.no_grad():
        block.attn.rel_pos_h.normal_()
    return block


def test_big_little_block_at_init_is_dense_on_selected_and_identity_elsewhere():
    block = _big_little()
    dense = DenseBlock(32, 4, use_rel_pos=True, window_size=14, grid=(16, 16))
    dense.load_state_dict({k: v for k, v in block.state_dict().items() if k in dense.state_dict()})
    x = torch.randn(2, 256, 32)
    sel = select_windowed(torch.randn(2, 256), (16, 16), 14, 1.0)
    torch.testing.assert_close(block(x, (16, 16), sel), dense(x, (16, 16)), rtol=1e-5, atol=1e-5)
    sel = select_windowed(torch.randn(2, 256), (16, 16), 14, 0.25)
    out = block(x, (16, 16), sel)
    untouched = torch.ones(2, 256, dtype=torch.bool)
    for b in range(2):
        untouched[b, sel.flat_index[b][sel.valid[b]]] = False
    assert torch.equal(out[untouched], x[untouched])
    assert not torch.allclose(out[~untouched], x[~untouched])


def test_gradients_reach_predictor_gammas_and_both_blocks():
    block = _big_little()
    predictor = TokenPredictor(32)
    params = list(block.parameters()) + list(predictor.parameters())
    opt = torch.optim.SGD(params, lr=0.1)
    x = torch.randn(2, 256, 32)
    for _ in range(2):  # gammas start at 0: after one step every path carries gradient
        opt.zero_grad()
        sel = select_windowed(predictor(x), (16, 16), 14, 0.25)
        block(x, (16, 16), sel).pow(2).mean().backward()
        opt.step()
    named = dict(block.named_parameters(prefix="block"), **dict(predictor.named_parameters(prefix="predictor")))
    for name in ["block.gamma_router", "block.gamma_e_attn", "block.gamma_e_mlp", "predictor.score.weight",
                 "block.attn.qkv.weight", "block.mlp.lin1.weight", "block.e_block.attn.qkv.weight",
                 "block.e_block.mlp.down.weight", "block.e_block.mlp.up.weight"]:
        grad = named[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_scaled_fusion_shrinks_pretrained_update():
    """The paper-literal fusion multiplies the P output by the raw softmax probability."""
    gated, scaled = _big_little(e_dim=None), _big_little(e_dim=None, fusion="scaled")
    x = torch.randn(1, 256, 32)
    sel = select_windowed(torch.zeros(1, 256), (16, 16), 14, 1.0)
    delta_gated = (gated(x, (16, 16), sel) - x).norm()
    delta_scaled = (scaled(x, (16, 16), sel) - x).norm()
    assert delta_scaled < delta_gated / 20


def test_bf16_autocast_close_to_float32():
    block = _big_little()
    with torch.no_grad():
        block.gamma_e_attn.fill_(0.5)
        block.gamma_router.fill_(0.5)
    x = torch.randn(2, 256, 32)
    sel = select_windowed(torch.randn(2, 256), (16, 16), 14, 0.25)
    ref = block(x, (16, 16), sel)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x, (16, 16), sel)
    assert out.dtype == torch.float32  # the residual stream stays float32
    assert (out - ref).norm() / ref.norm() < 2e-2


def test_compiles_without_graph_breaks():
    block = _big_little()
    predictor = TokenPredictor(32)

    def step(x):
        sel = select_windowed(predictor(x), (16, 16), 14, 0.25)
        return block(x, (16, 16), sel)

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 256, 32)
    torch.testing.assert_close(compiled(x), step(x))
