"""The attention backends (how the relative-position bias reaches the kernel) give the same
encoder outputs and gradients; they differ only in which kernels run (speed: blvit-bench)."""
import pytest
import torch

from blvit.layers import ATTENTION_BACKENDS, set_attention_backend
from blvit.routing import select_windowed
from conftest import TINY, TINY_BT, randomize_
from sam_adapter.build import build_sam_blvit


def _encoders():
    torch.manual_seed(0)
    dense = randomize_(build_sam_blvit("vit_b", **TINY).image_encoder.eval(), std=0.2)
    blvit = build_sam_blvit("b+t", keep_ratio=0.25, **TINY_BT).image_encoder.eval()
    with torch.no_grad():  # non-zero gammas so that the P- and E-blocks count
        for name, p in blvit.named_parameters():
            if "gamma" in name:
                p.fill_(0.7)
    return {"dense": dense, "b+t": randomize_(blvit, std=0.2)}


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # the CPU reference path, on purpose
@pytest.mark.parametrize("backend", ["folded", "flex"])
def test_backends_give_the_sdpa_outputs(backend):
    x = torch.randn(2, 3, TINY["img_size"], TINY["img_size"])
    for name, encoder in _encoders().items():
        with torch.no_grad():
            reference = set_attention_backend(encoder, "sdpa")(x)
            out = set_attention_backend(encoder, backend)(x)
        assert reference.abs().mean() > 0.1
        torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4, msg=f"{name} / {backend}")


def test_folded_backend_gives_the_sdpa_gradients():
    x = torch.randn(2, 3, TINY["img_size"], TINY["img_size"])
    encoder = _encoders()["b+t"].train()
    grads = {}
    for backend in ("sdpa", "folded"):
        encoder.zero_grad()
        set_attention_backend(encoder, backend)(x).square().mean().backward()
        grads[backend] = {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None}
    assert grads["sdpa"].keys() == grads["folded"].keys()
    assert any("rel_pos" in n for n in grads["sdpa"])
    for n, g in grads["sdpa"].items():
        torch.testing.assert_close(grads["folded"][n], g, rtol=1e-3, atol=1e-6, msg=n)


def test_folded_backend_under_bf16_autocast():
    x = torch.randn(1, 3, TINY["img_size"], TINY["img_size"])
    encoder = _encoders()["dense"]
    with torch.no_grad():
        reference = set_attention_backend(encoder, "sdpa")(x)
        with torch.autocast("cpu", torch.bfloat16):
            out = set_attention_backend(encoder, "folded")(x).float()
    cos = torch.nn.functional.cosine_similarity(out.flatten(1), reference.flatten(1)).min()
    assert cos > 0.99, cos


def test_flex_without_compile_refuses_training_and_unknown_backends_are_named():
    encoder = set_attention_backend(_encoders()["dense"].train(), "flex")
    with pytest.raises(RuntimeError, match="no backward pass; train with backend 'sdpa' or 'folded'"):
        encoder(torch.randn(1, 3, TINY["img_size"], TINY["img_size"]))
    with pytest.raises(ValueError, match=r"unknown attention backend 'fast'; choose one of \('sdpa', 'folded', 'flex'\)"):
        set_attention_backend(encoder, "fast")
    assert ATTENTION_BACKENDS == ("sdpa", "folded", "flex")


def test_folded_big_little_block_compiles_without_graph_breaks():
    encoder = set_attention_backend(_encoders()["b+t"], "folded")
    block, predictor = encoder.blocks[1], encoder.predictors["1"]

    def step(x):
        return block(x, (16, 16), select_windowed(predictor(x), (16, 16), 8, 0.25))

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 256, TINY["embed_dim"])
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), step(x))


@pytest.mark.heavy
def test_flex_backend_under_torch_compile():
    """The path blvit-bench --compile takes (static shapes): the compiled encoder matches SDPA."""
    encoder = _encoders()["dense"]
    x = torch.randn(2, 3, TINY["img_size"], TINY["img_size"])
    torch._dynamo.reset()
    with torch.no_grad():
        reference = set_attention_backend(encoder, "sdpa")(x)
        out = torch.compile(set_attention_backend(encoder, "flex"), dynamic=False)(x)
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)


def test_bf16_autocast_keeps_every_attention_input_in_bf16(monkeypatch):
    """Under autocast the windowed layers' q/k/v stay bf16: a float32 bias added after the bf16
    projection used to promote them (a float32 copy of q/k/v per windowed layer on GPUs)."""
    import torch.nn.functional as F

    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    x = torch.randn(1, 3, TINY["img_size"], TINY["img_size"])
    for encoder in _encoders().values():
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
            set_attention_backend(encoder, "sdpa")(x)
    assert len(seen) >= 4
    assert all(dtypes == (torch.bfloat16,) * 3 for dtypes in seen), seen
