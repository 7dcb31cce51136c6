"""The labs' self-checks (``labutils/checks/lab01.py`` ... ``lab08.py``), as the labs call them.

Each lab's source notebook is executed in this process (its setup, answer and self-check cells;
not the graded tests), and then:

- every self-check cell accepts the instructor's solution;
- every planted bug of ``tests/lab_bugs`` (the ones the visible tests catch *and* the ones only
  the hidden tests catch) makes its exercise's self-check fail, with the message written next to
  it in ``BUG_MESSAGES`` below;
- more typical mistakes (``MISTAKES``) are named by their own messages;
- in the student version (``labs/release``), where every answer still raises
  ``NotImplementedError``, every self-check says so instead of crashing.
"""

from __future__ import annotations

import contextlib
import io
import re
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest
import torch
from lab_bugs import Bug

from labutils import checks
from labutils.checks import ExerciseError

ROOT = Path(__file__).resolve().parents[1]
LABS = sorted(p.name for p in (ROOT / "labs" / "source").iterdir() if p.is_dir() and not p.name.startswith("."))


@dataclass(frozen=True)
class Mistake(Bug):
    """A bug with the words its self-check must say (a regular expression)."""

    match: str = ""


# What each planted bug of tests/lab_bugs must be told: {lab: {(cell, new): regex}}.
BUG_MESSAGES = {
    "lab01_quantization": {
        ("ex1-answer", "qp = 2 ** (bits - 1)"): r"reach ±8: at 4 bits Qp = 2\^\(b-1\) - 1 = 7",
        ("ex2-answer", "scale = ((hi - lo) / 2**bits)"): r"2\^b - 1 = 15 steps, not by 2\^b = 16 levels",
        ("ex3-answer", "amax(dim=0, keepdim=True)"): "one scale per column; reduce over dim 1",
        ("ex4-answer", "20.0 * torch.log10"): "20·log10: the SQNR is a ratio of powers",
        ("ex1-answer", "qp = 7"): r"the 4-bit Qp, at bits=2: compute Qp",
        ("ex2-answer", "lo = x.min()"): "the range must include 0",
        ("ex3-answer", "qp = 7"): r"the 4-bit Qp, at bits=2",
        ("ex4-answer", 'granularity = "tensor"'): "per_channel=True must use one scale per row",
    },
    "lab02_binary_ternary": {
        ("ex1-answer", "return codes, w.abs().max()"): r"max\|w\| \(absmax\)",
        ("ex2-answer", "torch.round(w / (gamma + eps))"): r"clip w / \(gamma \+ eps\) to \[-1, 1\]",
        ("ex3-answer", "energy = torch.tensor(float(c.numel()))"): "not by the number of weights",
        ("ex4-answer", "kept = w.abs() > t"): r"the threshold is t · mean\|w\|, not t itself",
        ("ex1-answer", "torch.sign(w)"): r"torch.sign\(0\) is 0",
        ("ex2-answer", "gamma = w.abs().mean(dim=0).reshape(-1, 1)"): "the columns' means; reduce over dim 1",
        ("ex3-answer", "if False:"): "every code is 0: return 0.0",
        ("ex4-answer", "scale = w.abs()[kept].mean()"): "no weight is kept: return the scale 0.0",
    },
    "lab03_ste_qat": {
        ("ex1-answer", "return grad_output, None"): r"passes where \|x\| > 1",
        ("ex2-answer", "gamma = w.detach().abs().amax()"): r"max\|w\|; BitNet b1.58 uses gamma = mean\|w\|",
        ("ex3-answer", "return F.linear(x, w)"): "the bias is missing",
        ("ex4-answer", "BitNetConfig(weight_bits=8, act_bits=8"): "it must be the bits argument, 1.58",
        ("ex1-answer", "return keep, None"): "the incoming gradient is dropped",
        ("ex2-answer", " / qp"): "an all-zero token divides 0 by 0",
        ("ex3-answer", "amax(dim=1, keepdim=True)"): r"right for 2-D inputs, wrong for \[batch, tokens, features\]",
        ("ex4-answer", "quantized = model"): "quantized in place",
    },
    "lab04_distillation": {
        ("ex1-answer", "return kl.mean()"): r"missing the T\^2 factor",
        ("ex2-answer", "losses.append((err * weight).sum() / err.numel())"): "the padding counts in the mean",
        ("ex3-answer", "pass  # no update"): r"did not change: call optimizer.step\(\)",
        ("ex1-answer", "log_p_s = torch.log(torch.softmax(student_logits / temperature, dim=-1))"): "F.log_softmax",
        ("ex2-answer", "if False:"): r"without a mask \(attention_mask=None\) every position counts",
        ("ex3-answer", "teacher_logits = teacher(x[idx])"): r"under torch.no_grad\(\)",
    },
    "lab05_packing": {
        ("ex1-answer", "<< np.arange(7, -1, -1, dtype=np.uint8)).sum"): "0x39.*reverse order",
        ("ex2-answer", "<< np.array([6, 4, 2, 0], dtype=np.uint8)"): "0x46.*reverse order in the byte",
        ("ex3-answer", "(q * 256 // 243)"): r"round up: \(256 q \+ 242\) // 243",
        ("ex4-answer", "weight_bytes(n, variant)"): r"add one float32 scale \(4 bytes\)",
        ("ex1-answer", "np.pad(bits, (0, -len(bits) % 8), constant_values=1)"): "pad the last byte with 0 bits",
        ("ex2-answer", "constant_values=0)"): r"pad with zero weights \(code 01\)",
        ("ex3-answer", "constant_values=0)"): r"pad with zero weights \(digit 1\)",
        ("ex4-answer", "if False:"): "the int64 buffer keeps its own size",
    },
    "lab06_kernels": {
        ("ex1-answer", "((x >> np.uint64(1)) & m2)"): "check the masks and shifts",
        ("ex2-answer", "return k - differ"): "the dot is K - 2d",
        ("ex3-answer", "weight = 128 if j == 7 else 1 << j"): "the top bit weighs -128",
        ("ex4-answer", "out[r] = acc"): r"subtract Σ x_k",
        ("ex1-answer", "return ((x * h01) >> np.uint64(56)) & np.uint64(63)"): "the count 64 needs 7 bits",
        ("ex2-answer", "return 64 * a_words.shape[0] - 2 * differ"): "count K products, not 64 × words",
        ("ex3-answer", "padded = np.ones("): "the padding bits .* must be 0",
        ("ex4-answer", "for i in range(0):"): "the last byte of a row holds K mod 4",
    },
    "lab07_benchmark": {
        ("ex1-answer", "layers * batch * heads"): r"count both products, Q·Kᵀ and P·V",
        ("ex2-answer", 'table["int8"]["mul"] + table["int8"]["add"]'): "accumulates in int32",
        ("ex3-answer", 'timings["candidate"].median / timings["baseline"].median'): "upside down",
        ("ex4-answer", "per_round = [min(base.seconds) / max(other.seconds), max(base.seconds) / min(other.seconds)]"):
            "any baseline run against any candidate run, unpaired",
        ("ex5-answer", "else teacher - student"): "a fraction; give percent",
        ("ex1-answer", "h * 2"): "config.num_labels = 3 outputs, not 2",
        ("ex2-answer", 'linear_mac_pj("fp32", 1.0, measure.ENERGY_PJ)'): "read the fp32 energies from table",
        ("ex3-answer", 'timings["baseline"].best / timings["candidate"].best'): "the ratio of the best runs",
        ("ex4-answer", "if low >= 1.0:"): "a round at exactly 1.0 is no faster",
        ("ex5-answer", "lambda v: v > 10.0"): "a target met exactly is met",
    },
    "lab08_language_model": {
        ("ex1-answer", "torch.rsqrt(mean_square + eps)"): "multiply by weight",
        ("ex2-answer", "first * cos + second * sin"): "not a rotation",
        ("ex3-answer", "/ q.shape[-1]"): r"1/sqrt\(d_h\), not 1/d_h",
        ("ex4-answer", "logits = model(torch.cat(tokens, dim=1))[:, -1]"): "with a KV cache it needs",
        ("ex1-answer", "mean_square + 1e-5"): "use the eps argument",
        ("ex2-answer", "torch.arange(half, dtype=torch.float64) / d"): r"θ\^\(-2i/d\), not",
        ("ex3-answer", ".tril()"): "the mask ignores the cached positions",
        ("ex4-answer", "KVCache(model.config, 1,"): "make the KVCache for the prompt's batch",
        ("ex5-answer", "self.scaling = alpha"): r"scaled by alpha; the update is \(alpha / rank\)",
        ("ex5-answer", "self.base = base\n        base.weight.requires_grad_(False)"): "its own RMSNorm",
    },
}

