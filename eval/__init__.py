"""Zero-shot evaluation (COCO, LVIS, ImageNet)."""
