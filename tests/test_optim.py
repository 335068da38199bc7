"""Muon + AdamW (``train.optimizer=muon``): the update is PyTorch's Muon, the split and the
scheduler reach both halves, and the state round-trips."""
import pytest
import torch
import torch.nn as nn

from blvit.train.optim import Muon, MuonWithAdamW, muon_parameters, orthogonalize


def _matrices(seed=0):
    torch.manual_seed(seed)
    # tall, wide, square twice (one batched group) and a narrow output layer
    return [torch.randn(shape, requires_grad=True) for shape in [(64, 192), (192, 64), (64, 64), (64, 64), (8, 64)]]


def _steps(optimizer, params, grads):
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        optimizer.step()


def test_batched_muon_is_pytorchs_muon():
    ours, theirs, fp32 = _matrices(), _matrices(), _matrices()
    torch.manual_seed(1)
    grads = [[torch.randn_like(p) for p in ours] for _ in range(3)]
    _steps(Muon(ours, lr=0.01, weight_decay=0.05, ns_dtype=torch.bfloat16), ours, grads)
    _steps(torch.optim.Muon(theirs, lr=0.01, weight_decay=0.05, adjust_lr_fn="match_rms_adamw"), theirs, grads)
    _steps(Muon(fp32, lr=0.01, weight_decay=0.05), fp32, grads)  # float32 iterations on a CPU
    start = _matrices()
    for a, b, c, p0 in zip(ours, theirs, fp32, start):
        assert (b - p0).abs().mean() > 2e-3  # the three steps moved the weights (by 0.0034 on average)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)  # the same bf16 arithmetic, batched
        torch.testing.assert_close(c, b, rtol=0, atol=3e-4)  # float32 differs by bf16 rounding only (2e-4)


def test_orthogonalize_flattens_the_spectrum():
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(3, 32, 32))
    v, _ = torch.linalg.qr(torch.randn(3, 96, 32))
    x = u @ torch.diag(torch.logspace(-2, 0, 32)) @ v.transpose(1, 2)  # (3, 32, 96), condition number 100
    s = torch.linalg.svdvals(orthogonalize(x, dtype=torch.float32))
    # Muon's quintic iteration does not converge to 1 but to a band around it (about 0.7-1.2)
    assert s.max() < 1.25 and s.min() > 0.6, (s.min(), s.max())
    t = torch.linalg.svdvals(orthogonalize(x.transpose(1, 2), dtype=torch.float32))  # tall: the same
    torch.testing.assert_close(s, t, rtol=1e-4, atol=1e-5)


def test_split_gives_linear_matrices_to_muon_and_the_rest_to_adamw():
    from blvit.train.config import load_config
    from sam_adapter.trainer import build_models

    sam, _ = build_models(load_config("configs/sam/quickstart_teacher.yaml", []))
    muon, adamw = muon_parameters(sam)
    linear = {id(m.weight) for m in sam.modules() if isinstance(m, nn.Linear) and min(m.weight.shape) > 1}
    trainable = [p for p in sam.parameters() if p.requires_grad]
    assert {id(p) for p in muon} == linear and len(muon) + len(adamw) == len(trainable)
    assert not {id(p) for p in muon} & {id(p) for p in adamw}
    names = {id(p): n for n, p in sam.named_parameters()}
    kept = [names[id(p)] for p in adamw]
    # convolutions, embeddings, biases, norms, position tables stay with AdamW
    assert "image_encoder.patch_embed.proj.weight" in kept and "image_encoder.pos_embed" in kept
    assert "mask_decoder.mask_tokens.weight" in kept and any(n.endswith("rel_pos_h") for n in kept)
    assert all(p.dim() == 2 for p in muon)


