"""Planted bugs for lab05_packing (see lab_bugs/__init__.py)."""

from lab_bugs import Bug

VISIBLE = [
    Bug("ex1-answer", "<< np.arange(8, dtype=np.uint8)).sum", "<< np.arange(7, -1, -1, dtype=np.uint8)).sum"),  # big bit order
    Bug("ex2-answer", "<< np.array([0, 2, 4, 6], dtype=np.uint8)", "<< np.array([6, 4, 2, 0], dtype=np.uint8)"),
    Bug("ex3-answer", "((q * 256 + 242) // 243)", "(q * 256 // 243)"),  # floor, not ceil: digits decode wrong
    Bug("ex4-answer", "weight_bytes(n, variant) + 4", "weight_bytes(n, variant)"),  # the scales forgotten
]

HIDDEN = [
    Bug("ex1-answer", "np.pad(bits, (0, -len(bits) % 8))", "np.pad(bits, (0, -len(bits) % 8), constant_values=1)"),
    Bug("ex2-answer", "constant_values=1)", "constant_values=0)"),  # pads with -1 weights
    Bug("ex3-answer", "constant_values=1)", "constant_values=0)"),  # pads with -1 weights
    Bug("ex4-answer", "if not tensor.is_floating_point():", "if False:"),  # integer buffers counted as floats
]
