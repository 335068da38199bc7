"""Promptable segmentation demo (same as the ``blvit-demo`` command): see blvit_apps/demo/cli.py."""
import sys
from pathlib import Path

# the repository root first: this folder's eval.py must not shadow the eval package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blvit_apps.demo.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