def test_scheduler_scales_both_halves_and_the_state_round_trips():
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    muon, adamw = muon_parameters(model)
    assert len(muon) == 2 and len(adamw) == 4
    opt = MuonWithAdamW(muon, adamw, lr=1e-3, muon_lr=1e-2, weight_decay=0.05, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
    x = torch.randn(32, 8)
    for _ in range(3):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    assert [g["lr"] for g in opt.muon.param_groups] == [pytest.approx(1e-2 / 8)]
    assert [g["lr"] for g in opt.adamw.param_groups] == [pytest.approx(1e-3 / 8)]
    assert opt.adamw.param_groups[0]["betas"] == (0.9, 0.95)
    state = opt.state_dict()
    again = MuonWithAdamW(muon, adamw, lr=1e-3, muon_lr=1e-2, weight_decay=0.05)
    again.load_state_dict(state)
    assert [g["lr"] for g in again.param_groups] == [pytest.approx(1e-2 / 8), pytest.approx(1e-3 / 8)]
    assert again.param_groups[0] is again.muon.param_groups[0]  # the scheduler still reaches them
    torch.testing.assert_close(again.muon.state[muon[0]]["momentum_buffer"], opt.muon.state[muon[0]]["momentum_buffer"])
    with pytest.raises(ValueError, match="another train.optimizer"):
        again.load_state_dict(torch.optim.AdamW(model.parameters()).state_dict())


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "blvit_base_tiny_patch16_224", "vim_tiny_patch16_224"])
def test_weight_decay_groups_are_timms(name):
    """Biases, norms, gates and no_weight_decay() names (position tables, class tokens, Vim's A_log
    and D) without weight decay: the same groups as timm's param_groups_weight_decay, which DeiT
    and Vim train with; nested models (a task's wrapper) keep their own no_weight_decay()."""
    import timm
    from timm.optim import param_groups_weight_decay

    import blvit  # noqa: F401  (registers the models)
    from blvit.train.optim import weight_decay_groups

    model = timm.create_model(name, num_classes=10)
    ours = weight_decay_groups(model, model.parameters(), 0.05)
    theirs = param_groups_weight_decay(model, weight_decay=0.05, no_weight_decay_list=model.no_weight_decay())
    assert [g["weight_decay"] for g in ours] == [g["weight_decay"] for g in theirs] == [0.0, 0.05]
    for a, b in zip(ours, theirs):
        assert [id(p) for p in a["params"]] == [id(p) for p in b["params"]]
    wrapped = nn.ModuleDict({"model": model})
    again = weight_decay_groups(wrapped, wrapped.parameters(), 0.05)
    assert [[id(p) for p in g["params"]] for g in again] == [[id(p) for p in g["params"]] for g in ours]
    undecayed = {n for n, p in model.named_parameters() if id(p) in {id(q) for q in ours[0]["params"]}}
    assert "pos_embed" in undecayed and "cls_token" in undecayed


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_training_runs_take_the_weight_decay_groups(tmp_path, optimizer):
    """tools/train.py's optimizer: AdamW (or Muon's AdamW half) in the two groups; resuming a
    checkpoint whose optimizer had one group is refused with the reason."""
    from blvit.data.synthetic import write_sa1b
    from blvit.train.config import load_config
    from blvit.utils.io import CheckpointError
    from sam_adapter.trainer import train

    write_sa1b(tmp_path / "data", 4, seed=0)
    cfg = load_config("configs/sam/quickstart_teacher.yaml", [
        f"data.root={tmp_path / 'data'}", "data.val_root=null", "train.max_steps=1", "train.batch_size=2",
        f"train.optimizer={optimizer}", "train.weight_decay=0.1", f"output_dir={tmp_path / 'run'}"])
    summary = train(cfg)
    ckpt = tmp_path / "run/checkpoints" / (tmp_path / "run/checkpoints/latest.txt").read_text().strip()
    saved = torch.load(ckpt, weights_only=False)
    state = saved["train_state"]["optimizer"]
    adamw = state["adamw"] if optimizer == "muon" else state
    assert [g["weight_decay"] for g in adamw["param_groups"]] == [0.0, 0.1]
    assert summary["steps"] == 1
    # a checkpoint of the single-group era cannot resume its optimizer: a clear error, not a crash deep in torch
    adamw["param_groups"] = [dict(adamw["param_groups"][1], params=sum((g["params"] for g in adamw["param_groups"]), []))]
    torch.save(saved, ckpt)
    cfg["train"]["max_steps"] = 2
    with pytest.raises(CheckpointError, match="parameter groups"):
        train(cfg, resume=True)