# More typical mistakes than the planted bugs, each with the words its self-check must say.
MISTAKES = {
    "lab01_quantization": [
        Mistake("ex1-answer", "torch.clamp(torch.round(x / scale), -qp, qp)", "torch.clamp(torch.trunc(x / scale), -qp, qp)",
                match="truncated toward 0"),
        Mistake("ex1-answer", ".clamp_min(torch.finfo(torch.float32).tiny)", "", match="keep it above zero"),
        Mistake("ex1-answer", "return codes.to(torch.float32) * scale", "return codes.to(torch.float32)",
                match="multiply the codes by the scale"),
        Mistake("ex2-answer", "return codes, scale.to(torch.float32), zero_point",
                "return codes, scale.to(torch.float32), torch.tensor(zero_point)", match="must be a Python int"),
        Mistake("ex2-answer", "return (codes.to(torch.float32) - zero_point) * scale",
                "return codes.to(torch.float32) * scale", match="subtract the zero point"),
        Mistake("ex3-answer", "amax(dim=1, keepdim=True)", "amax(dim=1)", match="keepdim=True"),
        Mistake("ex4-answer", "return float(10.0 * torch.log10(signal / noise))",
                "return 10.0 * torch.log10(signal / noise)", match="return a Python float"),
        Mistake("ex4-answer", "10.0 * torch.log10(signal / noise)", "10.0 * torch.log10(noise / signal)",
                match="upside down"),
    ],
    "lab02_binary_ternary": [
        Mistake("ex1-answer", "return codes, w.abs().mean()", "return codes, w.mean()", match=r"the mean of w, not of \|w\|"),
        Mistake("ex1-answer", "torch.where(w >= 0, 1, -1)", "torch.where(w >= 0, -1, 1)", match="flipped"),
        Mistake("ex2-answer", "gamma = w.abs().mean(dim=1, keepdim=True)", "gamma = w.abs().mean(dim=1)",
                match="keepdim=True"),
        Mistake("ex2-answer", "return codes, gamma", "return codes, gamma + eps", match="gamma itself, not gamma \\+ eps"),
        Mistake("ex3-answer", "energy = (c * c).sum()", "energy = c.abs().sum()", match="the squares"),
        Mistake("ex4-answer", "results.append((quant.sparsity(codes), quant.sqnr_db(w, codes * scale)))",
                "results.append((quant.sqnr_db(w, codes * scale), quant.sparsity(codes)))", match=r"\(sparsity, sqnr_db\), in that order"),
    ],
    "lab03_ste_qat": [
        Mistake("ex1-answer", "return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)", "return torch.sign(x)",
                match=r"torch.sign\(0\) is 0"),
        Mistake("ex1-answer", "keep = (x.abs() <= 1)", "keep = (x.abs() < 1)", match=r"the mask drops \|x\| = 1"),
        Mistake("ex2-answer", "return x + (x_q - x).detach()", "return x_q", match="no gradient reaches the input"),
        Mistake("ex3-answer", "return F.linear(x, w, self.bias)", "return F.linear(x, self.weight, self.bias)",
                match="W is not quantized"),
        Mistake("ex4-answer", "        optimizer.zero_grad()\n", "", match="gradients pile up"),
        Mistake("ex4-answer", "generator = torch.Generator().manual_seed(seed)", "generator = None",
                match="two runs with the same seed train differently"),
        Mistake("ex4-answer", "losses.append(float(loss.detach()))", "losses.append(loss)", match=r"append float\(loss\)"),
    ],
    "lab04_distillation": [
        Mistake("ex1-answer", "kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1)",
                "kl = (log_p_s.exp() * (log_p_s - log_p_t)).sum(dim=-1)", match="KL the wrong way round"),
        Mistake("ex1-answer", "return temperature**2 * kl.mean()", "return temperature**2 * kl.sum()",
                match="summed over the rows"),
        Mistake("ex1-answer", "return temperature**2 * kl.mean()", "return float(temperature**2 * kl.mean())",
                match="return the loss as a tensor"),
        Mistake("ex2-answer", "pairs = [(0, 0)] + [(i + 1, t + 1)", "pairs = [(i + 1, t + 1)",
                match=r"the embeddings' pair \(0, 0\) is missing"),
        Mistake("ex2-answer", "[(i + 1, t + 1) for i, t", "[(i + 1, t) for i, t", match=r"layer_map\[i\] \+ 1"),
        Mistake("ex3-answer", "soft_target_kl(student(x[idx]), teacher_logits, temperature)",
                "soft_target_kl(teacher_logits, student(x[idx]), temperature)", match="KL the wrong way round"),
        Mistake("ex3-answer", "soft_target_kl(student(x[idx]), teacher_logits, temperature)",
                "soft_target_kl(student(x[idx]), teacher_logits)", match="the temperature is not used"),
    ],
    "lab05_packing": [
        Mistake("ex1-answer", "bits = (signs.reshape(-1) > 0)", "bits = (signs.reshape(-1) < 0)", match="you stored the opposite"),
        Mistake("ex1-answer", "return 2 * bits.reshape(-1)[:n].astype(np.int8) - 1",
                "return bits.reshape(-1)[:n].astype(np.int8)", match=r"those are the bits; the signs are 2·bit - 1"),
        Mistake("ex2-answer", "return codes.reshape(-1)[:n].astype(np.int8) - 1", "return codes.reshape(-1).astype(np.int8) - 1",
                match="drop the padding"),
        Mistake("ex3-answer", "@ np.array([81, 27, 9, 3, 1])", "@ np.array([1, 3, 9, 27, 81])",
                match="the first weight is the most significant digit"),
        Mistake("ex3-answer", "return ((q * 256 + 242) // 243).astype(np.uint8)", "return q.astype(np.uint8)",
                match="you stored q itself"),
        Mistake("ex4-answer", "return -(-n // per_byte)", "return n // per_byte", match="round up"),
        Mistake("ex4-answer", "weight_bytes(n, variant) + 4", "weight_bytes(n, variant) + 2", match="4 bytes, not 2"),
    ],
    "lab06_kernels": [
        Mistake("ex1-answer", "return (x * h01) >> np.uint64(56)", "return x * h01",
                match="check the masks and shifts"),
        Mistake("ex1-answer", "@numba.njit\ndef popcount64", "def popcount64", match="must be compiled"),
        Mistake("ex2-answer", "return k - 2 * differ", "return 2 * differ - k", match="sign flipped"),
        Mistake("ex2-answer", "out = np.empty((m, n), dtype=np.int32)", "out = np.empty((m, n), dtype=np.int64)",
                match="must be int32"),
        Mistake("ex3-answer", "total += weight * (2 * agree - ones)", "total += weight * (2 * agree)",
                match=r"subtract popcount\(b\)"),
    ],
    "lab07_benchmark": [
        Mistake("ex1-answer", "head = h * h + h * config.num_labels", "head = 0", match="add the head"),
        Mistake("ex1-answer", "linear = layers * tokens * per_token + batch * head",
                "linear = layers * tokens * per_token + tokens * head", match="once per sequence"),
        Mistake("ex1-answer", "head_dim = h // heads", "head_dim = h / heads", match="Python ints"),
        Mistake("ex2-answer", "return nonzero_fraction * table[\"int32\"][\"add\"]", "return table[\"int32\"][\"add\"]",
                match="multiply the int32 add by nonzero_fraction"),
        Mistake("ex2-answer", " * 1e-12\n    attention_j", "\n    attention_j", match="that is picojoules"),
        Mistake("ex2-answer", "    raise ValueError(", "    return 0.0\n    raise ValueError(", match="must raise a ValueError"),
        Mistake("ex3-answer", "warmup=warmup, repeat=repeat", "warmup=1, repeat=5", match="pass warmup and repeat on"),
        Mistake("ex4-answer", "per_round = [b / o for b, o in zip(base.seconds, other.seconds)]",
                "per_round = [b / o for b, o in zip(sorted(base.seconds), sorted(other.seconds))]", match="you sorted the runs"),
        Mistake("ex4-answer", "per_round = [b / o for b, o in zip(base.seconds, other.seconds)]",
                "per_round = [o / b for b, o in zip(base.seconds, other.seconds)]", match="upside down"),
        Mistake("ex4-answer", "    if base.runs != other.runs:\n        raise ValueError(", "    if False:\n        raise ValueError(",
                match="cannot be paired"),
        Mistake("ex4-answer", '"ratio": base.median / other.median', '"ratio": base.best / other.best',
                match="the ratio of the best runs"),
        Mistake("ex5-answer", "ratio(get(\"fp32\", \"file_bytes\"), get(\"w1.58a8\", \"file_bytes\"))",
                "ratio(get(\"w1.58a8\", \"file_bytes\"), get(\"fp32\", \"file_bytes\"))", match="upside down"),
    ],
    "lab08_language_model": [
        Mistake("ex1-answer", "return x * torch.rsqrt(mean_square + eps) * weight",
                "return x / (mean_square.sqrt() + eps) * weight", match="eps goes under the root"),
        Mistake("ex1-answer", "mean_square = x.pow(2).mean(dim=-1, keepdim=True)",
                "mean_square = x.pow(2).sum(dim=-1, keepdim=True)", match="not their sum"),
        Mistake("ex2-answer", "first, second = x[..., :half], x[..., half:]", "first, second = x[..., 0::2], x[..., 1::2]",
                match="not neighbours"),
        Mistake("ex2-answer", "angles = position * frequencies", "angles = -position * frequencies",
                match="the rotation goes the wrong way"),
        Mistake("ex3-answer", "scores = scores.masked_fill(~allowed, float(\"-inf\"))", "pass", match="mask the later keys"),
        Mistake("ex4-answer", "return torch.cat(tokens, dim=1)", "return torch.cat(tokens[1:], dim=1)",
                match="start with the prompt"),
        Mistake("ex5-answer", "self.lora_B = nn.Parameter(torch.zeros(", "self.lora_B = nn.Parameter(torch.ones(",
                match="lora_B must start at zero"),
        Mistake("ex5-answer", "a = (torch.rand(rank, base.in_features, generator=generator) * 2 - 1) * bound",
                "a = torch.zeros(rank, base.in_features)", match="neither ever gets a gradient"),
        Mistake("ex5-answer", "a = (torch.rand(rank, base.in_features, generator=generator) * 2 - 1) * bound",
                "a = torch.randn(rank, base.in_features, generator=generator)", match=r"uniform in ±1/sqrt\(in_features\)"),
        Mistake("ex5-answer", "return self.base(x) + self.scaling", "return nn.functional.linear(x, self.base.weight) + self.scaling",
                match="uses the latent float weight"),
        Mistake("ex5-answer", "self.lora_A = nn.Parameter(a.to(base.weight.dtype))", "self.lora_A = a.to(base.weight.dtype)",
                match="must be an nn.Parameter"),
    ],
}


