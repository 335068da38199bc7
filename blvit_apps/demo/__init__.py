"""Promptable segmentation demo: the ``blvit-demo`` command line and a local web page.

``blvit-demo --point X,Y`` / ``--box X0,Y0,X1,Y1`` / ``--everything`` segments an image once;
``blvit-demo --serve`` serves a page (Flask, loopback by default) where clicks and boxes are
answered from a cached image embedding. See ``blvit_apps.demo.cli`` and ``blvit_apps.demo.server``.
"""
from .core import DemoInputError, load_demo_model, quickstart_checkpoint

__all__ = ["DemoInputError", "load_demo_model", "quickstart_checkpoint"]
