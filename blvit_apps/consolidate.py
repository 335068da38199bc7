"""``blvit-consolidate``: one ``.pth`` from a sharded (``train.strategy=fsdp``) checkpoint.

    blvit-consolidate runs/sam_hb/checkpoints/step_4000.pth --out sam_hb_step4000.pth

The result has the weights and the config, like ``best.pth``: ``blvit-eval``, ``blvit-demo`` and
``build_sam_from_checkpoint`` read it. Runs in one process on a CPU (no process group).
"""
import argparse
from pathlib import Path
from typing import Optional, Sequence

from blvit.train.loop import consolidate_checkpoint
from blvit.utils.io import CheckpointError


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="step_N.pth written beside its step_N.dcp folder")
    parser.add_argument("--out", type=Path, required=True, help="the single .pth to write")
    args = parser.parse_args(argv)
    try:
        payload = consolidate_checkpoint(args.checkpoint, args.out)
    except (CheckpointError, FileNotFoundError) as err:
        raise SystemExit(f"blvit-consolidate: {err}")
    print(f"wrote {args.out}: {len(payload['model'])} tensors, step {payload['consolidated_from']['step']}")


if __name__ == "__main__":
    main()
