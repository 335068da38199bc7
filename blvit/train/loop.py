"""The training loop every task shares (SAM distillation, ImageNet, token-merging re-training).

A task supplies a :class:`Task`: the trainable module, the dataset, a ``losses(batch)`` function
and optionally a validation. This module owns everything else, once: process groups (torchrun,
DDP with NCCL or gloo, or fairscale's OSS + ShardedDataParallel), AdamW (or Muon on the weight
matrices, ``blvit.train.optim``) with warm-up + cosine,
gradient accumulation and clipping, bf16 autocast, EMA, the JSON-lines / TensorBoard log, the
tqdm bar, atomic checkpoints (last N and best) and exact resume (model, optimiser, scheduler,
EMA, RNG states and the position inside the epoch).
"""
import contextlib
import io
from functools import partial
import json
import logging
import math
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from tqdm import tqdm

from blvit.train.optim import MuonWithAdamW, muon_parameters, weight_decay_groups
from blvit.utils.io import CheckpointError, atomic_save, atomic_write_text, read_checkpoint

logger = logging.getLogger("blvit.train")


def uses_bf16(train_cfg: Dict[str, Any], device: torch.device) -> bool:
    """Whether ``train.amp`` asks for bf16 autocast on ``device`` ("auto": on CUDA only)."""
    amp = train_cfg["amp"]
    return (amp if amp != "auto" else ("bf16" if device.type == "cuda" else "none")) == "bf16"


def dist_info() -> Tuple[int, int, torch.device]:
    """(world size, rank, device); joins the process group that torchrun describes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = torch_dist.get_rank() if world > 1 else 0
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return world, rank, device


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def lr_lambda(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """Linear warm-up over ``warmup`` steps, then cosine from 1 down to ``min_ratio``."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def rng_state() -> Dict[str, Any]:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].copy())] + list(np_state[2:])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np_state[1].numpy(), *np_state[2:]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def accumulation_steps(t: Dict[str, Any], world: int) -> int:
    """``train.accumulate``, or what ``train.global_batch`` implies for this many processes."""
    if not t.get("global_batch"):
        return int(t["accumulate"])
    per_step = t["batch_size"] * world
    if t["global_batch"] % per_step:
        raise ValueError(f"train.global_batch={t['global_batch']} is not a multiple of train.batch_size x processes "
                         f"= {t['batch_size']} x {world}")
    return t["global_batch"] // per_step


class MetricsLog:
    """``metrics.jsonl`` (always) and TensorBoard scalars (optional), written by rank 0."""

    def __init__(self, out_dir: Path, tensorboard: bool, rank: int) -> None:
        self.path, self.rank, self.writer = Path(out_dir) / "metrics.jsonl", rank, None
        if tensorboard and rank == 0:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ImportError("train.tensorboard=true needs the tensorboard package: pip install tensorboard") from err
            self.writer = SummaryWriter(str(Path(out_dir) / "tensorboard"))

    def write(self, record: Dict[str, Any]) -> None:
        if self.rank != 0:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: Path) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()] if Path(path).exists() else []


def last_record(path: Path, key: str) -> Dict[str, Any]:
    """The last record of a metrics.jsonl that has ``key``."""
    rows = [r for r in read_metrics(path) if key in r]
    return rows[-1] if rows else {}


