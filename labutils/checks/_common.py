"""What every self-check shares: the error, number coercion, running the learner's code, and
the wording of shape, dtype and difference messages."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch


class ExerciseError(AssertionError):
    """An answer to an exercise is wrong; the message says how."""


def _filled(value: object, name: str) -> None:
    if value is None:
        raise ExerciseError(f"{name} is still None: fill in your answer, then run the check again")


def _number(value: object, name: str) -> float:
    _filled(value, name)
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ExerciseError(f"{name} must be a single number, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ExerciseError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(float(value)):
        raise ExerciseError(f"{name} must be finite, got {value}")
    return float(value)


def _integer(value: object, name: str) -> int:
    _filled(value, name)
    if isinstance(value, (np.integer, torch.Tensor)) and not isinstance(value, bool):
        value = value.item() if isinstance(value, torch.Tensor) else int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ExerciseError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    return int(value)


def _ratio_hint(mine: float, expected: float) -> str:
    """' (off by a factor 2)' and the like when mine/expected is a telling ratio, else ''."""
    if expected == 0 or mine == 0:
        return ""
    ratio = mine / expected
    for factor, words in ((2.0, "2"), (0.5, "1/2"), (-1.0, "-1 (sign flipped)"), (4.0, "4"), (0.25, "1/4"),
                          (9.0, "9"), (1 / 9, "1/9")):
        if math.isclose(ratio, factor, rel_tol=1e-3):
            return f" (off by a factor {words})"
    return f" (yours is {ratio:.3g} x the expected value)"


def _gen(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``: the checks' inputs are the same on every machine."""
    return torch.Generator().manual_seed(seed)


def _ok(message: str) -> bool:
    print(f"correct: {message}")
    return True


# --------------------------------------------------------------------------- the learner's code


def _function(fn: object, name: str) -> None:
    """``fn`` is the learner's function (or class) itself, not None and not its result."""
    _filled(fn, name)
    if not callable(fn):
        raise ExerciseError(f"{name} must be your function itself (pass {name}, not {name}(...)), "
                            f"got {type(fn).__name__}")


def _show(value: Any) -> str:
    """A short description of an argument: tensors and arrays by dtype and shape."""
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).removeprefix('torch.')} tensor {list(value.shape)}"
    if isinstance(value, np.ndarray):
        return f"{value.dtype} array {list(value.shape)}"
    if isinstance(value, torch.nn.Module):
        return f"<{type(value).__name__}>"
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.Tensor):
        return f"[{len(value)} tensors {list(value[0].shape)}]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: ..." for k in list(value)[:3]) + (", ...}" if len(value) > 3 else "}")
    text = value.__name__ if callable(value) and hasattr(value, "__name__") else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _call_text(name: str, args: tuple, kwargs: dict) -> str:
    shown = [_show(a) for a in args] + [f"{k}={_show(v)}" for k, v in kwargs.items()]
    return f"{name}({', '.join(shown)})"


def _run(fn: Callable, name: str, *args: Any, _as: str | None = None, _hint: str = "", **kwargs: Any) -> tuple[Any, str]:
    """``(fn(*args, **kwargs), a description of the call)``; what the call raises becomes an
    :class:`ExerciseError` that names the call (``_as`` replaces the description, ``_hint`` is
    added to the message of an error)."""
    call = _as or _call_text(name, args, kwargs)
    hint = f" ({_hint})" if _hint else ""
    try:
        return fn(*args, **kwargs), call
    except ExerciseError:
        raise
    except NotImplementedError:
        raise ExerciseError(f"{call} raised NotImplementedError: replace `raise NotImplementedError()` by your "
                            "code, run that cell, then this one") from None
    except Exception as err:
        raise ExerciseError(f"{call} raised {type(err).__name__}: {err}{hint}") from err


def _fail(call: str, message: str) -> ExerciseError:
    """The error to raise for ``call``: ``raise _fail(call, "what is wrong")``."""
    return ExerciseError(f"{call}: {message}")


def _parts(value: Any, call: str, names: tuple[str, ...]) -> tuple:
    """The learner's function returned ``len(names)`` values (a tuple or list of them)."""
    if len(names) == 1:
        return (value,)
    if not isinstance(value, (tuple, list)) or len(value) != len(names):
        raise _fail(call, f"return {len(names)} values, ({', '.join(names)}); got {_show(value)}")
    return tuple(value)


_ARRAY_KINDS = {torch.Tensor: "a torch.Tensor", np.ndarray: "a numpy array"}


