"""Speed and FLOPs with and without token merging (same as the ``blvit-bench-merging`` command)."""
from blvit_apps.merging_benchmark import main

if __name__ == "__main__":
    raise SystemExit(main())
