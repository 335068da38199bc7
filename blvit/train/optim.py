"""Muon for the hidden matrices, AdamW for everything else, behind one optimizer object.

Muon (Jordan et al. 2024) orthogonalises the momentum of each weight matrix by Newton-Schulz
iterations before the step. It only applies to 2-D matrices that act as linear maps; embeddings,
biases, norms, convolution kernels and position tables keep AdamW, as Muon's authors and
PyTorch's documentation prescribe. The learning rate of the Muon matrices is scaled per shape by
``0.2 * sqrt(max(fan_out, fan_in))`` ("match_rms_adamw", Liu et al. 2025, "Muon is Scalable for
LLM Training"), so ``muon_lr`` is on AdamW's scale.

:class:`Muon` is ``torch.optim.Muon``'s update (the same momentum, Newton-Schulz coefficients,
weight decay and learning-rate scaling; tested against it) with the iterations batched over all
matrices of one shape, a handful of kernels per shape instead of some twenty per matrix, and in
float32 where bfloat16 matmuls are slow (a CPU without bf16 units: PyTorch's per-matrix bf16
iterations made the quick start's teacher steps 1.6x slower). The training loop needs one
optimizer for its scheduler, gradient clipping and checkpoints: :class:`MuonWithAdamW` holds
:class:`Muon` and ``torch.optim.AdamW`` and exposes their parameter groups (the same group
dicts, so ``LambdaLR`` scales both learning rates) and one state dict.
"""
import fnmatch
import math
from collections import defaultdict
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

# torch.optim.Muon's quintic Newton-Schulz coefficients (Keller Jordan's) and step count
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5


def orthogonalize(updates: torch.Tensor, steps: int = NS_STEPS, eps: float = 1e-7,
                  dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Newton-Schulz orthogonalisation of a batch of matrices, as ``torch.optim.Muon`` does it for one.

    Args:
        updates: (N, rows, cols) momentum updates of N matrices of one shape.
        dtype: the iterations' dtype (None: the input's).
    Returns:
        (N, rows, cols) approximately U V^T of each matrix's SVD U S V^T, in ``updates.dtype``.
    """
    a, b, c = NS_COEFFICIENTS
    x = updates.to(dtype or updates.dtype)
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.transpose(-2, -1)
    x = x / x.flatten(1).norm(dim=1).clamp(min=eps)[:, None, None]  # spectral norm at most 1
    for _ in range(steps):
        gram = x @ x.transpose(-2, -1)
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    if tall:
        x = x.transpose(-2, -1)
    return x.to(updates.dtype)


def _closure_loss(closure) -> Optional[torch.Tensor]:
    """The loss of an optimizer's optional closure (re-evaluated with gradients), as PyTorch's optimizers do."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class Muon(torch.optim.Optimizer):
    """``torch.optim.Muon(..., nesterov=True, adjust_lr_fn="match_rms_adamw")`` with the Newton-Schulz
    iterations batched per matrix shape. ``ns_dtype`` None: bfloat16 on CUDA (as PyTorch's), float32
    elsewhere."""

    def __init__(self, params: Iterable[nn.Parameter], lr: float, weight_decay: float = 0.0, momentum: float = 0.95,
                 ns_steps: int = NS_STEPS, ns_dtype: Optional[torch.dtype] = None) -> None:
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1:
            raise ValueError(f"Muon: lr {lr} and weight_decay {weight_decay} must be >= 0, momentum {momentum} in [0, 1)")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, ns_steps=ns_steps,
                                      ns_dtype=ns_dtype))
        for group in self.param_groups:
            bad = [tuple(p.shape) for p in group["params"] if p.dim() != 2]
            if bad:
                raise ValueError(f"Muon takes 2-D matrices only, got shapes {bad}")

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = _closure_loss(closure)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            bufs = [self.state[p].setdefault("momentum_buffer", torch.zeros_like(p)) for p in params]
            mom, lr, wd = group["momentum"], group["lr"], group["weight_decay"]
            torch._foreach_lerp_(bufs, grads, 1 - mom)
            updates = torch._foreach_lerp(grads, bufs, mom)  # Nesterov
            if wd:
                torch._foreach_mul_(params, 1 - lr * wd)
            by_shape: Dict[Tuple, List[int]] = defaultdict(list)
            for i, u in enumerate(updates):
                by_shape[(tuple(u.shape), u.device, u.dtype)].append(i)
            for (shape, device, _), index in by_shape.items():
                dtype = group["ns_dtype"] or (torch.bfloat16 if device.type == "cuda" else torch.float32)
                ortho = orthogonalize(torch.stack([updates[i] for i in index]), group["ns_steps"], dtype=dtype)
                ortho.mul_(-lr * 0.2 * math.sqrt(max(shape)))  # match_rms_adamw
                torch._foreach_add_([params[i] for i in index], list(ortho.unbind(0)))
        return loss


