"""Applications: whole runs built from the libraries, one module per command.

The packages are layered; each imports only what lies below it (``tests/test_layers.py`` walks
the imports):

0. ``blvit_deploy``: ONNX Runtime inference of exported models; numpy, OpenCV and onnxruntime only
   (no torch, no segment-anything: what an annotation tool embeds);
1. ``blvit``: models, blocks, routing, token merging, Vision Mamba, data, the generic training loop;
2. ``sam_adapter``: bLViT and the token-reduction baselines as SAM's image encoder (builders,
   checkpoints, the SAM trainer, the memory plan);
3. ``eval``: zero-shot evaluation (COCO / LVIS / ImageNet) and its CLI;
4. ``blvit_apps``: ``blvit-quickstart``, ``blvit-bench``, ``blvit-bench-merging``, ``blvit-flops``,
   ``blvit-demo``, ``blvit-export``, ``blvit-consolidate``.
"""