def _typed(value: Any, call: str, what: str, kind: type, *, dtype: Any = None, shape: Iterable[int] | None = None):
    """``value`` is a tensor (``kind`` torch.Tensor) or an array (np.ndarray) of ``dtype`` and ``shape``."""
    if value is None:
        raise _fail(call, f"{what} is None: return it")
    if not isinstance(value, kind):
        other = next((words for k, words in _ARRAY_KINDS.items() if isinstance(value, k)), type(value).__name__)
        raise _fail(call, f"{what} must be {_ARRAY_KINDS[kind]}, got {other}")
    if dtype is not None and value.dtype != dtype:
        want = str(dtype).removeprefix("torch.") if kind is torch.Tensor else np.dtype(dtype).name
        convert = f".to({dtype})" if kind is torch.Tensor else f".astype(np.{want})"
        raise _fail(call, f"{what} must be {want}, got {str(value.dtype).removeprefix('torch.')} (convert with {convert})")
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise _fail(call, f"{what} must have shape {list(shape)}, got {list(value.shape)}")
    return value


def _where(mine: Any, expected: Any) -> str:
    """'at 3 of 40 positions, e.g. [0, 5]: yours 4, expected 3' for two same-shape tensors or arrays."""
    a, b = (np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v) for v in (mine, expected))
    if a.dtype.kind == "f" or b.dtype.kind == "f":
        differ = ~np.isclose(a.astype(np.float64), b.astype(np.float64), rtol=1e-4, atol=1e-6, equal_nan=True)
    else:
        differ = a != b
    if not differ.any():
        return "nowhere"
    first = tuple(int(i) for i in np.argwhere(differ)[0])
    index = list(first) if len(first) != 1 else first[0]
    return (f"at {int(differ.sum())} of {differ.size} positions, e.g. [{index if isinstance(index, int) else ', '.join(map(str, index))}]: "
            f"yours {a[first]}, expected {b[first]}")


def _same(mine: Any, expected: Any, *, rtol: float = 1e-5, atol: float = 1e-7) -> bool:
    """Equal shapes and values (close for floats, exact otherwise); tensors or arrays."""
    if isinstance(mine, torch.Tensor) and isinstance(expected, torch.Tensor):
        if mine.shape != expected.shape:
            return False
        mine, expected = mine.detach().cpu(), expected.detach().cpu()
        if mine.is_floating_point() or expected.is_floating_point():
            return torch.allclose(mine.double(), expected.double(), rtol=rtol, atol=atol)
        return torch.equal(mine.long(), expected.long())
    a, b = np.asarray(mine), np.asarray(expected)
    if a.shape != b.shape:
        return False
    if a.dtype.kind == "f" or b.dtype.kind == "f":
        return bool(np.allclose(a.astype(np.float64), b.astype(np.float64), rtol=rtol, atol=atol))
    return bool(np.array_equal(a, b))


def _mistake(mine: Any, candidates: Iterable[tuple[Callable[[], Any], str]], **tolerance: float) -> str | None:
    """The words of the first candidate ``(make_wrong_answer, words)`` that ``mine`` equals, else None.

    The wrong answers are made lazily, only when an answer is wrong; one that cannot be made
    (an error) is passed over."""
    for make, words in candidates:
        try:
            wrong = make()
        except Exception:  # noqa: BLE001 - a wrong variant that does not apply to these inputs
            continue
        if _same(mine, wrong, **tolerance):
            return words
    return None


# --------------------------------------------------------------------------- shared diagnoses


def _kd_reference(z_student: torch.Tensor, z_teacher: torch.Tensor, temperature: float) -> float:
    """T² · KL(softmax(z_t / T) || softmax(z_s / T)), averaged over the rows: the loss the book
    trains with, ``labutils.distill.soft_target_kl``."""
    from labutils.distill import soft_target_kl  # imported here: the other checks need no training code

    with torch.no_grad():
        return float(soft_target_kl(z_student, z_teacher, temperature))


