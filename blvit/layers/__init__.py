from .attention import ATTENTION_BACKENDS, Attention, set_attention_backend
from .mlp import MappedMlp, Mlp
from .rel_pos import decomposed_rel_pos_bias, resize_rel_pos
from .windows import padded_grid, window_partition, window_unpartition

__all__ = [
    "ATTENTION_BACKENDS",
    "Attention",
    "set_attention_backend",
    "MappedMlp",
    "Mlp",
    "decomposed_rel_pos_bias",
    "padded_grid",
    "resize_rel_pos",
    "window_partition",
    "window_unpartition",
]
