"""Planted bugs for lab06_kernels (see lab_bugs/__init__.py)."""

from lab_bugs import Bug

VISIBLE = [
    Bug("ex1-answer", "((x >> np.uint64(1)) & m1)", "((x >> np.uint64(1)) & m2)"),  # wrong mask in the first step
    Bug("ex2-answer", "return k - 2 * differ", "return k - differ"),
    Bug("ex3-answer", "weight = -128 if j == 7 else 1 << j", "weight = 128 if j == 7 else 1 << j"),  # unsigned top bit
    Bug("ex4-answer", "out[r] = acc - x_sum", "out[r] = acc"),  # sum c x, not sum w x
]

HIDDEN = [
    # 64 set bits wrap to 0: only the all-ones word
    Bug("ex1-answer", "return (x * h01) >> np.uint64(56)", "return ((x * h01) >> np.uint64(56)) & np.uint64(63)"),
    Bug("ex2-answer", "return k - 2 * differ", "return 64 * a_words.shape[0] - 2 * differ"),  # counts the padding
    Bug("ex3-answer", "padded = np.zeros(", "padded = np.ones("),  # padding bits 1: wrong when K % 64 != 0
    Bug("ex4-answer", "for i in range(k % 4):", "for i in range(0):"),  # the last, partial byte forgotten
]
