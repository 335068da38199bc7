"""Encoder FLOPs, dense SAM vs bLViT-SAM (same as the ``blvit-flops`` command)."""
from blvit_apps.flops_cli import main

if __name__ == "__main__":
    main()
