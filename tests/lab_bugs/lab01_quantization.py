"""Planted bugs for lab01_quantization (see lab_bugs/__init__.py)."""

from lab_bugs import Bug

VISIBLE = [
    Bug("ex1-answer", "qp = 2 ** (bits - 1) - 1", "qp = 2 ** (bits - 1)"),  # off by one level
    Bug("ex2-answer", "scale = ((hi - lo) / qmax)", "scale = ((hi - lo) / 2**bits)"),
    Bug("ex3-answer", "amax(dim=1, keepdim=True)", "amax(dim=0, keepdim=True)"),  # per column
    Bug("ex4-answer", "10.0 * torch.log10", "20.0 * torch.log10"),  # amplitude, not power
]

HIDDEN = [
    Bug("ex1-answer", "qp = 2 ** (bits - 1) - 1", "qp = 7"),  # right for 4 bits only
    Bug("ex2-answer", "lo = torch.clamp(x.min(), max=0.0)", "lo = x.min()"),  # 0.0 not exact
    Bug("ex3-answer", "qp = 2 ** (bits - 1) - 1", "qp = 7"),
    Bug("ex4-answer", 'granularity = "channel" if per_channel else "tensor"', 'granularity = "tensor"'),
]
