"""Self-checks for Lab 3, the straight-through estimator and QAT (``labs/source/lab03_ste_qat``).

The checks compare values *and* gradients with ``labutils.quant`` and ``labutils.bitlinear``, on
float64, 3-D and all-zero inputs, and train a small network of their own for ``fit``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from labutils import quant
from labutils.checks._common import (
    _check_training,
    _fail,
    _function,
    _gen,
    _mistake,
    _ok,
    _run,
    _same,
    _typed,
    _where,
)

__all__ = [
    "check_lab3_sign_ste",
    "check_lab3_fake_quantizers",
    "check_lab3_fake_quant_linear",
    "check_lab3_ptq_qat",
]


def _grad_of(fn: Callable, name: str, x: torch.Tensor, upstream: torch.Tensor, *args) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(value, dL/dx for L = sum(value * upstream), call) of the learner's ``fn(x, *args)``."""
    leaf = x.detach().clone().requires_grad_(True)
    out, call = _run(fn, name, leaf, *args)
    _typed(out, call, "the result", torch.Tensor, dtype=x.dtype, shape=x.shape)
    if not out.requires_grad:
        raise _fail(call, "no gradient reaches the input: the straight-through term must keep it in the graph")
    try:
        (grad,) = torch.autograd.grad((out * upstream).sum(), leaf)
    except RuntimeError as err:
        raise _fail(call, f"the backward pass failed: {err}") from err
    return out.detach(), grad, call


def check_lab3_sign_ste(sign_ste: Callable) -> bool:
    """Exercise 1: ``sign_ste(x, clip)`` (``SignSTE.apply``): sign(x) with sign(0) = +1 in x's dtype;
    backward ``dL/dq · 1[|x| <= 1]`` (clip) or ``dL/dq`` (no clip)."""
    _function(sign_ste, "sign_ste")
    x = 2 * torch.randn(5, 8, generator=_gen(1), dtype=torch.float64)
    x[0, :4] = torch.tensor([1.0, -1.0, 0.0, -0.0], dtype=torch.float64)
    upstream = torch.randn(5, 8, generator=_gen(2), dtype=torch.float64)
    for inputs in (x, x.float()):
        up = upstream.to(inputs.dtype)
        for clip in (True, False):
            value, grad, call = _grad_of(sign_ste, "sign_ste", inputs, up, clip)
            expected = torch.where(inputs >= 0, 1.0, -1.0).to(inputs.dtype)
            if not torch.equal(value, expected):
                if (value == 0).any():
                    raise _fail(call, "some values are 0: torch.sign(0) is 0, but the forward pass maps 0 to +1 "
                                      "(torch.where(x >= 0, 1.0, -1.0))")
                raise _fail(call, f"the value is not sign(x) {_where(value, expected)}")
            keep = (inputs.abs() <= 1).to(inputs.dtype)
            want = up * keep if clip else up
            if torch.equal(grad, want):
                continue
            words = _mistake(grad, (
                (lambda: up, "the gradient passes where |x| > 1: with clip=True multiply by the mask 1[|x| <= 1]"),
                (lambda: up * (inputs.abs() < 1).to(inputs.dtype), "the mask drops |x| = 1: keep it, 1[|x| <= 1]"),
                (lambda: keep if clip else torch.ones_like(up),
                 "the incoming gradient is dropped: return grad_output times the mask, not the mask"),
                (lambda: up * keep, "clip=False is the identity STE: return grad_output unchanged"),
            ))
            raise _fail(call, words or f"wrong gradient {_where(grad, want)}")
    return _ok("value sign(x) with sign(0) = +1 in float32 and float64; gradient dL/dq · 1[|x| <= 1] with clip, "
               "dL/dq without")


