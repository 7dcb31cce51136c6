"""Planted bugs for lab03_ste_qat (see lab_bugs/__init__.py)."""

from lab_bugs import Bug

VISIBLE = [
    Bug("ex1-answer", "return grad_output * keep, None", "return grad_output, None"),  # never clipped
    Bug("ex2-answer", "gamma = w.detach().abs().mean()", "gamma = w.detach().abs().amax()"),  # absmax, not absmean
    Bug("ex3-answer", "return F.linear(x, w, self.bias)", "return F.linear(x, w)"),  # bias dropped
    Bug("ex4-answer", "BitNetConfig(weight_bits=bits, act_bits=8", "BitNetConfig(weight_bits=8, act_bits=8"),
]

HIDDEN = [
    Bug("ex1-answer", "return grad_output * keep, None", "return keep, None"),  # drops the incoming gradient
    Bug("ex2-answer", ".clamp_min(eps) / qp", " / qp"),  # an all-zero token gives NaN
    Bug("ex3-answer", "amax(dim=-1, keepdim=True)", "amax(dim=1, keepdim=True)"),  # per token only for 2-D x
    Bug("ex4-answer", "quantized = copy.deepcopy(model)", "quantized = model"),  # PTQ in place
]
