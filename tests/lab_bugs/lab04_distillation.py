"""Planted bugs for lab04_distillation (see lab_bugs/__init__.py)."""

from lab_bugs import Bug

VISIBLE = [
    Bug("ex1-answer", "return temperature**2 * kl.mean()", "return kl.mean()"),  # no T² factor
    Bug("ex2-answer", "losses.append((err * weight).sum() / weight.sum())",
        "losses.append((err * weight).sum() / err.numel())"),  # padding counted in the mean
    Bug("ex3-answer", "optimizer.step()", "pass  # no update"),
]

HIDDEN = [
    Bug("ex1-answer", "log_p_s = F.log_softmax(student_logits / temperature, dim=-1)",
        "log_p_s = torch.log(torch.softmax(student_logits / temperature, dim=-1))"),  # -inf when confident
    Bug("ex2-answer", "if attention_mask is None:", "if False:"),  # fails without a mask
    Bug("ex3-answer", "with torch.no_grad():\n            teacher_logits = teacher(x[idx])",
        "teacher_logits = teacher(x[idx])"),  # gradients flow into the teacher
]
