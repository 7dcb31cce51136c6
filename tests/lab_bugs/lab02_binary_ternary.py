"""Planted bugs for lab02_binary_ternary (see lab_bugs/__init__.py)."""

from lab_bugs import Bug

VISIBLE = [
    Bug("ex1-answer", "return codes, w.abs().mean()", "return codes, w.abs().max()"),
    Bug("ex2-answer", "torch.round(torch.clamp(w / (gamma + eps), -1.0, 1.0))", "torch.round(w / (gamma + eps))"),
    Bug("ex3-answer", "energy = (c * c).sum()", "energy = torch.tensor(float(c.numel()))"),
    Bug("ex4-answer", "kept = w.abs() > t * w.abs().mean()", "kept = w.abs() > t"),
]

HIDDEN = [
    Bug("ex1-answer", "torch.where(w >= 0, 1, -1)", "torch.sign(w)"),  # 0 -> 0
    Bug("ex2-answer", "gamma = w.abs().mean(dim=1, keepdim=True)", "gamma = w.abs().mean(dim=0).reshape(-1, 1)"),
    Bug("ex3-answer", "if energy == 0:", "if False:"),  # 0 / 0 = NaN
    Bug("ex4-answer", "scale = w.abs()[kept].sum() / n_kept if n_kept else torch.zeros(())",
        "scale = w.abs()[kept].mean()"),  # mean of nothing = NaN
]
