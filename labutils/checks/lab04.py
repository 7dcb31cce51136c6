"""Self-checks for Lab 4, Distillation (``labs/source/lab04_distillation``).

The losses are compared with ``labutils.distill`` (values and gradients, on confident logits,
masks and layer maps the visible tests do not try); ``distill`` trains a teacher and a student of
the check's own.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from labutils.checks._common import (
    _check_training,
    _fail,
    _function,
    _gen,
    _kd_mistake,
    _mistake,
    _ok,
    _ratio_hint,
    _run,
    _same,
    _typed,
)

__all__ = ["check_lab4_kd_loss", "check_lab4_hidden_mse", "check_lab4_distill"]


def _scalar(value: object, call: str) -> torch.Tensor:
    if isinstance(value, float):
        raise _fail(call, "return the loss as a tensor (not .item() or float()): training needs its gradient")
    _typed(value, call, "the loss", torch.Tensor)
    if value.shape != ():
        raise _fail(call, f"return one number for the batch (shape []), got shape {list(value.shape)}: average "
                          "over the examples")
    return value


def check_lab4_kd_loss(kd_loss: Callable) -> bool:
    """Exercise 1: ``kd_loss(z_s, z_t, T)`` = ``T² · KL(softmax(z_t / T) || softmax(z_s / T))`` averaged
    over the examples, against ``distill.soft_target_kl`` (values and gradients)."""
    from labutils.distill import soft_target_kl

    _function(kd_loss, "kd_loss")
    g = _gen(1)
    cases = [(2 * torch.randn(8, 5, generator=g), 2 * torch.randn(8, 5, generator=g), T) for T in (1.0, 2.0, 4.0)]
    cases += [(torch.randn(2, 3, 6, generator=g), torch.randn(2, 3, 6, generator=g), 1.5),
              (torch.randn(5, 2, generator=g), torch.randn(5, 2, generator=g), 8.0),
              (60 * torch.randn(16, 10, generator=g), 60 * torch.randn(16, 10, generator=g), 1.0)]
    for z_s, z_t, T in cases:
        leaf = z_s.clone().requires_grad_(True)
        loss, call = _run(kd_loss, "kd_loss", leaf, z_t, T)
        loss = _scalar(loss, call)
        if not torch.isfinite(loss):
            raise _fail(call, f"the loss is {float(loss.detach())}: with confident logits softmax rounds to 0 and its log is "
                              "-inf; compute the log-probabilities with F.log_softmax")
        expected = soft_target_kl(z_s, z_t, T)
        mine = float(loss.detach())
        if abs(mine - float(expected)) > 1e-4 * max(abs(float(expected)), 1e-3):
            words = _kd_mistake(mine, z_s, z_t, T)
            raise _fail(call, words or f"{mine:.6f} is not T² KL(p_t || p_s) = {float(expected):.6f}"
                                       f"{_ratio_hint(mine, float(expected))}")
        if not loss.requires_grad:
            raise _fail(call, "the loss has no gradient with respect to the student's logits: do not detach them")
        (grad,) = torch.autograd.grad(loss, leaf)
        ref_leaf = z_s.clone().requires_grad_(True)
        (ref_grad,) = torch.autograd.grad(soft_target_kl(ref_leaf, z_t, T), ref_leaf)
        if not _same(grad, ref_grad, rtol=1e-4, atol=1e-7):
            raise _fail(call, "the value is right but the gradient is not soft_target_kl's: compute the loss from the "
                              "student's logits in one differentiable expression")
    return _ok("values and gradients equal distill.soft_target_kl for T = 1 to 8, [B, L, C] logits, two classes "
               "and confident logits")


def check_lab4_hidden_mse(hidden_mse: Callable) -> bool:
    """Exercise 2: ``hidden_mse(student_hidden, teacher_hidden, layer_map, attention_mask=None)`` against
    ``distill.hidden_state_mse``: padding left out, pairs (0, 0) and (i + 1, layer_map[i] + 1)."""
    from labutils.distill import hidden_state_mse, uniform_layer_map

    _function(hidden_mse, "hidden_mse")
    g = _gen(0)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 0]])
    teacher = [torch.randn(4, 7, 16, generator=g) for _ in range(7)]
    student = [h + 0.3 * torch.randn(4, 7, 16, generator=g) for h in teacher[::2]]
    for h in student:
        h[mask == 0] = 50.0
    flat_t = [torch.randn(5, 8, generator=g) for _ in range(5)]
    flat_s = [torch.randn(5, 8, generator=g) for _ in range(3)]
    small_t = [torch.randn(2, 4, 3, generator=g) for _ in range(3)]
    small_s = [torch.randn(2, 4, 3, generator=g) for _ in range(3)]
    bool_mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    cases = [(student, teacher, uniform_layer_map(3, 6), mask), (flat_s, flat_t, (1, 3), None),
             (flat_s, flat_t, (0, 3), None), (small_s, small_t, (0, 1), bool_mask), (small_s, small_t, (0, 1), None)]
    for s, t, layer_map, m in cases:
        leaves = [h.clone().requires_grad_(True) for h in s]
        hint = "without a mask (attention_mask=None) every position counts" if m is None else ""
        loss, call = _run(hidden_mse, "hidden_mse", leaves, t, layer_map, m, _hint=hint)
        loss = _scalar(loss, call)
        expected = hidden_state_mse(s, t, layer_map, attention_mask=None if m is None else m.long())
        if not _same(loss, expected, rtol=1e-5, atol=1e-7):
            words = _mistake(loss, _mse_mistakes(s, t, layer_map, m), rtol=1e-5, atol=1e-7)
            raise _fail(call, words or f"{float(loss):.6f}, expected {float(expected):.6f} (hidden_state_mse)"
                                       f"{_ratio_hint(float(loss), float(expected))}")
        if m is not None:
            loss.backward()
            if any(h.grad is None for h in leaves[:1]) or any(h.grad is not None and h.grad[m == 0].any() for h in leaves):
                raise _fail(call, "the padded positions get a gradient: they must not count at all")
    return _ok("equal to distill.hidden_state_mse with a 0/1 and a boolean mask, without one, on [B, H] states "
               "and other layer maps; the padding gets no gradient")


def _mse_mistakes(s: list, t: list, layer_map: tuple, mask: torch.Tensor | None) -> tuple:
    """Wrong answers to Exercise 2, lazily: each a (function, words)."""
    pairs = [(0, 0)] + [(i + 1, j + 1) for i, j in enumerate(layer_map)]

    def loss(pairs_used, reduce, combine=torch.mean):
        return lambda: combine(torch.stack([reduce((s[a] - t[b]) ** 2) for a, b in pairs_used]))

    def masked(divide):
        w = mask[:, :, None].float().expand_as(s[0])
        return lambda e: (e * w).sum() / divide(e, w)

    candidates = [
        (loss(pairs, torch.mean), "the padding counts: average over the real tokens only (attention_mask 1)"),
        (loss(pairs[1:], torch.mean) if mask is None else loss(pairs[1:], masked(lambda e, w: w.sum())),
         "the embeddings' pair (0, 0) is missing"),
        (loss([(0, 0)] + [(i + 1, j) for i, j in enumerate(layer_map)], torch.mean) if mask is None else
         loss([(0, 0)] + [(i + 1, j) for i, j in enumerate(layer_map)], masked(lambda e, w: w.sum())),
         "teacher layer layer_map[i] is hidden state layer_map[i] + 1 (hidden state 0 is the embeddings)"),
        (loss(pairs, torch.mean, torch.sum) if mask is None else loss(pairs, masked(lambda e, w: w.sum()), torch.sum),
         "summed over the pairs: average them"),
    ]
    if mask is not None:
        candidates += [
            (loss(pairs, masked(lambda e, w: e.numel())), "the padding counts in the mean: divide by H × (real tokens), "
                                                         "not by every position"),
            (loss(pairs, masked(lambda e, w: mask.sum())), "divide by H × (real tokens): the mean is over the H "
                                                          "features too"),
        ]
    return tuple(candidates)


class _MLP(nn.Module):
    """6 inputs -> ``width`` (GELU) -> 3 logits, weights drawn from ``seed`` at ``scale``."""

    def __init__(self, width: int, seed: int, scale: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, width), nn.GELU(), nn.Linear(width, 3))
        g = _gen(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(scale * torch.randn(p.shape, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _student() -> _MLP:
    return _MLP(8, seed=12, scale=0.3)


def check_lab4_distill(distill: Callable) -> bool:
    """Exercise 3: ``distill(student, teacher, x, steps, temperature, lr, batch_size, seed)`` trains the
    student on ``soft_target_kl`` of the teacher's logits, the lab's recipe, and leaves the teacher
    untouched, without gradients (a teacher and a student of the check's own)."""
    from labutils.distill import soft_target_kl

    _function(distill, "distill")
    x = torch.randn(120, 6, generator=_gen(1))
    teacher = _MLP(24, seed=11, scale=0.6)
    before = copy.deepcopy(teacher.state_dict())
    T, steps, lr, batch_size = 2.0, 5, 1e-2, 16

    def run(student: nn.Module, seed: int) -> list:
        return distill(student, teacher, x, steps=steps, temperature=T, lr=lr, batch_size=batch_size, seed=seed)

    call = f"distill(..., steps={steps}, temperature={T}, lr={lr}, batch_size={batch_size}) on the check's own models"
    _run(run, "distill", _student(), 3, _as=call)
    if any(not torch.equal(v, teacher.state_dict()[k]) for k, v in before.items()):
        raise _fail(call, "the teacher changed: give the optimizer student.parameters() only; the teacher is only run")
    if any(p.grad is not None for p in teacher.parameters()):
        raise _fail(call, "gradients reached the teacher: compute its logits under torch.no_grad()")

    def batch_loss(student: nn.Module, idx: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = teacher(x[idx])
        return soft_target_kl(student(x[idx]), target, T)

    def first_loss(student: nn.Module, idx: torch.Tensor, mine: float) -> str | None:
        with torch.no_grad():
            return _kd_mistake(mine, student(x[idx]), teacher(x[idx]), T)

    _check_training("distill", run, _student, batch_loss, len(x), steps=steps, lr=lr, batch_size=batch_size,
                    first_loss=first_loss, loss_words="soft_target_kl(student(x[batch]), teacher logits, temperature)")
    if any(p.grad is not None for p in teacher.parameters()):
        raise _fail(call, "gradients reached the teacher: compute its logits under torch.no_grad()")
    return _ok("the student trains on the teacher's soft targets exactly as the recipe says, reproducibly; the "
               "teacher is neither updated nor given gradients")