def plot_losses(metrics_path: Path, png: Path, loss_keys: Tuple[str, ...], score_key: Optional[str]) -> None:
    """Training losses (log scale) and the validation score (right axis) against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    rows = [r for r in records if "loss" in r]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in loss_keys:
        if key in rows[0]:
            ax.plot([r["step"] for r in rows], [r[key] for r in rows], label=key)
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.legend(loc="lower left")
    val = [r for r in records if score_key and score_key in r]
    if val:
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in val], [r[score_key] for r in val], "k.--", label=score_key)
        ax2.set_ylabel(score_key)
        ax2.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    plt.close(fig)


@contextlib.contextmanager
def averaged_weights(ema: Optional[torch.optim.swa_utils.AveragedModel], target: nn.Module):
    """Within the block ``target`` holds the EMA's weights (nothing changes without an EMA);
    its own weights come back after, bit for bit."""
    if ema is None:
        yield
        return
    own = {k: v.detach().clone() for k, v in target.state_dict().items()}
    target.load_state_dict(ema.module.state_dict())
    try:
        yield
    finally:
        target.load_state_dict(own)


@dataclass
class Task:
    """What a task gives the loop.

    Attributes:
        module: the trainable ``nn.Module``; ``losses(module_or_wrapper, batch)`` is called with
            the DDP wrapper, so it must call the wrapper (``model(batch)``) for the forward pass.
        dataset: map-style; items are dicts of tensors or ``None`` (a skipped bad sample).
        collate: turns a list of items into a batch dict with a ``skipped`` count.
        losses: (model, batch on device) -> dict of scalar tensors with a ``loss`` entry.
        validate: () -> dict with ``score_key`` (higher is better), or None (best by -loss).
        payload: () -> the model part of a checkpoint (a loadable model file of its own kind).
        load: (checkpoint dict, path) -> restores the model from a checkpoint of ``payload``.
        ema_module: the module EMA averages (default ``module``).
        set_epoch: called with the epoch before each epoch (reseeds augmentation).
    """

    module: nn.Module
    dataset: Dataset
    collate: Callable[[List[Any]], Dict[str, Any]]
    losses: Callable[[nn.Module, Dict[str, Any]], Dict[str, torch.Tensor]]
    payload: Callable[[], Dict[str, Any]]
    load: Callable[[Dict[str, Any], Path], None]
    validate: Optional[Callable[[], Dict[str, float]]] = None
    score_key: Optional[str] = None
    ema_module: Optional[nn.Module] = None
    set_epoch: Optional[Callable[[int], None]] = None
    # (dataset, world, rank, seed) -> a sampler with set_epoch whose order depends only on the
    # epoch (exact resume); default DistributedSampler (shuffled, drop_last)
    make_sampler: Optional[Callable[[Dataset, int, int, int], Any]] = None
    loss_keys: Tuple[str, ...] = ("loss",)
    extra_summary: Dict[str, Any] = field(default_factory=dict)


STRATEGIES = ("ddp", "fsdp")


def shard_fully(module: nn.Module, device: torch.device, amp: bool) -> nn.Module:
    """PyTorch's FSDP (``fully_shard``): one unit per transformer block (every element of a
    ``blocks`` ModuleList), then the rest at the root; bf16 compute with fp32 gradient reduction
    when ``amp`` (GPU). Parameters become DTensors sharded over the ranks."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if amp else MixedPrecisionPolicy()
    # fully_shard cannot shard 0-dim parameters (bLViT's gammas): view them as (1,), the same
    # arithmetic by broadcasting; checkpoints give them back their own shape (scalar_parameter_keys)
    scalars = []
    for owner_name, owner in module.named_modules():
        for name, param in list(owner.named_parameters(recurse=False)):
            if param.dim() == 0:
                setattr(owner, name, nn.Parameter(param.detach().reshape(1), requires_grad=param.requires_grad))
                scalars.append(f"{owner_name}.{name}" if owner_name else name)
    module.fsdp_scalar_parameters = scalars
    units = [child for name, m in module.named_modules() if name.split(".")[-1] == "blocks" and isinstance(m, nn.ModuleList)
             for child in m]
    for unit in units:
        fully_shard(unit, mp_policy=policy)
    # the root holds the rest (patch embedding, neck, prompt encoder, decoder); it gathers them in
    # its own forward, so code that calls parts directly (validation) runs under run()'s unshard()
    fully_shard(module, mp_policy=policy)
    return module


