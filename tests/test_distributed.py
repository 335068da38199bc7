"""torchrun on CPU (gloo): DDP and fairscale's sharded optimizer follow the single-process run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from blvit.data.sa1b import find_samples
from blvit.data.synthetic import write_sa1b
from blvit.train.config import load_config
from sam_adapter.trainer import train

ROOT = Path(__file__).resolve().parents[1]
QUICK = str(ROOT / "configs/sam/quickstart.yaml")
STEPS = 3


def _losses(out_dir: Path):
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def _torchrun_train(config: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """tools/train.py over two gloo processes of one thread each; asserts that it succeeded."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tools/train.py"), "--config", config, *args]
    result = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.heavy
@pytest.mark.parametrize("optimizer", ["adamw", "oss", "muon"])
def test_two_process_training_matches_one_process(tmp_path, optimizer):
    data = tmp_path / "data"
    write_sa1b(data, 8, seed=0)
    common = [f"data.root={data}", f"train.max_steps={STEPS}", "train.epochs=1", "data.workers=0", "train.grad_clip=1.0", "data.val_root=null"]
    alone = "muon" if optimizer == "muon" else "adamw"  # oss is AdamW with its state sharded
    single = train(load_config(QUICK, common + ["train.batch_size=4", f"output_dir={tmp_path / 'one'}",
                                                f"train.optimizer={alone}"]))
    assert single["steps"] == STEPS
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tools/train.py"), "--config", QUICK, *common, "train.batch_size=2",
           f"train.optimizer={optimizer}", f"output_dir={tmp_path / 'two'}"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == STEPS
    assert one[-1] < one[0]  # it does train
    for a, b in zip(one, two):
        assert abs(a - b) <= 1e-4 * abs(a), (optimizer, one, two)
    # the checkpoint of the sharded run holds the whole (consolidated) optimiser state
    import torch

    latest = (tmp_path / "two/checkpoints/latest.txt").read_text().strip()
    state = torch.load(tmp_path / "two/checkpoints" / latest, weights_only=False)["train_state"]["optimizer"]
    assert len((state["muon"] if optimizer == "muon" else state)["state"]) > 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.heavy
def test_two_nodes_by_c10d_rendezvous_match_one_process_and_only_global_rank_0_writes(tmp_path):
    """Two torchrun launchers on this machine as two "nodes" (c10d rendezvous on 127.0.0.1,
    gloo, one process each): the same losses as one process with the whole batch, which they can
    only give if the two ranks' samples together are that batch (split without overlap); one
    node's output folder gets everything, the other nothing (only global rank 0 writes)."""
    data = tmp_path / "data"
    write_sa1b(data, 8, seed=0)
    common = [f"data.root={data}", f"train.max_steps={STEPS}", "train.epochs=1", "data.workers=0", "train.grad_clip=1.0",
              "data.val_root=null"]
    train(load_config(QUICK, common + ["train.batch_size=4", f"output_dir={tmp_path / 'one'}"]))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    port = _free_port()
    launchers = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
         "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "blvit-two-nodes",
         str(ROOT / "tools/train.py"), "--config", QUICK, *common, "train.batch_size=2",
         f"output_dir={tmp_path / f'node{node}'}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for node in (0, 1)]
    outputs = [p.communicate(timeout=600) for p in launchers]
    for p, (_, err) in zip(launchers, outputs):
        assert p.returncode == 0, err[-3000:]
    written = [d for d in (tmp_path / "node0", tmp_path / "node1") if d.exists() and any(d.rglob("*"))]
    assert len(written) == 1, [list(d.rglob("*")) for d in written]
    out = written[0]
    assert (out / "metrics.jsonl").is_file() and (out / "checkpoints/best.pth").is_file()
    one, two = _losses(tmp_path / "one"), _losses(out)
    assert len(one) == len(two) == STEPS
    for a, b in zip(one, two):
        assert abs(a - b) <= 1e-4 * abs(a), (one, two)


