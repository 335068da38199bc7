"""Mamba's selective scan and causal depthwise conv1d, in plain PyTorch, with the fused CUDA
kernels of ``mamba_ssm`` / ``causal_conv1d`` used when they are installed.

:func:`selective_scan` takes exactly the arguments of
``mamba_ssm.ops.selective_scan_interface.selective_scan_fn``:

- ``u``, ``delta``: (batch, D, L)
- ``A``: (D, N), real (the model passes ``-exp(A_log)``, so A < 0)
- ``B``, ``C``: (batch, N, L) or grouped (batch, G, N, L) (channel d uses group d // (D / G)),
  or fixed (D, N)
- ``D``: (D,) skip, ``z``: (batch, D, L) gate (``y * silu(z)``), ``delta_bias``: (D,)

and computes, in float32 (the result is cast to ``u.dtype``)::

    delta = softplus(delta + delta_bias)            (bias and softplus optional)
    h_t   = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t      h_{-1} = 0, h_t: (D, N)
    y_t   = C_t . h_t + D * u_t
    out   = y * silu(z)

Backends:

- ``"reference"``: the definition, a Python loop over the L positions (slow; for tests).
- ``"torch"``: a blocked scan. The sequence is cut into chunks of ``chunk_size`` positions; the
  loop runs over the L / chunk_size chunks and inside a chunk the linear recurrence
  ``h_t = a_t h_{t-1} + b_t`` is an associative (Hillis-Steele) scan in log2(chunk) vectorised
  steps; the state at the end of a chunk is carried into the next. Only products of the decays
  ``a_t = exp(delta_t A)`` (all in (0, 1] for A <= 0, delta >= 0) are formed, never their
  inverses, so nothing can overflow. At inference no (batch, D, L, N) tensor of the whole sequence
  exists, only one chunk's; in training the chunks are recomputed in backward
  (``_RecomputedChunkScan``), so autograd keeps the inputs and the chunk-boundary states instead of
  every chunk's intermediates. Runs on CPU and GPU.
- ``"cuda"``: ``mamba_ssm``'s fused kernel (CUDA tensors and ``mamba_ssm`` installed).

``backend=None`` picks ``"cuda"`` when possible, else ``"torch"``.

On the ``meta`` device (FLOP counting) the scan returns an empty tensor of the right shape; its
multiply-adds are not visible to ``FlopCounterMode`` (elementwise work in a loop), so they are
counted analytically (:func:`selective_scan_macs`) and reported to every active
:func:`count_scan_macs` context.
"""
import contextlib
from typing import Iterator, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F

__all__ = [
    "BACKENDS",
    "ScanMacCounter",
    "available_backends",
    "causal_conv1d",
    "count_scan_macs",
    "selective_scan",
    "selective_scan_macs",
    "selective_scan_ref",
]

BACKENDS = ("reference", "torch", "cuda")
DEFAULT_CHUNK = 32
# Training through the "torch" backend recomputes each chunk in backward (_RecomputedChunkScan).
# False: plain autograd through every chunk (about 15 x (batch, D, L, N) floats kept per scan;
# for comparisons and memory measurements).
RECOMPUTE_IN_BACKWARD = True

_CUDA_SCAN = None  # resolved lazily: False when mamba_ssm is not importable
_CUDA_CONV = None


def _cuda_scan_fn():
    global _CUDA_SCAN
    if _CUDA_SCAN is None:
        try:
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

            _CUDA_SCAN = selective_scan_fn
        except Exception:  # ImportError, or a broken build raising at import
            _CUDA_SCAN = False
    return _CUDA_SCAN or None


def _cuda_conv_fn():
    global _CUDA_CONV
    if _CUDA_CONV is None:
        try:
            from causal_conv1d import causal_conv1d_fn

            _CUDA_CONV = causal_conv1d_fn
        except Exception:
            _CUDA_CONV = False
    return _CUDA_CONV or None


