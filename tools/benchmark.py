"""SAM encoder speed, stock vs dense vs bLViT (same as the ``blvit-bench`` command)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blvit_apps.sam_benchmark import main  # noqa: E402

if __name__ == "__main__":
    main()
