"""Token merging: ToMe for timm ViTs / DeiT, R-MeeTo for Vision Mamba, merge-map pictures and a
speed / FLOPs benchmark (``blvit-bench-merging``)."""
from .rmeeto import DEFAULT_LAYERS, RMeeToMerge, apply_rmeeto, default_r, remove_rmeeto
from .tome import (
    MergePlan,
    apply_tome,
    bipartite_soft_matching,
    linear_schedule,
    merge_source,
    merge_wavg,
    r_schedule,
    remove_tome,
    set_tome_r,
)
from .viz import assignment_from_source, save_merge_map, save_video_merge_map

__all__ = [
    "DEFAULT_LAYERS",
    "MergePlan",
    "RMeeToMerge",
    "apply_rmeeto",
    "apply_tome",
    "assignment_from_source",
    "bipartite_soft_matching",
    "default_r",
    "linear_schedule",
    "merge_source",
    "merge_wavg",
    "r_schedule",
    "remove_rmeeto",
    "remove_tome",
    "save_merge_map",
    "save_video_merge_map",
    "set_tome_r",
]
