"""Zero-shot evaluation (same as the ``blvit-eval`` command): see eval/cli.py."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