def no_weight_decay_names(module: nn.Module) -> set:
    """Full names of the parameters that any submodule lists in its ``no_weight_decay()`` (timm's
    model API: position tables, class tokens, bLViT's gates, Mamba's A_log and D)."""
    names = set()
    for prefix, sub in module.named_modules():
        listed = getattr(sub, "no_weight_decay", None)
        if callable(listed):
            names |= {f"{prefix}.{n}" if prefix else n for n in listed()}
    return names


def weight_decay_groups(module: nn.Module, params: Iterable[nn.Parameter], weight_decay: float) -> List[Dict[str, Any]]:
    """``params`` of ``module`` in two AdamW groups, as timm's ``param_groups_weight_decay`` makes
    them for DeiT's and Vim's training: no weight decay for 1-D parameters (biases, norms, 0-dim
    gates), ``*.bias`` and the names of :func:`no_weight_decay_names`; ``weight_decay`` for the
    rest. Empty groups are left out."""
    wanted = {id(p) for p in params}
    skip = no_weight_decay_names(module)
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if id(p) in wanted:
            listed = name in skip or any(fnmatch.fnmatchcase(name, pattern) for pattern in skip)  # timm: patterns too
            (no_decay if p.ndim <= 1 or name.endswith(".bias") or listed else decay).append(p)
    groups = [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]
    return [g for g in groups if g["params"]]


def muon_parameters(module: nn.Module) -> Tuple[List[nn.Parameter], List[nn.Parameter]]:
    """(matrices for Muon, the rest for AdamW) among the trainable parameters of ``module``: the
    weight of every ``nn.Linear`` whose both sides are wider than 1 is a Muon matrix."""
    matrices = {id(m.weight) for m in module.modules()
                if isinstance(m, nn.Linear) and min(m.weight.shape) > 1}
    trainable = [p for p in module.parameters() if p.requires_grad]  # parameters() yields shared ones once
    return [p for p in trainable if id(p) in matrices], [p for p in trainable if id(p) not in matrices]


class MuonWithAdamW(torch.optim.Optimizer):
    """:class:`Muon` on ``muon_params`` and ``torch.optim.AdamW`` on ``adamw_params``.

    ``param_groups`` lists the Muon group(s) first, then AdamW's: a scheduler that scales each
    group's ``initial_lr`` (``LambdaLR``) scales ``muon_lr`` and ``lr`` alike.
    """

    def __init__(self, muon_params: Iterable[nn.Parameter], adamw_params: Iterable[Any], *, lr: float,
                 muon_lr: float, weight_decay: float, betas: Sequence[float] = (0.9, 0.999),
                 momentum: float = 0.95) -> None:
        """``adamw_params``: parameters, or parameter groups (dicts, e.g. :func:`weight_decay_groups`)."""
        muon_params, adamw_params = list(muon_params), list(adamw_params)
        if not muon_params:
            raise ValueError("train.optimizer=muon: the model has no nn.Linear matrix for Muon")
        self.muon = Muon(muon_params, lr=muon_lr, weight_decay=weight_decay, momentum=momentum)
        self.adamw = (torch.optim.AdamW(adamw_params, lr=lr, weight_decay=weight_decay, betas=tuple(betas))
                      if adamw_params else None)
        # The base class's bookkeeping (hooks, defaults) over all parameters; the groups themselves
        # are the inner optimizers' own dicts (see _share_groups).
        rest = [p for g in adamw_params for p in (g["params"] if isinstance(g, dict) else [g])]
        super().__init__(muon_params + rest, {"lr": lr})
        self._share_groups()

    def _inner(self) -> List[torch.optim.Optimizer]:
        return [self.muon] + ([self.adamw] if self.adamw is not None else [])

    def _share_groups(self) -> None:
        self.param_groups = [g for opt in self._inner() for g in opt.param_groups]

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = _closure_loss(closure)
        for opt in self._inner():
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self._inner():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> Dict[str, Any]:  # type: ignore[override]
        return {"muon": self.muon.state_dict(), "adamw": None if self.adamw is None else self.adamw.state_dict()}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:  # type: ignore[override]
        if set(state_dict) != {"muon", "adamw"}:
            raise ValueError("not a MuonWithAdamW state (keys muon, adamw): was the checkpoint trained with "
                             f"another train.optimizer? got keys {sorted(state_dict)}")
        self.muon.load_state_dict(state_dict["muon"])
        if self.adamw is not None:
            self.adamw.load_state_dict(state_dict["adamw"])
        self._share_groups()  # loading replaces the inner group dicts