def available_backends(device: Union[str, torch.device, None] = None) -> List[str]:
    """Backends usable for tensors on ``device`` (default: CUDA if available)."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    out = ["reference", "torch"]
    if device.type == "cuda" and _cuda_scan_fn() is not None:
        out.append("cuda")
    return out


# ----------------------------------------------------------------------------------------------
# FLOP accounting
# ----------------------------------------------------------------------------------------------


class ScanMacCounter:
    """Collects the analytic multiply-adds of the selective scans run inside its context."""

    def __init__(self) -> None:
        self.macs = 0
        self.calls = 0


_COUNTERS: List[ScanMacCounter] = []


@contextlib.contextmanager
def count_scan_macs() -> Iterator[ScanMacCounter]:
    """``with count_scan_macs() as c: model(x)`` -> ``c.macs``: the selective scans' multiply-adds
    (analytic, see :func:`selective_scan_macs`), which ``FlopCounterMode`` cannot see."""
    counter = ScanMacCounter()
    _COUNTERS.append(counter)
    try:
        yield counter
    finally:
        _COUNTERS.remove(counter)


def selective_scan_macs(batch: int, dim: int, length: int, d_state: int, with_d: bool = True,
                        with_z: bool = True) -> int:
    """Multiply-adds of one selective scan, counted as this toolkit does.

    Per channel, state and position: ``delta * A`` (1), ``B * (delta u)`` (1), the state update
    ``a h + b`` (1) and the read-out ``C . h`` (1): 4. Per channel and position: ``delta * u`` (1),
    the skip ``D * u`` (1), the gate ``y * silu(z)`` (1). exp, softplus and silu are not counted.
    """
    per_token = 4 * d_state + 1 + int(with_d) + int(with_z)
    return int(batch) * int(dim) * int(length) * per_token


def _record(u: torch.Tensor, A: torch.Tensor, D, z) -> None:
    if _COUNTERS:
        macs = selective_scan_macs(u.shape[0], u.shape[1], u.shape[2], A.shape[1], D is not None, z is not None)
        for counter in _COUNTERS:
            counter.macs += macs
            counter.calls += 1


# ----------------------------------------------------------------------------------------------
# Scans
# ----------------------------------------------------------------------------------------------


def _check_shapes(u, delta, A, B, C, D, z, delta_bias) -> None:
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, D, L), got {tuple(u.shape)}")
    batch, dim, length = u.shape
    if tuple(delta.shape) != tuple(u.shape):
        raise ValueError(f"delta {tuple(delta.shape)} must have u's shape {tuple(u.shape)}")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must be (D, N) = ({dim}, N), got {tuple(A.shape)}")
    if A.is_complex():
        raise NotImplementedError("complex A is not supported (Vim and Mamba use real A)")
    n = A.shape[1]
    for name, m in (("B", B), ("C", C)):
        if m.dim() == 2:
            ok = tuple(m.shape) == (dim, n)
        elif m.dim() == 3:
            ok = tuple(m.shape) == (batch, n, length)
        elif m.dim() == 4:
            ok = m.shape[0] == batch and m.shape[2] == n and m.shape[3] == length and dim % m.shape[1] == 0
        else:
            ok = False
        if not ok:
            raise ValueError(f"{name} must be (D, N), (batch, N, L) or (batch, G, N, L) with G | D; got "
                             f"{tuple(m.shape)} for u {tuple(u.shape)} and N = {n}")
    if D is not None and tuple(D.shape) != (dim,):
        raise ValueError(f"D must be ({dim},), got {tuple(D.shape)}")
    if delta_bias is not None and tuple(delta_bias.shape) != (dim,):
        raise ValueError(f"delta_bias must be ({dim},), got {tuple(delta_bias.shape)}")
    if z is not None and tuple(z.shape) != tuple(u.shape):
        raise ValueError(f"z {tuple(z.shape)} must have u's shape {tuple(u.shape)}")


def _prepare_delta(delta, delta_bias, delta_softplus):
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)  # = log1p(exp(x)), x above 20 passed through, as in the kernel
    return delta


def _finish(y, u, D, z, dtype_in):
    if D is not None:
        y = y + u * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(dtype_in)


def _per_channel(m: torch.Tensor, dim: int) -> torch.Tensor:
    """B or C as a tensor broadcastable to (batch, D, L, N)."""
    m = m.float()
    if m.dim() == 2:  # fixed (D, N)
        return m[None, :, None, :]
    if m.dim() == 3:  # (batch, N, L)
        return m.transpose(1, 2)[:, None]
    groups = m.shape[1]  # (batch, G, N, L): channel d uses group d // (D / G)
    return m.transpose(2, 3).repeat_interleave(dim // groups, dim=1)


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    """The definition: a loop over the sequence, float32 throughout."""
    dtype_in = u.dtype
    dim, length = u.shape[1], u.shape[2]
    u = u.float()
    delta = _prepare_delta(delta, delta_bias, delta_softplus)
    A = A.float()
    b = _per_channel(B, dim)  # broadcastable to (batch, D, L, N)
    c = _per_channel(C, dim)
    h = u.new_zeros(u.shape[0], dim, A.shape[1])
    ys = []
    for t in range(length):
        decay = torch.exp(delta[:, :, t, None] * A)
        b_t = b[:, :, t] if b.shape[2] > 1 else b[:, :, 0]
        c_t = c[:, :, t] if c.shape[2] > 1 else c[:, :, 0]
        h = decay * h + (delta[:, :, t] * u[:, :, t])[..., None] * b_t
        ys.append((h * c_t).sum(-1))
    y = torch.stack(ys, dim=2) if ys else u.new_zeros(u.shape)
    out = _finish(y, u, D, z, dtype_in)
    return (out, h) if return_last_state else out


def _hillis_steele(a: torch.Tensor, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Inclusive scan of h_t = a_t h_{t-1} + b_t along dim -2 (h_{-1} = 0): returns
    (prod_{k<=t} a_k, h_t). log2(T) steps of vectorised work, no in-place updates (autograd)."""
    length = a.shape[-2]
    step = 1
    while step < length:
        a_hi, a_lo = a[..., step:, :], a[..., :-step, :]
        b = torch.cat([b[..., :step, :], torch.addcmul(b[..., step:, :], a_hi, b[..., :-step, :])], dim=-2)
        a = torch.cat([a[..., :step, :], a_hi * a_lo], dim=-2)
        step *= 2
    return a, b