def check_lab3_fake_quantizers(ternary_ste: Callable, activation_ste: Callable) -> bool:
    """Exercise 2: the fake quantizers ``ternary_ste(w)`` (absmean ternary) and ``activation_ste(x, bits)``
    (per-token absmax) have the values of ``quant`` and the identity STE gradient."""
    _function(ternary_ste, "ternary_ste")
    _function(activation_ste, "activation_ste")
    g = _gen(2)
    for w in (0.02 * torch.randn(32, 48, generator=g), torch.randn(4, 6, 5, generator=g),
              1e-7 * torch.randn(40, 30, generator=g), torch.zeros(3, 4)):
        up = torch.randn(w.shape, generator=g)
        value, grad, call = _grad_of(ternary_ste, "ternary_ste", w, up)
        codes, gamma = quant.ternarize_absmean(w)
        expected = codes * gamma
        if not _same(value, expected, rtol=1e-5, atol=1e-15):
            words = _mistake(value, (
                (lambda: quant.ternarize_absmean(w)[0] * w.abs().amax(), "the scale is max|w|; BitNet b1.58 uses gamma = mean|w|"),
                (lambda: torch.round(torch.clamp(w / w.abs().amax(), -1, 1)) * w.abs().amax(),
                 "the scale is max|w|; BitNet b1.58 uses gamma = mean|w|"),
                (lambda: codes.float(), "return codes · gamma, not the codes"),
                (lambda: w, "the value is w itself: return w + (w_q - w).detach()"),
                (lambda: torch.round(torch.clamp(w / gamma, -1, 1)) * gamma, "divide by gamma + eps, not gamma"),
            ), rtol=1e-5, atol=1e-15)
            raise _fail(call, words or f"values differ from quant.ternarize_absmean's codes · gamma {_where(value, expected)}")
        if not torch.isfinite(value).all():
            raise _fail(call, "the values are not finite: an all-zero w must give zeros (eps in the division)")
        if not torch.allclose(grad, up):
            raise _fail(call, "the gradient is not the identity STE's dL/dw = dL/dw_q: use w + (w_q - w).detach(), with "
                              "the scale computed from w.detach()")
    x = torch.randn(2, 5, 24, generator=g) * torch.logspace(-2, 1, 5)[:, None]
    x[1, 3] = 0.0
    for inputs, bits in ((x[0], 8), (x, 8), (x, 4), (x, 2)):
        up = torch.randn(inputs.shape, generator=g)
        value, grad, call = _grad_of(activation_ste, "activation_ste", inputs, up, bits)
        if not torch.isfinite(value).all():
            raise _fail(call, "NaN values: an all-zero token divides 0 by 0; floor max|x| at eps (clamp_min(eps)) "
                              "before dividing by Qp")
        codes, scale = quant.quantize_activations_absmax(inputs, bits)
        expected = codes * scale
        if not _same(value, expected, rtol=1e-5, atol=1e-6):
            qp = 2 ** (bits - 1) - 1
            words = _mistake(value, (
                (lambda: quant.fake_quantize(inputs, bits), "one scale for the whole tensor: every token (last dim) needs its own"),
                (lambda: quant.fake_quantize(inputs, bits, granularity="channel", axis=inputs.dim() - 1),
                 "one scale per feature: take max|x| over the last dim, one scale per token"),
                (lambda: torch.clamp(torch.round(inputs / (inputs.abs().amax(dim=1, keepdim=True).clamp_min(1e-5) / qp)), -qp, qp)
                 * (inputs.abs().amax(dim=1, keepdim=True).clamp_min(1e-5) / qp),
                 "max|x| over dim 1: right for 2-D x only; reduce over the last dim (dim=-1)"),
            ), rtol=1e-5, atol=1e-6)
            raise _fail(call, words or f"values differ from quant.quantize_activations_absmax {_where(value, expected)}")
        if not torch.allclose(grad, up):
            raise _fail(call, "the gradient is not the identity STE's dL/dx = dL/dx_q: use x + (x_q - x).detach()")
    return _ok("ternary_ste and activation_ste equal quant's codes · scale (3-D, 2 to 8 bits, tiny and all-zero "
               "inputs), with the identity STE gradient")