def _wrap(task: Task, t: Dict[str, Any], world: int, device: torch.device):
    strategy = t["strategy"]
    betas = tuple(float(b) for b in t["betas"])
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ValueError(f"train.betas must be two numbers in [0, 1) (AdamW's beta1, beta2), got {t['betas']}")
    adamw = dict(lr=t["lr"], weight_decay=t["weight_decay"], betas=betas)  # every path below builds AdamW
    # timm's (DeiT's, Vim's) convention: biases, norms, gates and no_weight_decay() names undecayed
    grouped = partial(weight_decay_groups, task.module, weight_decay=t["weight_decay"])
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown train.strategy {strategy!r}; choose one of {STRATEGIES} (fairscale's sharded "
                         "optimizer is train.optimizer=oss with ddp)")
    if strategy == "fsdp":
        if t["optimizer"] != "adamw":
            raise ValueError("train.strategy=fsdp shards the optimizer state itself: use train.optimizer=adamw")
        if t["ema_decay"]:
            raise ValueError("train.ema_decay is not supported with train.strategy=fsdp (the average would be sharded)")
        if world == 1:
            logger.info("train.strategy=fsdp in a single process: nothing to shard, plain training")
        else:
            shard_fully(task.module, device, uses_bf16(t, device))
            params = [p for p in task.module.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(grouped(params), **adamw)
            return task.module, optimizer, "fsdp", params
    params = [p for p in task.module.parameters() if p.requires_grad]
    name = t["optimizer"]
    if name == "oss" and world == 1:
        logger.info("train.optimizer=oss in a single process: nothing to shard, using plain AdamW")
        name = "adamw"
    if name == "oss":
        from fairscale.nn.data_parallel import ShardedDataParallel
        from fairscale.optim.oss import OSS

        optimizer = OSS(grouped(params), optim=torch.optim.AdamW, **adamw)
        model = ShardedDataParallel(task.module, optimizer)
    elif name in ("adamw", "muon"):
        if name == "muon":
            matrices, rest = muon_parameters(task.module)
            optimizer = MuonWithAdamW(matrices, grouped(rest), muon_lr=t["lr"] if t["muon_lr"] is None else t["muon_lr"],
                                      **adamw)
        else:
            optimizer = torch.optim.AdamW(grouped(params), **adamw)
        model = task.module
        if world > 1:
            model = nn.parallel.DistributedDataParallel(
                task.module, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        raise ValueError(f"unknown optimizer {name!r}; choose adamw, muon or oss")
    return model, optimizer, name, params


class TrainingStopped(Exception):
    """SIGTERM / SIGUSR1 (a scheduler preempting the job, e.g. Slurm before its time limit) stopped
    training: every rank finished its optimizer step, a checkpoint was saved, ``--resume`` continues."""

    def __init__(self, signal_name: str, step: int, checkpoint: Path) -> None:
        super().__init__(f"{signal_name}: stopped at step {step}; saved {checkpoint}; continue with --resume")
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint


STOP_SIGNALS = ("SIGTERM", "SIGUSR1")


class _StopSignals:
    """While active, SIGTERM / SIGUSR1 only set a flag; the loop checks it after each optimizer
    step (all ranks agree through one all-reduce), saves and stops. Previous handlers come back
    afterwards. Installed in the main thread only (Python's rule for signal handlers)."""

    def __init__(self) -> None:
        self.received: Optional[str] = None
        self._previous: Dict[int, Any] = {}

    def __enter__(self) -> "_StopSignals":
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for name in STOP_SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        import signal

        self.received = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self, world: int, device: torch.device) -> Optional[str]:
        """The signal if any rank received one (a collective when ``world > 1``)."""
        if world == 1:
            return self.received
        flag = torch.tensor([1.0 if self.received else 0.0], device=device)
        torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX)
        return (self.received or "SIGTERM") if flag.item() > 0 else None