def _linear_recurrence(a: torch.Tensor, b: torch.Tensor, h0: Optional[torch.Tensor] = None,
                       reverse: bool = False) -> torch.Tensor:
    """h_t = a_t h_{t-1} + b_t along dim 2 of (batch, D, T, N), from h_{-1} = ``h0`` (None: zero);
    ``reverse``: h_t = a_t h_{t+1} + b_t from the end. On a CPU without autograd a loop over t
    (4-5x faster there than the log-step scan's full-size concatenations); on a GPU, or when
    autograd records it, the Hillis-Steele scan (few kernels, out of place)."""
    if not a.is_cuda and not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)):
        out = torch.empty_like(b)
        h = h0 if h0 is not None else torch.zeros_like(b[:, :, 0])
        for t in (range(a.shape[2] - 1, -1, -1) if reverse else range(a.shape[2])):
            h = torch.addcmul(b[:, :, t], a[:, :, t], h, out=out[:, :, t])
        return out
    if reverse:
        return _linear_recurrence(a.flip(2), b.flip(2), h0).flip(2)
    cum_a, hs = _hillis_steele(a, b)
    return hs if h0 is None else torch.addcmul(hs, cum_a, h0[:, :, None, :])


def _chunk(u, delta, A, b_all, c_all, start: int, stop: int, h: Optional[torch.Tensor]):
    """One chunk of the blocked scan: (y (batch, D, T), state at its end (batch, D, N)).
    ``h``: the state before the chunk, or None (zero)."""
    d_c = delta[:, :, start:stop, None]
    decay = torch.exp(d_c * A[:, None, :])  # (batch, D, T, N), in (0, 1] for A <= 0
    b_c = b_all[:, :, start:stop] if b_all.shape[2] > 1 else b_all
    c_c = c_all[:, :, start:stop] if c_all.shape[2] > 1 else c_all
    inp = (d_c * u[:, :, start:stop, None]) * b_c
    hs = _linear_recurrence(decay, inp.expand_as(decay), h)
    return (hs * c_c).sum(-1), hs[:, :, -1]


def _chunk_bounds(length: int, chunk: int) -> List[Tuple[int, int]]:
    return [(start, min(length, start + chunk)) for start in range(0, length, chunk)]