def _per_token(x: torch.Tensor, bits: int) -> torch.Tensor:
    codes, scale = quant.quantize_activations_absmax(x, bits)
    return codes * scale


def check_lab3_fake_quant_linear(FakeQuantLinear: type) -> bool:  # noqa: N803 - the learner's class name
    """Exercise 3: ``FakeQuantLinear(in, out, bias, act_bits)`` computes, and back-propagates, what
    ``BitLinear(in, out, bias, config=BitNetConfig(weight_bits=1.58, act_bits=act_bits, norm=None))`` does."""
    from labutils.bitlinear import BitLinear, BitNetConfig

    _function(FakeQuantLinear, "FakeQuantLinear")
    g = _gen(2)
    flat = torch.randn(16, 24, generator=g)
    tokens = torch.randn(3, 5, 24, generator=g) * torch.logspace(-1, 1, 5)[:, None]
    for x, act_bits, bias in ((flat, 8, True), (tokens, 8, True), (tokens, 4, False), (tokens, None, True)):
        with torch.random.fork_rng():
            torch.manual_seed(3)
            mine, call = _run(FakeQuantLinear, "FakeQuantLinear", 24, 10, bias=bias, act_bits=act_bits)
        ref = BitLinear(24, 10, bias=bias, config=BitNetConfig(weight_bits=1.58, act_bits=act_bits, norm=None))
        ref.load_state_dict(mine.state_dict())
        x_mine, x_ref = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        y, call = _run(mine, f"FakeQuantLinear(24, 10, bias={bias}, act_bits={act_bits})", x_mine)
        call = f"{call} [a {'2' if x.dim() == 2 else '3'}-D input]"
        y_ref = ref(x_ref)
        _typed(y, call, "the output", torch.Tensor, dtype=torch.float32, shape=y_ref.shape)
        if not _same(y, y_ref, rtol=1e-4, atol=1e-5):
            w_q = ref.quantized_weight()
            w_q = (w_q[0] * w_q[1]).detach()
            b = ref.bias.detach() if bias else 0.0
            qx = _per_token(x, act_bits) if act_bits else x
            words = _mistake(y, (
                (lambda: y_ref - ref.bias, "the bias is missing: F.linear(x, w, self.bias)"),
                (lambda: F.linear(x, w_q) + b, "x is not quantized: fake-quantize it per token with act_bits bits "
                                               "(leave it as it is only when act_bits is None)"),
                (lambda: F.linear(qx, ref.weight) + b, "W is not quantized: absmean ternary weights, codes · gamma"),
                (lambda: F.linear(_per_token(x, 8), w_q) + b,
                 "act_bits=None means full-precision activations, and other widths their own Qp"),
            ), rtol=1e-4, atol=1e-5)
            if words is None and x.dim() == 3:
                words = "right for 2-D inputs, wrong for [batch, tokens, features]: every token (the last dim) has its own scale"
            raise _fail(call, words or f"the output differs from BitLinear's {_where(y, y_ref)}")
        up = torch.randn(y_ref.shape, generator=_gen(7))
        (y * up).sum().backward()
        (y_ref * up).sum().backward()
        grads = {"input": (x_mine.grad, x_ref.grad)}
        grads.update({name: (dict(mine.named_parameters())[name].grad, p.grad) for name, p in ref.named_parameters()})
        for name, (a, b) in grads.items():
            if a is None:
                raise _fail(call, f"no gradient reaches the {name}: use the detach trick for both quantizers")
            if not _same(a, b, rtol=1e-4, atol=1e-5):
                raise _fail(call, f"the gradient of the {name} differs from BitLinear's (identity STE for both "
                                  f"quantizers, scales from .detach()) {_where(a, b)}")
    return _ok("outputs and the gradients of weight, bias and input equal BitLinear's (2-D and 3-D inputs, "
               "8-bit, 4-bit and float activations, with and without bias)")


