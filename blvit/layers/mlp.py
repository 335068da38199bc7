"""MLPs. Parameter names follow segment-anything's ``MLPBlock`` (lin1, lin2)."""
from typing import Type

import torch
import torch.nn as nn


class Mlp(nn.Module):
    """(..., C) -> (..., C) through a hidden layer of ``hidden_dim``."""

    def __init__(self, dim: int, hidden_dim: int, act_layer: Type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden_dim)
        self.act = act_layer()
        self.lin2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


class MappedMlp(nn.Module):
    """The E-block MLP: map the stream width C down to c, a width-c MLP, map back to C.

    (..., C) -> down (..., c) -> lin1 (..., hidden) -> act -> lin2 (..., c) -> up (..., C).
    """

    def __init__(
        self, dim: int, inner_dim: int, hidden_dim: int, act_layer: Type[nn.Module] = nn.GELU
    ) -> None:
        super().__init__()
        self.down = nn.Linear(dim, inner_dim)
        self.lin1 = nn.Linear(inner_dim, hidden_dim)
        self.act = act_layer()
        self.lin2 = nn.Linear(hidden_dim, inner_dim)
        self.up = nn.Linear(inner_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.lin2(self.act(self.lin1(self.down(x)))))