def _cells(path: Path) -> dict[str, nbformat.NotebookNode]:
    nb = nbformat.read(str(path), as_version=4)
    return {c.metadata.get("nbgrader", {}).get("grade_id", c.id): c for c in nb.cells if c.cell_type == "code"}


class LabSession:
    """One lab notebook's setup and answer cells executed in a namespace of their own; ``check(n)``
    runs the self-check cell of exercise ``n`` and returns what it printed."""

    def __init__(self, lab: str, kind: str = "source") -> None:
        self.lab = lab
        self.cells = _cells(ROOT / "labs" / kind / lab / f"{lab}.ipynb")
        self.exercises = sorted(int(m.group(1)) for g in self.cells if (m := re.fullmatch(r"ex(\d+)-check", g)))
        self.namespace: dict = {"__name__": f"lab_{lab}"}
        self._exec("import labutils")  # the install cell, without its %pip line
        self._exec(self.cells["setup-imports"].source)
        for n in self.exercises:
            self._exec(self.cells[f"ex{n}-answer"].source)

    def _exec(self, source: str) -> None:
        with contextlib.redirect_stdout(io.StringIO()):
            exec(compile(source, f"<{self.lab}>", "exec"), self.namespace)

    def check(self, n: int, bug: Bug | None = None) -> str:
        answer = self.cells[f"ex{n}-answer"].source
        if bug is not None:
            assert bug.old in answer, f"{self.lab} {bug.cell}: {bug.old!r} is not in the answer any more"
            self._exec(answer.replace(bug.old, bug.new, 1))
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                exec(compile(self.cells[f"ex{n}-check"].source, f"<{self.lab} ex{n}-check>", "exec"), self.namespace)
        finally:
            if bug is not None:
                self._exec(answer)
        return out.getvalue()