def _elastic_progress(progress: Dict[str, Any], world: int, batch_size: int, accumulate: int,
                      path: Path) -> Dict[str, Any]:
    """A checkpoint's progress for a run with ``world`` processes (elastic resume).

    The epoch's order is one permutation of the samples whatever the number of processes
    (``DistributedSampler``: rank r takes every world-th index), so with the same global batch
    (``batch_size x processes x accumulate``) every optimizer step sees the same samples: only
    the position in the epoch, counted in per-process batches, is converted. Another global batch
    is refused. Not exact across world sizes: per-process random streams (augmentation, dropout)
    and ``data.repeated_aug``'s order, which depends on the number of processes.
    """
    state = {k: progress[k] for k in ("step", "epoch", "batch_in_epoch", "best")}
    old_world = int(progress.get("world", world))
    old_batch = int(progress.get("batch_size", batch_size))
    old_accumulate = int(progress.get("accumulate", accumulate))
    if (old_world, old_batch) == (world, batch_size):
        return state
    old_global, new_global = old_batch * old_world * old_accumulate, batch_size * world * accumulate
    if old_global != new_global:
        raise ValueError(f"{path}: saved with a global batch of {old_global} ({old_batch} x {old_world} processes x "
                         f"{old_accumulate} accumulated), this run's is {new_global}; set train.global_batch={old_global} "
                         "to resume with another number of processes")
    consumed = state["batch_in_epoch"] * old_batch * old_world  # samples of this epoch already used
    if consumed % (batch_size * world):
        raise ValueError(f"{path}: {consumed} samples into the epoch is not a whole number of batches of "
                         f"{batch_size} x {world} processes")
    state["batch_in_epoch"] = consumed // (batch_size * world)
    logger.info("elastic resume: %d -> %d processes, batch %d -> %d per process, same global batch %d",
                old_world, world, old_batch, batch_size, new_global)
    return state


def _sharded_state(task: Task, optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
    """The live sharded state: the payload's weights (DTensors sharing the parameters' storage)
    and the optimizer state, keyed by parameter name."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return {"model": task.payload()["model"], "optimizer": get_optimizer_state_dict(task.module, optimizer)}


def save_sharded(task: Task, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Every rank writes its shards into ``folder`` (torch.distributed.checkpoint)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_sharded_state(task, optimizer), checkpoint_id=str(folder))


def load_sharded(task: Task, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Read a sharded checkpoint into the sharded model and optimizer, whatever the number of ranks
    that wrote it (DCP reshards on load)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    if not folder.is_dir():
        raise CheckpointError(f"{folder}: the sharded checkpoint folder is missing")
    state = _sharded_state(task, optimizer)
    dcp.load(state, checkpoint_id=str(folder))  # in place: the weights are the parameters' storage
    set_optimizer_state_dict(task.module, optimizer, state["optimizer"])


def scalar_parameter_keys(task: Task, keys: Sequence[str]) -> List[str]:
    """The payload keys of parameters that ``shard_fully`` viewed as (1,) (0-dim in the model)."""
    scalars = getattr(task.module, "fsdp_scalar_parameters", [])
    return [k for k in keys if any(name == k or name.endswith("." + k) for name in scalars)]


def consolidate_checkpoint(path: Path, out: Path) -> Dict[str, Any]:
    """One ``.pth`` with the whole weights (what eval and the demo read) from a sharded checkpoint:
    ``path`` is the ``step_N.pth`` written beside its ``step_N.dcp`` folder. Runs in one process,
    with no process group; the optimizer state is left out (resume reads the sharded folder)."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    path = Path(path)
    meta = read_checkpoint(path)
    if "sharded" not in meta:
        raise CheckpointError(f"{path}: not a sharded checkpoint (no 'sharded' entry): it is already one file")
    folder = path.parent / meta["sharded"]
    if not (folder / ".metadata").is_file():
        raise CheckpointError(f"{folder}: missing or incomplete sharded checkpoint folder (no .metadata)")
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(str(folder), str(Path(tmp) / "full.pth"))
        full = torch.load(Path(tmp) / "full.pth", map_location="cpu", weights_only=False)
    model = full["model"]
    for key in meta.get("scalar_parameters", []):
        model[key] = model[key].reshape(())
    payload = {k: v for k, v in meta.items() if k not in ("train_state", "sharded", "scalar_parameters")}
    payload["model"] = model
    payload["consolidated_from"] = {"checkpoint": str(path), "step": meta["train_state"]["progress"]["step"]}
    atomic_save(payload, out)
    return payload


def full_payload(task: Task) -> Dict[str, Any]:
    """``task.payload()`` with every sharded tensor gathered and every parameter in the model's own
    shape (a collective: call on every rank)."""
    from torch.distributed.tensor import DTensor

    payload = task.payload()
    model = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu() for k, v in payload["model"].items()}
    for key in scalar_parameter_keys(task, list(model)):
        model[key] = model[key].reshape(())
    payload["model"] = model
    return payload