class _Net(nn.Module):
    """The check's own small classifier: hidden ``layers`` and a head named ``classifier``."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(6, 16), nn.Linear(16, 16)])
        self.classifier = nn.Linear(16, 3)
        g = _gen(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.4 * torch.randn(p.shape, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = F.gelu(layer(x))
        return self.classifier(x)


def check_lab3_ptq_qat(fit: Callable, post_training_quantize: Callable) -> bool:
    """Exercise 4: ``fit`` follows the recipe (Adam, cross-entropy, one seeded generator for the
    batches) on a small network of the check's own; ``post_training_quantize(model, bits)`` is a
    copy with BitLinear hidden layers, ``BitNetConfig(weight_bits=bits, act_bits=8, norm=None)``."""
    from labutils.bitlinear import BitLinear, BitNetConfig, quantize_

    _function(fit, "fit")
    _function(post_training_quantize, "post_training_quantize")
    x = torch.randn(200, 6, generator=_gen(1))
    y = (x[:, :3] * x[:, 3:]).argmax(dim=-1)
    for bits in (1.58, 1):
        model = _Net()
        before = copy.deepcopy(model.state_dict())
        quantized, call = _run(post_training_quantize, "post_training_quantize", model, bits)
        if not isinstance(quantized, nn.Module):
            raise _fail(call, f"return the quantized copy of the model, got {type(quantized).__name__}")
        if any(isinstance(m, BitLinear) for m in model.modules()) or quantized is model:
            raise _fail(call, "the original model was quantized in place: quantize a copy.deepcopy(model)")
        if any(not torch.equal(v, model.state_dict()[k]) for k, v in before.items()):
            raise _fail(call, "the original model's weights changed: leave the model as it is")
        layers = [m for m in quantized.modules() if isinstance(m, BitLinear)]
        if len(layers) != 2:
            raise _fail(call, f"the 2 hidden layers must be BitLinear, found {len(layers)} BitLinear layers")
        want = BitNetConfig(weight_bits=bits, act_bits=8, norm=None)
        if any(m.config != want for m in layers):
            got = next(m.config for m in layers if m.config != want)
            if got.weight_bits != bits:
                raise _fail(call, f"the layers have weight_bits={got.weight_bits}: it must be the bits argument, {bits}")
            raise _fail(call, f"the layers' config must be BitNetConfig(weight_bits={bits}, act_bits=8, norm=None), got "
                              f"act_bits={got.act_bits}, norm={got.norm!r}")
        if type(quantized.classifier) is not nn.Linear:
            raise _fail(call, "the head, classifier, stays a full-precision nn.Linear (quantize_ skips it by default)")
        ref = copy.deepcopy(model)
        quantize_(ref, want)
        with torch.no_grad():
            if not _same(quantized(x), ref(x), rtol=1e-5, atol=1e-6):
                raise _fail(call, "the quantized copy computes something else than quantize_(copy, config): "
                                  "keep the trained latent weights")

    def batch_loss(net: nn.Module, idx: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(net(x[idx]), y[idx])

    def first_loss(net: nn.Module, idx: torch.Tensor, mine: float) -> str | None:
        with torch.no_grad():
            if abs(mine - float(F.cross_entropy(net(x), y))) < 1e-5:
                return "that is the loss on the whole x: draw a batch of batch_size indices at every step"
        return None

    _check_training("fit", lambda net, seed: fit(net, x, y, steps=6, lr=1e-2, batch_size=16, seed=seed),
                    _Net, batch_loss, len(x), steps=6, lr=1e-2, batch_size=16, first_loss=first_loss,
                    loss_words="F.cross_entropy(model(x[batch]), y[batch])")
    return _ok("post_training_quantize copies and quantizes the hidden layers (1.58 and 1 bit); fit trains "
               "exactly as the recipe says, reproducibly")
