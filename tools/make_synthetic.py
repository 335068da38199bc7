"""Write the built-in synthetic SA-1B / COCO / LVIS data: see blvit/data/make_synthetic.py."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blvit.data.make_synthetic import main  # noqa: E402

if __name__ == "__main__":
    main()