def run(task: Task, cfg: Dict[str, Any], world: int, rank: int, device: torch.device, resume: bool = False) -> Dict[str, Any]:
    """Train ``task`` as ``cfg['train']`` says; returns a summary (steps, checkpoints, last figures)."""
    t = cfg["train"]
    out_dir = Path(cfg["output_dir"])
    ckpt_dir = out_dir / "checkpoints"
    accumulate = accumulation_steps(t, world)
    if int(t["keep_last"]) < 1:  # 0 would delete the checkpoint just written, leaving latest.txt pointing at nothing
        raise ValueError(f"train.keep_last={t['keep_last']}: keep at least the last checkpoint (1 or more)")
    amp = uses_bf16(t, device)
    task.module.to(device)
    model, optimizer, optimizer_name, params = _wrap(task, t, world, device)
    dataset = task.dataset
    make_sampler = task.make_sampler or (lambda ds, world, rank, seed: DistributedSampler(
        ds, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True))
    # whole accumulation windows only: a remainder would carry its gradients into the next epoch's
    # first step (drop_last at the global batch, as DistributedSampler drops at the rank's share)
    batches_per_epoch = len(make_sampler(dataset, world, rank, cfg["seed"])) // t["batch_size"] // accumulate * accumulate
    if batches_per_epoch == 0:
        raise ValueError(f"{len(dataset)} training samples, fewer than one global batch of "
                         f"{t['batch_size'] * world * accumulate}")
    total_steps = t["max_steps"] or t["epochs"] * batches_per_epoch // accumulate
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t["warmup_steps"], total_steps, t["min_lr_ratio"]))
    ema_target = task.ema_module or task.module
    ema = None
    if t["ema_decay"]:
        ema = torch.optim.swa_utils.AveragedModel(
            ema_target, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(t["ema_decay"]))

    # best: the highest validation score when the task validates, else the lowest training loss
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best": -float("inf")}
    if resume and (ckpt_dir / "latest.txt").exists():
        path = ckpt_dir / (ckpt_dir / "latest.txt").read_text().strip()
        saved = read_checkpoint(path)
        train_state = saved["train_state"]
        if "sharded" in saved:  # an FSDP checkpoint: weights and optimizer state in a DCP folder
            if optimizer_name != "fsdp":
                raise CheckpointError(f"{path}: a sharded (train.strategy=fsdp) checkpoint; resume it with "
                                      "train.strategy=fsdp, or consolidate it first (blvit-consolidate)")
            load_sharded(task, optimizer, path.parent / saved["sharded"])
        else:
            if optimizer_name == "fsdp":
                raise CheckpointError(f"{path}: a full (train.strategy=ddp) checkpoint; resume it with train.strategy=ddp")
            task.load(saved, path)
            try:
                optimizer.load_state_dict(train_state["optimizer"])
            except ValueError as err:  # torch: "... a different number of parameter groups" / sizes
                raise CheckpointError(
                    f"{path}: its optimizer state does not fit this run's parameter groups ({err}). Since 2026-12-07 "
                    "biases, norms, gates and no_weight_decay() parameters form an AdamW group without weight decay "
                    "(timm's convention), so a checkpoint of an earlier version cannot resume its optimizer; start a "
                    "run from its weights instead") from err
        scheduler.load_state_dict(train_state["scheduler"])
        if ema is not None and "ema" in train_state:
            ema.load_state_dict(train_state["ema"])
        # each rank continues its own random stream (clicks, dropout and drop path differ by rank);
        # a checkpoint of another world size (elastic resume) or of before 2026-12-07 has rank 0's only
        per_rank = train_state.get("rng_per_rank")
        set_rng_state(per_rank[rank] if per_rank is not None and len(per_rank) == world else train_state["rng"])
        state = _elastic_progress(train_state["progress"], world, t["batch_size"], accumulate, path)
        if rank == 0:
            logger.info("resumed from %s at step %d (epoch %d, batch %d)", path, state["step"], state["epoch"],
                        state["batch_in_epoch"])
    elif resume and rank == 0:
        logger.warning("--resume: no %s, starting from scratch", ckpt_dir / "latest.txt")

    def save(tag: str, score: Optional[float] = None) -> None:
        """score: higher is better, decides best.pth; None for a periodic save."""
        if optimizer_name == "oss":
            optimizer.consolidate_state_dict(recipient_rank=0)  # collective: every rank takes part
        own = rng_state()
        rng_states = [own]
        if world > 1:  # collective: every rank's random state goes into the checkpoint (as torch.save bytes:
            # tensors that all_gather_object unpickles do not torch.save back loadably)
            buffer = io.BytesIO()
            torch.save(own, buffer)
            blobs: List[Any] = [None] * world
            torch_dist.all_gather_object(blobs, buffer.getvalue())
            rng_states = [torch.load(io.BytesIO(b), weights_only=False) for b in blobs]
            rng_states[rank] = own
        is_best = score is not None and score > state["best"]
        if is_best:  # on every rank: under FSDP gathering best.pth's weights is a collective
            state["best"] = score
        sharded = None
        if optimizer_name == "fsdp":  # collectives: every rank writes its shards, gathers best.pth's weights
            sharded = f"{tag}.dcp"
            save_sharded(task, optimizer, ckpt_dir / sharded)
            full_weights = full_payload(task) if is_best else None
        if rank != 0:
            return
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        train_state = {"optimizer": None if sharded else optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                       "rng": rng_states[0], "rng_per_rank": rng_states,
                       "progress": dict(state, world=world, batch_size=t["batch_size"], accumulate=accumulate),
                       "config": cfg}
        if ema is not None:
            train_state["ema"] = ema.state_dict()
        payload = dict(task.payload(), train_state=train_state)
        if sharded:  # the .pth holds what is not sharded; the weights are in the folder beside it
            sharded_weights = payload.pop("model")
            payload.update(sharded=sharded, scalar_parameters=scalar_parameter_keys(task, list(sharded_weights)))
        name = f"{tag}.pth"
        atomic_save(payload, ckpt_dir / name)
        atomic_write_text(ckpt_dir / "latest.txt", name)
        if is_best:  # weights and config only (what eval and the demo read); resume reads the step files
            # the EMA's weights where there is one (the model that was scored); saved inside the
            # block because a state dict shares the parameters' storage
            with averaged_weights(ema, ema_target):
                weights = full_weights if sharded else task.payload()
                atomic_save(dict(weights, best={"step": state["step"], "score": score}), ckpt_dir / "best.pth")
        steps = sorted(ckpt_dir.glob("step_*.pth"), key=lambda p: int(p.stem.split("_")[1]))
        for old in steps[: max(0, len(steps) - t["keep_last"])]:
            old.unlink()
            shutil.rmtree(old.with_suffix(".dcp"), ignore_errors=True)

    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        # temporary files of saves that a kill interrupted (only this run writes here)
        for stale in ckpt_dir.glob(".*.tmp") if ckpt_dir.is_dir() else ():
            logger.info("removing %s, left by an interrupted save", stale)
            stale.unlink()
        # a resumed run redoes the steps after its checkpoint: their old records go
        metrics_path = out_dir / "metrics.jsonl"
        if metrics_path.exists():
            kept = [r for r in read_metrics(metrics_path) if r.get("step", 0) <= state["step"]]
            atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
    log = MetricsLog(out_dir, bool(t["tensorboard"]), rank)

    def validate() -> Dict[str, float]:
        if optimizer_name != "fsdp":
            return task.validate()
        # FSDP initialises its units at the root's first forward; validation calls the model's parts
        # directly (possibly before any training step), so initialise from the root first
        task.module._get_fsdp_state()._lazy_init()
        task.module.unshard()  # the root's parameters: validation calls the model's parts directly
        try:
            return task.validate()
        finally:
            task.module.reshard()

    def validate_and_save(train_loss: float, epoch: int) -> None:
        """After ``epoch`` (0-based, as the training records count it)."""
        score = -train_loss
        if task.validate is not None:
            with averaged_weights(ema, ema_target):  # with train.ema_decay the average is what is scored
                result = validate()
            log.write({"step": state["step"], "epoch": epoch, **result})
            score = result[task.score_key]
        save(f"step_{state['step']}", score)

    if task.validate is not None and state["step"] == 0:
        log.write({"step": 0, "epoch": 0, **validate()})
    bar = tqdm(total=total_steps, initial=state["step"], disable=rank != 0, desc="train")
    skipped_total, window, last_loss = 0, [], float("inf")
    done = state["step"] >= total_steps
    completed = (state["epoch"], state["batch_in_epoch"])  # where the last optimizer step left the epoch
    stop_signals = _StopSignals().__enter__()
    try:
        while not done:
            epoch = state["epoch"]
            if task.set_epoch is not None:
                task.set_epoch(epoch)
            sampler = make_sampler(dataset, world, rank, cfg["seed"])
            sampler.set_epoch(epoch)
            # the epoch's order is a pure function of (seed, epoch): a resumed run skips what it did
            indices = list(sampler)[: batches_per_epoch * t["batch_size"]]
            indices = indices[state["batch_in_epoch"] * t["batch_size"]:]
            loader = DataLoader(Subset(dataset, indices), batch_size=t["batch_size"], shuffle=False,
                                num_workers=cfg["data"]["workers"], collate_fn=task.collate, drop_last=True,
                                pin_memory=device.type == "cuda")
            usable_batches = 0
            # Starting an epoch's loader draws its worker seed from the global generator. A run
            # resumed mid-epoch restored the state saved after that draw: it draws aside, so that it
            # continues the uninterrupted run's stream (the samples are seeded by their own index).
            with torch.random.fork_rng(devices=[], enabled=state["batch_in_epoch"] > 0):
                batches = iter(loader)
            for batch in batches:
                skipped = int(batch.pop("skipped", 0))
                state["batch_in_epoch"] += 1
                usable = bool(batch)  # False: every sample of this batch was bad
                if world > 1:
                    # A rank cannot sit a batch out alone: its peers' gradients would be averaged
                    # with those of its next batch, and the ranks' step counts would part. All
                    # ranks skip the batch together (and count the bad samples of all).
                    counts = torch.tensor([int(usable), skipped], dtype=torch.int64, device=device)
                    torch_dist.all_reduce(counts)
                    usable, skipped = int(counts[0]) == world, int(counts[1])
                skipped_total += skipped
                if usable:
                    usable_batches += 1
                    batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
                    with torch.autocast(device.type, torch.bfloat16, enabled=amp):
                        losses = task.losses(model, batch)
                    (losses["loss"] / accumulate).backward()
                    window.append({k: float(v.detach()) for k, v in losses.items()})
                # a skipped batch still closes its accumulation window (the step takes what it has)
                if state["batch_in_epoch"] % accumulate or not window:
                    continue
                if t["grad_clip"]:
                    if hasattr(optimizer, "clip_grad_norm"):
                        optimizer.clip_grad_norm(t["grad_clip"])
                    else:
                        torch.nn.utils.clip_grad_norm_(params, t["grad_clip"])
                step_lr = scheduler.get_last_lr()[0]  # the rate this step used (logged with it)
                optimizer.step()
                # ShardedDataParallel reduces gradients through flat buckets that the .grad tensors
                # are views of; setting them to None would detach the views and reduce stale buckets.
                model.zero_grad(set_to_none=optimizer_name != "oss")
                scheduler.step()
                if ema is not None:
                    ema.update_parameters(ema_target)
                state["step"] += 1
                completed = (state["epoch"], state["batch_in_epoch"])
                record = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
                if world > 1:  # log the global-batch mean, not rank 0's share
                    values = torch.tensor(list(record.values()), dtype=torch.float64, device=device)
                    torch_dist.all_reduce(values)
                    record = dict(zip(record, (values / world).tolist()))
                record.update(step=state["step"], epoch=epoch, lr=step_lr, skipped=skipped_total)
                window, last_loss = [], record["loss"]
                log.write(record)
                if rank == 0:
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.4f}")
                stop = stop_signals.agreed(world, device)
                if stop is not None or (t["save_every"] and state["step"] % t["save_every"] == 0):
                    save(f"step_{state['step']}")
                if stop is not None:  # preempted: every rank is at this step boundary and saved together
                    raise TrainingStopped(stop, state["step"], ckpt_dir / f"step_{state['step']}.pth")
                if state["step"] >= total_steps:
                    done = True
                    break
            else:
                if usable_batches == 0 and indices:  # only optimizer steps end the run: it would loop forever
                    raise ValueError(f"{cfg.get('data', {}).get('root')}: no usable samples: every sample of epoch {epoch} "
                                     f"was skipped ({skipped_total} skipped; the warnings above name the files)")
                state["epoch"] += 1
                state["batch_in_epoch"] = 0
                completed = (state["epoch"], 0)
            validate_and_save(last_loss, epoch)
    except TrainingStopped as stopped:
        logger.warning("%s", stopped)
        bar.close()
        log.close()
        raise
    except KeyboardInterrupt:
        # Ctrl-C: keep what was done. Roll back to the last optimizer step (a half-done batch or
        # accumulation is redone). One process only: the other ranks of a torchrun job are being
        # stopped too, so there the last periodic checkpoint is the resume point.
        state["epoch"], state["batch_in_epoch"] = completed
        if world == 1 and state["step"] > 0:
            save(f"step_{state['step']}")
            logger.warning("interrupted at step %d: saved %s; continue with --resume", state["step"],
                           ckpt_dir / f"step_{state['step']}.pth")
        bar.close()
        log.close()
        raise
    finally:
        stop_signals.__exit__()
    bar.close()
    log.close()
    if rank == 0:
        plot_losses(log.path, out_dir / "loss_curve.png", task.loss_keys, task.score_key)
    summary = {"steps": state["step"], "skipped": skipped_total, "checkpoint_dir": str(ckpt_dir),
               "best_checkpoint": str(ckpt_dir / "best.pth"), "final": last_record(log.path, "loss")}
    if task.score_key:
        summary["validation"] = last_record(log.path, task.score_key)
    summary.update(task.extra_summary)
    if rank == 0:  # what a launcher (blvit-quickstart under torchrun) reads back
        atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary
