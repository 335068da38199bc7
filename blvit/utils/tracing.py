"""Graph capture: what changes while ``torch.fx`` traces a model symbolically."""
import torch.fx


def fx_tracing() -> bool:
    """True while ``torch.fx`` traces symbolically: shapes are proxies then, so checks that
    branch on them (input-size errors) are skipped; the traced graph has static shapes anyway."""
    trace = torch.fx._symbolic_trace
    return trace.is_fx_symbolic_tracing() if hasattr(trace, "is_fx_symbolic_tracing") else trace.is_fx_tracing()
