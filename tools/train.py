"""Train a model: ``python tools/train.py --config configs/sam/quickstart.yaml [key=value ...]``.

Runs as one process (CPU or one GPU) or under ``torchrun`` (DDP over GPUs and nodes).
"""
import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blvit.train.config import ConfigError, load_config  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True,
                        help="YAML recipe (configs/sam/*.yaml, configs/imagenet/*.yaml, configs/vim/*.yaml); required: "
                             "without one the defaults would train a full-size b+t from a random teacher")
    parser.add_argument("--resume", action="store_true", help="continue from output_dir/checkpoints/latest.txt")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad sample instead of skipping it")
    parser.add_argument("--plan", action="store_true",
                        help="print the per-GPU memory plan of this run (parameters, gradients, optimizer state per "
                             "strategy, teacher, activations with and without checkpointing, largest batch) and exit; "
                             "allocates nothing (meta device); SAM tasks")
    parser.add_argument("--plan-gpus", type=int, default=8, help="--plan: number of GPUs (processes)")
    parser.add_argument("--gpu-memory", type=float, nargs="+", default=[40, 80], help="--plan: card sizes, GB")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=20 data.root=/data/sa1b")
    args = parser.parse_intermixed_args(argv)  # options and overrides in any order
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        parser.error(str(err))
    if args.plan:
        if cfg["task"] == "classify":
            parser.error("--plan covers the SAM tasks (sam_distill, sam_finetune)")
        from sam_adapter.memory_plan import markdown, plan_memory

        plan = plan_memory(cfg, world=args.plan_gpus, gpu_gib=args.gpu_memory)
        print(markdown(plan))
        return plan
    from blvit.data.imagenet import ImageFolderError
    from blvit.data.sa1b import SampleError
    from blvit.train.loop import TrainingStopped
    from blvit.utils.io import CheckpointError

    if cfg["task"] == "classify":
        from blvit.train.classification import train
    else:
        from sam_adapter.trainer import train

    try:
        summary = train(cfg, resume=args.resume, strict=args.strict)
    except (FileNotFoundError, SampleError, ImageFolderError, CheckpointError, ConfigError) as err:
        parser.exit(2, f"error: {err}\n")
    except ValueError as err:  # a bad setting found while building the model or data (e.g. model.keep_ratio=0)
        parser.exit(2, f"error: {err}\n")
    except KeyboardInterrupt:  # the loop saved a checkpoint and logged where
        parser.exit(130, "interrupted; continue with --resume (same --config and overrides)\n")
    except TrainingStopped as stopped:  # preempted (Slurm): saved on every rank's agreement; 128 + SIGTERM
        _finish_process_group()
        parser.exit(143, f"{stopped} (same --config and overrides)\n")
    _finish_process_group()
    print(json.dumps(summary, indent=2))
    return summary


def _finish_process_group() -> None:
    import torch.distributed as torch_dist

    if torch_dist.is_initialized():
        # every rank waits for rank 0's last writes, then the group is torn down before exit: a rank
        # leaving with gloo's threads alive aborts ("terminate called without an active exception")
        torch_dist.barrier()
        torch_dist.destroy_process_group()


if __name__ == "__main__":
    main()