def _kd_mistake(mine: float, z_student: torch.Tensor, z_teacher: torch.Tensor, temperature: float) -> str | None:
    """What a wrong soft-target loss ``mine`` of these logits is, in words, or None."""
    T = float(temperature)
    expected = _kd_reference(z_student, z_teacher, T)
    rows = z_student.reshape(-1, z_student.shape[-1]).shape[0]
    candidates = (
        (_kd_reference(z_teacher, z_student, T), "KL the wrong way round: the expectation is under the teacher, KL(p_t || p_s)"),
        (expected / T**2, f"missing the T^2 factor (off by a factor {T**2:g})"),
        (expected / T, f"multiplied by T, not T^2 (off by a factor {T:g})"),
        (expected * rows, "summed over the rows: average them"),
        (_kd_reference(z_student, z_teacher, 1.0) * T**2, "the logits are not divided by the temperature T"),
        (_kd_reference(z_student, z_teacher, 1.0), f"the temperature is not used: here T = {T:g} (divide the logits "
                                                   "by T, multiply the KL by T²)"),
    )
    for wrong, words in candidates:
        if not math.isclose(wrong, expected, rel_tol=1e-4) and math.isclose(mine, wrong, rel_tol=1e-4, abs_tol=1e-9):
            return words
    return None


# --------------------------------------------------------------------------- training loops


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _reference_training(model: torch.nn.Module, batch_loss: Callable, n: int, *, steps: int, lr: float,
                        batch_size: int, seed: int, zero_grad: bool = True) -> list[float]:
    """The labs' recipe: Adam on ``model.parameters()``, and at every step the batch
    ``torch.randint(n, (batch_size,), generator=g)`` from one generator seeded with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = batch_loss(model, torch.randint(n, (batch_size,), generator=generator))
        if zero_grad:
            optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def _check_training(name: str, run: Callable, make_model: Callable, batch_loss: Callable, n: int, *, steps: int,
                    lr: float, batch_size: int, loss_words: str, first_loss: Callable | None = None,
                    seed: int = 3) -> None:
    """The learner's training function, ``run(model, seed) -> losses``, against the recipe.

    ``first_loss(model, first_batch, mine)`` may name what a wrong first loss is."""
    call = f"{name}(..., steps={steps}, lr={lr}, batch_size={batch_size}, seed={seed}) on the check's own small model"
    model = make_model()
    start = _flat(model)
    losses, _ = _run(run, name, model, seed, _as=call)
    if not isinstance(losses, (list, tuple)) or len(losses) != steps:
        raise _fail(call, f"return the loss of every step: a list of {steps} floats, got {_show(losses)}")
    if any(isinstance(v, torch.Tensor) for v in losses):
        raise _fail(call, "append float(loss) (or loss.item()), not the loss tensor itself")
    if not all(isinstance(v, float) for v in losses):
        raise _fail(call, f"the losses must be Python floats, got {[type(v).__name__ for v in losses]}")
    if torch.equal(_flat(model), start):
        raise _fail(call, "the model's parameters did not change: call optimizer.step() after loss.backward(), "
                          "and train the model passed in (in place)")
    again, other = make_model(), make_model()
    _run(run, name, again, seed, _as=call)
    if not torch.equal(_flat(again), _flat(model)):
        raise _fail(call, "two runs with the same seed train differently: draw every batch from one "
                          "torch.Generator seeded with seed (torch.randint(..., generator=g)), not from the global one")
    _run(run, name, other, seed + 1, _as=call.replace(f"seed={seed}", f"seed={seed + 1}"))
    if torch.equal(_flat(other), _flat(model)):
        raise _fail(call, "another seed trains identically: seed the batches' generator with the seed argument")
    ref = make_model()
    ref_losses = _reference_training(ref, batch_loss, n, steps=steps, lr=lr, batch_size=batch_size, seed=seed)
    recipe = ("the batch is torch.randint(len(x), (batch_size,), generator=g), with g = "
              "torch.Generator().manual_seed(seed) made once before the loop")
    if abs(losses[0] - ref_losses[0]) > 1e-5 * max(1.0, abs(ref_losses[0])):
        first = torch.randint(n, (batch_size,), generator=torch.Generator().manual_seed(seed))
        words = first_loss(make_model(), first, losses[0]) if first_loss else None
        raise _fail(call, f"the first step's loss is {losses[0]:.6f}, expected {ref_losses[0]:.6f}: "
                          f"{words or recipe + '; the loss is ' + loss_words}")
    if not _same(_flat(model), _flat(ref), rtol=1e-4, atol=1e-6):
        piled = make_model()
        _reference_training(piled, batch_loss, n, steps=steps, lr=lr, batch_size=batch_size, seed=seed, zero_grad=False)
        if _same(_flat(model), _flat(piled), rtol=1e-4, atol=1e-6):
            raise _fail(call, "the gradients pile up from step to step: call optimizer.zero_grad() before loss.backward()")
        raise _fail(call, "the first step's loss is right, but the training then differs from the recipe: "
                          "torch.optim.Adam(model.parameters(), lr=lr), made once, and a new batch from the same "
                          "generator at every step")