@pytest.mark.heavy
def test_sigterm_saves_a_checkpoint_that_resume_continues(tmp_path):
    """A scheduler's SIGTERM (Slurm preemption): the step in progress finishes, a checkpoint is
    written, the process exits 143 saying so, and --resume continues from that step."""
    import signal
    import time

    data = tmp_path / "data"
    write_sa1b(data, 8, seed=0)
    out = tmp_path / "run"
    args = [sys.executable, str(ROOT / "tools/train.py"), "--config", QUICK, f"data.root={data}", "data.val_root=null",
            "data.workers=0", "train.batch_size=2", "train.max_steps=400", "train.epochs=100", f"output_dir={out}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not metrics.is_file() or len(_losses(out)) < 2):
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-2000:]
    assert "SIGTERM: stopped at step" in err and "continue with --resume" in err
    step = int(err.split("SIGTERM: stopped at step ")[1].split(";")[0])
    assert (out / f"checkpoints/step_{step}.pth").is_file()
    assert (out / "checkpoints/latest.txt").read_text().strip() == f"step_{step}.pth"
    resumed = subprocess.run(args[:-3] + [f"train.max_steps={step + 2}", "train.epochs=100", f"output_dir={out}",
                                          "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if "loss" in json.loads(line)]
    assert steps == list(range(1, step + 3))  # no step lost, none repeated


@pytest.mark.heavy
def test_elastic_resume_four_processes_to_two_keeps_the_global_batch_and_the_samples(tmp_path):
    """Saved at 4 processes (batch 1), resumed at 2 (batch 1, 2 accumulated: the same global
    batch of 4): every step's loss matches an uninterrupted one-process run at batch 4 (the same
    samples per step; tolerance 1e-4 relative, float summation order); another global batch is
    refused with the setting to use."""
    data = tmp_path / "data"
    write_sa1b(data, 16, seed=0)
    common = [f"data.root={data}", "train.epochs=1", "data.workers=0", "train.grad_clip=1.0", "data.val_root=null",
              "train.global_batch=4"]
    train(load_config(QUICK, common + ["train.batch_size=4", "train.max_steps=4", f"output_dir={tmp_path / 'one'}"]))
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def torchrun(procs, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
               str(ROOT / "tools/train.py"), "--config", QUICK, *common, "train.batch_size=1",
               f"output_dir={tmp_path / 'elastic'}", *extra]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)

    first = torchrun(4, "train.max_steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    second = torchrun(2, "train.max_steps=4", "--resume")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "elastic resume: 4 -> 2 processes" in second.stderr
    one, elastic = _losses(tmp_path / "one"), _losses(tmp_path / "elastic")
    assert len(one) == len(elastic) == 4
    for a, b in zip(one, elastic):
        assert abs(a - b) <= 1e-4 * abs(a), (one, elastic)
    # one process with a global batch of 2 (1 x 2 accumulated): refused, naming the setting to use
    refused = subprocess.run([sys.executable, str(ROOT / "tools/train.py"), "--config", QUICK, *common,
                              "train.batch_size=1", "train.global_batch=2", "train.max_steps=5",
                              f"output_dir={tmp_path / 'elastic'}", "--resume"],
                             env=env, capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and "set train.global_batch=4" in refused.stderr, refused.stderr[-2000:]


@pytest.mark.heavy
def test_fsdp_matches_ddp_resumes_exactly_and_consolidates(tmp_path):
    """train.strategy=fsdp (PyTorch's fully_shard per block) on 2 gloo processes: the losses of
    DDP; saved sharded at step 2 (torch.distributed.checkpoint) and resumed to step 4: bit for
    bit the uninterrupted FSDP run (losses and weights), DDP's losses within 1e-5 and,
    consolidated by blvit-consolidate, DDP's weights; best.pth is whole."""
    import torch

    from blvit_apps.consolidate import main as consolidate
    from sam_adapter.build import build_sam_from_checkpoint

    data = tmp_path / "data"
    write_sa1b(data, 8, seed=0)
    common = [f"data.root={data}", "train.epochs=2", "data.workers=0", "train.grad_clip=1.0", "data.val_root=null",
              "train.batch_size=2", "train.save_every=2", "train.optimizer=adamw"]  # fsdp shards AdamW only
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def torchrun(out, *extra):
        return _torchrun_train(QUICK, *common, f"output_dir={tmp_path / out}", *extra)

    torchrun("ddp", "train.max_steps=4")
    torchrun("fsdp_straight", "train.max_steps=4", "train.strategy=fsdp")
    torchrun("fsdp", "train.max_steps=2", "train.strategy=fsdp")
    ckpts = tmp_path / "fsdp/checkpoints"
    assert (ckpts / "step_2.dcp/.metadata").is_file()
    assert "model" not in torch.load(ckpts / "step_2.pth", weights_only=False)  # weights are in the folder
    torchrun("fsdp", "train.max_steps=4", "train.strategy=fsdp", "--resume")
    ddp, fsdp = _losses(tmp_path / "ddp"), _losses(tmp_path / "fsdp")
    assert len(ddp) == len(fsdp) == 4
    for a, b in zip(ddp, fsdp):
        assert abs(a - b) <= 1e-5 * abs(a), (ddp, fsdp)
    # resume is bit-exact: the same losses and weights as the uninterrupted FSDP run
    assert fsdp == _losses(tmp_path / "fsdp_straight")
    consolidate([str(ckpts / "step_4.pth"), "--out", str(tmp_path / "whole.pth")])
    whole = torch.load(tmp_path / "whole.pth", weights_only=False)["model"]
    consolidate([str(tmp_path / "fsdp_straight/checkpoints/step_4.pth"), "--out", str(tmp_path / "straight.pth")])
    straight = torch.load(tmp_path / "straight.pth", weights_only=False)["model"]
    assert all(torch.equal(whole[k], straight[k]) for k in straight)
    reference = torch.load(tmp_path / "ddp/checkpoints/step_4.pth", weights_only=False)["model"]
    assert set(whole) == set(reference)
    for key, value in reference.items():
        assert whole[key].shape == value.shape, key
        torch.testing.assert_close(whole[key], value, atol=1e-5, rtol=1e-4)
    from eval.sam_eval import load_sam_model

    for path in (tmp_path / "whole.pth", ckpts / "best.pth"):  # what blvit-eval / the demo do with them
        sam, info = load_sam_model("b+t", str(path))
        assert info["layout"] == "b+t"
        build_sam_from_checkpoint(path)
    # a sharded checkpoint resumed without fsdp: refused, saying what to do
    cmd = [sys.executable, str(ROOT / "tools/train.py"), "--config", QUICK, *common, "train.max_steps=6",
           f"output_dir={tmp_path / 'fsdp'}", "--resume"]
    refused = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert refused.returncode != 0 and "train.strategy=fsdp" in refused.stderr, refused.stderr[-2000:]


@pytest.mark.heavy(seconds=25)
def test_quickstart_launcher_trains_over_two_processes_as_in_one(tmp_path):
    """blvit-quickstart trains through torchrun (one CPU share per process); it splits the
    recipe's batch over the processes, so two give the one-process losses, and the summary comes
    back from the run's summary.json."""
    from blvit_apps.quickstart import _train

    data = tmp_path / "data"
    write_sa1b(data, 8, seed=0)
    common = [f"data.root={data}", f"train.max_steps={STEPS}", "data.workers=0", "data.val_root=null"]
    one = _train(Path(QUICK), common + [f"output_dir={tmp_path / 'one'}"], processes=1)
    two = _train(Path(QUICK), common + [f"output_dir={tmp_path / 'two'}"], processes=2)
    assert one["steps"] == two["steps"] == STEPS and Path(two["best_checkpoint"]).exists()
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert a[-1] < a[0]
    assert b == pytest.approx(a, rel=1e-4)


@pytest.mark.heavy
def test_ranks_whose_batches_draw_different_prompt_kinds_train_as_one_process(tmp_path):
    """SAM training with a trainable prompt encoder over two DDP ranks of one single-mask image
    each, box or point first at even odds and no click rounds: at most steps one rank's batch has
    no box (its box-corner embeddings get no gradient there) while the other's has one. DDP stopped
    at the second such step ("Expected to have finished reduction ..."), and so did fairscale's
    ShardedDDP and FSDP; now every trainable parameter takes part in every step, the run gives the
    one-process losses, and the mask-prompt path, which no round feeds, stays as it was."""
    data = tmp_path / "data"
    write_sa1b(data, 8, seed=0)
    teacher = str(ROOT / "configs/sam/quickstart_teacher.yaml")
    steps = 6
    common = [f"data.root={data}", f"train.max_steps={steps}", "train.epochs=2", "data.workers=0",
              "data.val_root=null", "data.max_masks=1", "data.box_fraction=0.5", "loss.click_rounds=0",
              "train.optimizer=adamw"]
    train(load_config(teacher, common + ["train.batch_size=2", f"output_dir={tmp_path / 'one'}"]))
    _torchrun_train(teacher, *common, "train.batch_size=1", f"output_dir={tmp_path / 'two'}")
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == steps
    assert two == pytest.approx(one, rel=1e-4)

    import torch
    from sam_adapter.build import build_sam_blvit

    latest = (tmp_path / "two/checkpoints/latest.txt").read_text().strip()
    trained = torch.load(tmp_path / "two/checkpoints" / latest, weights_only=False)["model"]
    cfg = load_config(teacher, common)
    torch.manual_seed(cfg["seed"])
    start = build_sam_blvit(cfg["model"]["variant"], keep_ratio=1.0, prompt_pe_scale=0.5,
                            **cfg["model"]["overrides"]).state_dict()
    downscaling = [k for k in trained if k.startswith("prompt_encoder.mask_downscaling.")]
    assert downscaling and all(torch.equal(trained[k], start[k]) for k in downscaling)
    assert not torch.equal(trained["prompt_encoder.point_embeddings.2.weight"],
                           start["prompt_encoder.point_embeddings.2.weight"])


@pytest.mark.heavy
def test_a_batch_one_rank_cannot_use_is_skipped_by_every_rank(tmp_path):
    """Two ranks of one image each, one image of the epoch unreadable: the rank holding it has
    nothing to train on at that step. It used to sit the step out alone, so its peer's gradients
    were averaged with those of its next batch and the ranks' step counts parted; now both skip
    that step together, and the log counts the bad sample of either rank."""
    from torch.utils.data import DistributedSampler

    data = tmp_path / "data"
    write_sa1b(data, 8, seed=0)
    refs = find_samples(data)
    # the image rank 1 reads second in epoch 0 (rank 0, which logs, has all its images)
    order = list(DistributedSampler(range(len(refs)), num_replicas=2, rank=1, shuffle=True, seed=0, drop_last=True))
    Path(refs[order[1]].image[0]).write_bytes(b"not a jpeg")
    _torchrun_train(QUICK, f"data.root={data}", "train.epochs=1", "data.workers=0", "data.val_root=null",
                    "train.batch_size=1", f"output_dir={tmp_path / 'two'}")
    rows = [json.loads(line) for line in (tmp_path / "two/metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    # 4 batches per rank in an epoch: 3 trained in epoch 0, the fourth step comes from epoch 1
    assert [r["epoch"] for r in steps] == [0, 0, 0, 1]
    assert steps[1]["skipped"] == 1  # rank 1's bad sample, counted in rank 0's log
    assert json.loads((tmp_path / "two/summary.json").read_text())["steps"] == 4


@pytest.mark.heavy
def test_validation_over_ranks_with_an_uneven_split_and_no_improvement(tmp_path):
    """Two FSDP ranks validate 9 images (5 and 4), one of them unreadable, after every epoch of a run
    whose score never improves (lr 0). The first validation came before any forward through
    the root and stopped the run; an epoch whose score did not improve hung rank 1 in the gather of
    best.pth's weights (only rank 0 knew the best score); and ranks running the encoder unequally
    often hang FSDP's all-gathers. Now every rank runs the same forwards and the figure counts each
    image once: the one-process figure."""
    from blvit.data.sa1b import SA1BDataset
    from blvit.train.config import load_config
    from sam_adapter.trainer import _validation_set, build_models, evaluate_box_miou

    write_sa1b(tmp_path / "data", 8, seed=0)
    write_sa1b(tmp_path / "val", 9, seed=5)
    Path(find_samples(tmp_path / "val")[4].image[0]).write_bytes(b"not a jpeg")
    common = [f"data.root={tmp_path / 'data'}", f"data.val_root={tmp_path / 'val'}", "data.workers=0",
              "train.optimizer=adamw", "train.lr=0", "train.epochs=3", "train.batch_size=2"]
    _torchrun_train(QUICK, *common, "train.strategy=fsdp", f"output_dir={tmp_path / 'run'}", timeout=300)
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    scores = [r for r in rows if "val_box_miou" in r]
    assert [(r["step"], r["epoch"]) for r in scores] == [(0, 0), (2, 0), (4, 1), (6, 2)]
    cfg = load_config(QUICK, common + [f"output_dir={tmp_path / 'one'}"])
    import torch

    torch.manual_seed(cfg["seed"])
    student, _ = build_models(cfg)
    with pytest.warns(UserWarning, match="not a jpeg|unreadable|corrupt"):
        alone = evaluate_box_miou(student, _validation_set(cfg, 256, 64, False), torch.device("cpu"), amp=False)
    assert isinstance(_validation_set(cfg, 256, 64, False), SA1BDataset)
    for r in scores:
        assert r["val_masks"] == alone["val_masks"]
        assert r["val_box_miou"] == pytest.approx(alone["val_box_miou"], abs=1e-6)


@pytest.mark.heavy
def test_two_ranks_resume_their_own_random_streams(tmp_path):
    """Each rank draws its own corrective clicks from the global generator; the checkpoint keeps
    every rank's random state (it kept rank 0's and gave it to all), so a two-process run resumed
    mid-epoch gives the uninterrupted run's losses exactly."""
    import shutil

    write_sa1b(tmp_path / "data", 8, seed=0)
    teacher = str(ROOT / "configs/sam/quickstart_teacher.yaml")
    common = [f"data.root={tmp_path / 'data'}", "data.val_root=null", "data.workers=0", "train.epochs=2",
              "train.batch_size=1", "train.save_every=1", "loss.click_rounds=1", "loss.refine_rounds=1",
              "data.max_masks=8", "train.optimizer=adamw", "train.keep_last=10"]

    def torchrun(out, *extra):
        _torchrun_train(teacher, *common, f"output_dir={tmp_path / out}", *extra)

    torchrun("full")
    (tmp_path / "part/checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "full/checkpoints/step_2.pth", tmp_path / "part/checkpoints/step_2.pth")
    (tmp_path / "part/checkpoints/latest.txt").write_text("step_2.pth")
    torchrun("part", "--resume")
    full, part = _losses(tmp_path / "full"), _losses(tmp_path / "part")
    assert len(full) == 8 and part == full[2:]