@pytest.fixture(scope="module", params=LABS)
def session(request) -> LabSession:
    torch.set_num_threads(1)
    return LabSession(request.param)


def test_every_lab_exercise_has_a_self_check(session):
    answers = sorted(int(m.group(1)) for g in session.cells if (m := re.fullmatch(r"ex(\d+)-answer", g)))
    assert session.exercises == answers, f"{session.lab}: a self-check cell under every code answer"
    for n in session.exercises:
        cell = session.cells[f"ex{n}-check"]
        # No nbgrader metadata: nbgrader puts a deleted test cell back after the read-only or graded cell
        # before it in the source, and fails (KeyError) when that one is neither an answer nor a test.
        assert "nbgrader" not in cell.metadata, f"{session.lab} ex{n}-check: a plain cell, without nbgrader metadata"
        source = cell.source
        name = re.search(r"from labutils\.checks import (check_lab\d_\w+)", source).group(1)
        assert name in checks.__all__ and f"\n{name}(" in source


def test_self_checks_accept_the_solutions(session):
    for n in session.exercises:
        assert session.check(n).startswith("correct: "), f"{session.lab} exercise {n}"


def _bugs(lab: str) -> list[Bug]:
    import importlib

    module = importlib.import_module(f"lab_bugs.{lab}")
    return [*module.VISIBLE, *module.HIDDEN]