def _chunk_slice(t: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """A chunk of a (batch, D or 1, L or 1, ...) input: B and C fixed over L stay whole."""
    return t[:, :, start:stop] if t.shape[2] > 1 else t


def _reduce_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum a broadcast gradient back to ``shape`` (dims of size 1 that were expanded)."""
    dims = [i for i, (g, s) in enumerate(zip(grad.shape, shape)) if s == 1 and g != 1]
    return grad.sum(dims, keepdim=True) if dims else grad


class _RecomputedChunkScan(torch.autograd.Function):
    """The blocked scan for training: the forward keeps only its inputs and the state at each
    chunk boundary (batch, D, L / chunk, N); the backward recomputes one chunk at a time, last to
    first. Peak memory: one chunk's (batch, D, chunk, N) tensors instead of every chunk's (the plain
    autograd path keeps about 15 tensors of (batch, D, L, N) per scan).

    The backward is the recurrence's adjoint, written out: with h_t = a_t h_{t-1} + x_t and
    y_t = <c_t, h_t>, the gradient g_t of h_t obeys g_t = dy_t c_t + a_{t+1} g_{t+1} (the same
    linear scan, run in reverse), and then dx_t = g_t, da_t = g_t h_{t-1}, dc_t = dy_t h_t,
    dh_{start} = a_0 g_0. Autograd only maps da, dx back through a = exp(delta A) and
    x = delta u B on the chunk's slices (autograd through the Hillis-Steele slices and concatenations
    cost 6x the forward on a CPU)."""

    @staticmethod
    def forward(ctx, u, delta, A, b_all, c_all, chunk: int):
        bounds = _chunk_bounds(u.shape[2], chunk)
        starts, ys, h = [], [], None
        for start, stop in bounds:
            starts.append(h)
            y, h = _chunk(u, delta, A, b_all, c_all, start, stop, h)
            ys.append(y)
        zeros = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
        ctx.save_for_backward(u, delta, A, b_all, c_all, torch.stack([zeros if s is None else s for s in starts], 2))
        ctx.bounds = bounds
        return torch.cat(ys, dim=2), h

    @staticmethod
    def backward(ctx, grad_y, grad_last_state):
        u, delta, A, b_all, c_all, starts = ctx.saved_tensors
        need = ctx.needs_input_grad[:5]
        grads = [torch.zeros_like(t) if n else None for t, n in zip((u, delta, A, b_all, c_all), need)]
        grad_h = grad_last_state  # gradient of the state at the end of the current chunk
        for index in range(len(ctx.bounds) - 1, -1, -1):
            start, stop = ctx.bounds[index]
            h0 = starts[:, :, index] if index > 0 else None
            with torch.enable_grad():
                u_c = u[:, :, start:stop].detach().requires_grad_(need[0])
                d_c = delta[:, :, start:stop].detach().requires_grad_(need[1])
                a_leaf = A.detach().requires_grad_(need[2])
                b_c = _chunk_slice(b_all, start, stop).detach().requires_grad_(need[3])
                decay = torch.exp(d_c[..., None] * a_leaf[:, None, :])  # (batch, D, T, N)
                inp = (d_c * u_c)[..., None] * b_c
            c_c = _chunk_slice(c_all, start, stop)
            with torch.no_grad():
                hs = _linear_recurrence(decay, inp.expand_as(decay), h0)
                g_y = grad_y[:, :, start:stop, None] if grad_y is not None else None
                seed = g_y * c_c if g_y is not None else torch.zeros_like(hs)
                if grad_h is not None:
                    seed = seed.clone()
                    seed[:, :, -1] += grad_h
                # reverse scan: coefficient of g_{t+1} in g_t is a_{t+1}
                next_decay = torch.cat([decay[:, :, 1:], torch.zeros_like(decay[:, :, :1])], dim=2)
                g_h = _linear_recurrence(next_decay, seed.expand_as(decay), reverse=True)
                h_prev = torch.cat([h0[:, :, None] if h0 is not None else torch.zeros_like(hs[:, :, :1]),
                                    hs[:, :, :-1]], dim=2)
                grad_h = decay[:, :, 0] * g_h[:, :, 0] if index > 0 else None
                if need[4] and g_y is not None:
                    g_c = _reduce_to(g_y * hs, c_c.shape)
                    if c_all.shape[2] > 1:
                        grads[4][:, :, start:stop] += g_c
                    else:
                        grads[4] += g_c
            leaves = [t for t, n in zip((u_c, d_c, a_leaf, b_c), need[:4]) if n]
            if leaves:
                found = torch.autograd.grad([decay, inp], leaves, [g_h * h_prev, g_h], allow_unused=True)
                found = list(found)
                for position, n in enumerate(need[:4]):
                    if not n:
                        continue
                    g = found.pop(0)
                    if g is None:
                        continue
                    if position == 2 or (position == 3 and b_all.shape[2] == 1):
                        grads[position] += g
                    else:
                        grads[position][:, :, start:stop] += g
        return (*grads, None)


def _selective_scan_torch(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False, chunk_size: int = DEFAULT_CHUNK, recompute: Optional[bool] = None):
    """``recompute``: the training path that recomputes chunks in backward (None: whenever autograd
    records the scan, unless ``RECOMPUTE_IN_BACKWARD`` is off)."""
    dtype_in = u.dtype
    dim, length = u.shape[1], u.shape[2]
    u = u.float()
    delta = _prepare_delta(delta, delta_bias, delta_softplus)
    A = A.float()
    b_all = _per_channel(B, dim)
    c_all = _per_channel(C, dim)
    chunk = max(1, int(chunk_size))
    h = None
    records = torch.is_grad_enabled() and any(t.requires_grad for t in (u, delta, A, b_all, c_all))
    if recompute is None:
        recompute = records and RECOMPUTE_IN_BACKWARD
    if recompute and length > 0:
        y, h = _RecomputedChunkScan.apply(u, delta, A, b_all, c_all, chunk)
    else:
        ys = []
        for start, stop in _chunk_bounds(length, chunk):
            y_c, h = _chunk(u, delta, A, b_all, c_all, start, stop, h)
            ys.append(y_c)
        y = torch.cat(ys, dim=2) if ys else u.new_zeros(u.shape)
    out = _finish(y, u, D, z, dtype_in)
    if return_last_state:
        if h is None:
            h = u.new_zeros(u.shape[0], dim, A.shape[1])
        return out, h
    return out


def _selective_scan_cuda(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                         return_last_state=False):
    fn = _cuda_scan_fn()
    if fn is None:
        raise RuntimeError(
            "selective_scan backend 'cuda' needs the mamba_ssm package (pip install mamba-ssm, built "
            "against this PyTorch and CUDA); it is not importable here. Use backend='torch' (pure "
            "PyTorch, CPU and GPU) instead."
        )
    if not u.is_cuda:
        raise RuntimeError(f"selective_scan backend 'cuda' needs CUDA tensors; u is on {u.device}. "
                           "Use backend='torch' for CPU tensors.")

    def cont(t, dtype=None):
        if t is None:
            return None
        return (t.to(dtype) if dtype is not None else t).contiguous()

    # The kernel wants delta, z and variable B / C in u's dtype, A and fixed B / C in float32.
    dt = u.dtype
    B = cont(B, dt if B.dim() >= 3 else torch.float32)
    C = cont(C, dt if C.dim() >= 3 else torch.float32)
    return fn(cont(u), cont(delta, dt), cont(A, torch.float32), B, C, cont(D, torch.float32),
              cont(z, dt), cont(delta_bias, torch.float32), delta_softplus, return_last_state)


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None,
                   delta_bias: Optional[torch.Tensor] = None, delta_softplus: bool = False,
                   backend: Optional[str] = None, return_last_state: bool = False,
                   chunk_size: int = DEFAULT_CHUNK):
    """Mamba's selective scan with ``mamba_ssm.selective_scan_fn``'s arguments and semantics
    (module docstring). Returns (batch, D, L) in ``u.dtype``; with ``return_last_state`` also
    the final state (batch, D, N) in float32.

    backend: ``"reference"``, ``"torch"``, ``"cuda"`` or None (fastest available).
    """
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown selective_scan backend {backend!r}; choose from {BACKENDS} or None")
    _record(u, A, D, z)
    if u.device.type == "meta":
        out = torch.empty_like(u)
        return (out, u.new_empty(u.shape[0], u.shape[1], A.shape[1], dtype=torch.float32)) if return_last_state else out
    if backend is None:
        backend = "cuda" if (u.is_cuda and _cuda_scan_fn() is not None) else "torch"
    if backend == "cuda":
        return _selective_scan_cuda(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    with torch.autocast(u.device.type, enabled=False):
        if backend == "reference":
            return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
        return _selective_scan_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                     chunk_size=chunk_size)


# ----------------------------------------------------------------------------------------------
# Causal depthwise conv1d
# ----------------------------------------------------------------------------------------------


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  activation: Optional[str] = "silu", use_kernel: Optional[bool] = None) -> torch.Tensor:
    """Causal depthwise conv1d over (batch, D, L) with a (D, W) or (D, 1, W) weight: output t sees
    inputs t-W+1 .. t (zero left padding), as ``nn.Conv1d(D, D, W, groups=D, padding=W-1)`` cut to
    the first L outputs. ``activation``: "silu" / "swish" or None.

    Uses ``causal_conv1d.causal_conv1d_fn`` when installed and ``x`` is on CUDA (``use_kernel``
    None: when possible; False: never), else ``F.conv1d`` with left padding.
    """
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    dim = x.shape[1]
    w2 = weight.reshape(dim, -1)
    width = w2.shape[1]
    if use_kernel is not False and x.is_cuda:
        fn = _cuda_conv_fn()
        if fn is not None and width in (2, 3, 4):
            return fn(x.contiguous() if x.stride(-1) != 1 else x, w2.contiguous(), bias, activation=activation)
        if use_kernel:
            raise RuntimeError("causal_conv1d kernel requested but the causal_conv1d package is not importable")
    y = F.conv1d(F.pad(x, (width - 1, 0)), w2[:, None, :], bias, groups=dim)
    return F.silu(y) if activation is not None else y