def test_self_checks_catch_every_planted_bug(session):
    """The bugs the visible tests catch, and those only the hidden tests catch, with their words."""
    messages = BUG_MESSAGES[session.lab]
    for bug in _bugs(session.lab):
        assert (bug.cell, bug.new) in messages, f"write the self-check's message for {bug} in BUG_MESSAGES"
        n = int(bug.cell[2:].split("-")[0])
        with pytest.raises(ExerciseError, match=messages[(bug.cell, bug.new)]):
            session.check(n, bug)


@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")  # a mistake's own float(loss)
def test_self_checks_name_typical_mistakes(session):
    for mistake in MISTAKES[session.lab]:
        n = int(mistake.cell[2:].split("-")[0])
        with pytest.raises(ExerciseError, match=mistake.match):
            session.check(n, mistake)


@pytest.mark.parametrize("lab", LABS)
def test_student_version_checks_say_not_implemented(lab):
    """In the released copy every answer still raises NotImplementedError: the checks say so."""
    torch.set_num_threads(1)
    student = LabSession(lab, kind="release")
    assert student.exercises
    for n in student.exercises:
        with pytest.raises(ExerciseError, match=r"raised NotImplementedError: replace `raise NotImplementedError\(\)`"):
            student.check(n)


def test_checks_refuse_none_and_a_call_result():
    with pytest.raises(ExerciseError, match="still None"):
        checks.check_lab2_binarize(None)
    with pytest.raises(ExerciseError, match=r"pass sqnr_db, not sqnr_db\(\.\.\.\)"):
        checks.check_lab1_sqnr(3.0, lambda *a: [])
