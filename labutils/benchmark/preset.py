"""The IMDb benchmark's rows (FP32, INT8, the students) and presets: what a run depends on."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from labutils.bitlinear import ACT_BINARIZERS, BitNetConfig


@dataclass(frozen=True)
class Row:
    """One model of the benchmark: its name, its label, and (students) its BitLinear config."""

    name: str
    label: str
    energy_scheme: str
    bitnet: BitNetConfig | None = None

    @property
    def is_student(self) -> bool:
        return self.bitnet is not None


# Per-channel weight scales and no extra norm: the students start from the fine-tuned teacher,
# whose LayerNorms already sit in front of Q/K/V and the FFN; an RMSNorm before every BitLinear
# (BitNet's SubLN) would change the function the pretrained weights compute.
ROWS: dict[str, Row] = {
    "fp32": Row("fp32", "FP32 teacher", "fp32"),
    "int8": Row("int8", "INT8 dynamic (torch)", "int8"),
    "w1.58a8": Row("w1.58a8", "W1.58A8 (BitNet b1.58)", "w1.58a8", BitNetConfig(1.58, 8, per_channel=True, norm=None)),
    "w1a8": Row("w1a8", "W1A8 (binary weights)", "w1a8", BitNetConfig(1, 8, per_channel=True, norm=None)),
    "w1a1": Row("w1a1", "W1A1 (XNOR-popcount)", "w1a1", BitNetConfig(1, 1, per_channel=True, norm=None)),
}
STUDENTS = tuple(name for name, row in ROWS.items() if row.is_student)

# The encoder's position table (BERT, MiniLM): no sequence may be longer.
MAX_POSITIONS = 512
# labutils.data.SOURCES, spelled out: importing labutils.data (datasets, pandas) here would make
# every ``import labutils.benchmark`` seconds slower; tests/test_faults.py checks they agree.
DATA_SOURCES = ("auto", "local", "hub", "sample")


def _validate_preset(preset: Any) -> None:
    """Raise ``labutils.runs.UsageError`` (a ValueError) naming the first out-of-range field of
    ``preset``: checked when a Preset is made, so nothing runs with a nonsensical value. Fields
    not named here are left to their own checks."""
    import math

    from labutils.distill import ATTENTION_TARGETS
    from labutils.packfile import FLOAT_DTYPES, TERNARY_SCHEMES
    from labutils.runs import UsageError

    def fail(field: str, wanted: str) -> None:
        raise UsageError(f"preset {preset.name!r}: {field} must be {wanted}, got {getattr(preset, field)!r}")

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def is_real(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    values = vars(preset)
    if not isinstance(preset.name, str) or not preset.name:
        fail("name", "a non-empty string")
    choices = {"data_source": DATA_SOURCES, "attention_target": ATTENTION_TARGETS, "ternary": TERNARY_SCHEMES,
               "float_dtype": tuple(FLOAT_DTYPES), "w1a1_activations": ACT_BINARIZERS,
               "embeddings": ("float", *(f"int{k}" for k in range(2, 9)))}  # fmt: skip
    for field, allowed in choices.items():
        if field in values and values[field] not in allowed:
            fail(field, f"one of {allowed}")
    for field in ("train_size", "test_size"):
        if field in values and values[field] is not None and not (is_int(values[field]) and values[field] >= 1):
            fail(field, "an int >= 1, or None for the whole split")
    for field in ("val_size", "batch_size", "eval_batch_size", "student_batch_size", "teacher_epochs",
                  "student_epochs", "group_size", "latency_repeat", "memory_batch", "agreement_reviews", "threads"):
        if field in values and not (is_int(values[field]) and values[field] >= 1):
            fail(field, "an int >= 1")
    if "augment_copies" in values and not (is_int(preset.augment_copies) and preset.augment_copies >= 0):
        fail("augment_copies", "an int >= 0")
    if "augment_prob" in values and not (is_real(preset.augment_prob) and 0 <= preset.augment_prob <= 1):
        fail("augment_prob", "a number in [0, 1]")
    if "augment_neighbours" in values and not (is_int(preset.augment_neighbours) and preset.augment_neighbours >= 1):
        fail("augment_neighbours", "an int >= 1")
    if "quant_warmup_ratio" in values and not (is_real(preset.quant_warmup_ratio) and 0 <= preset.quant_warmup_ratio <= 1):
        fail("quant_warmup_ratio", "a number in [0, 1]")
    if "seed" in values and not (is_int(preset.seed) and preset.seed >= 0):
        fail("seed", "an int >= 0")
    if "max_length" in values and not (is_int(preset.max_length) and 2 <= preset.max_length <= MAX_POSITIONS):
        fail("max_length", f"an int in [2, {MAX_POSITIONS}] (tokens, [CLS] and [SEP] included)")
    for field in ("teacher_lr", "student_lr", "temperature"):
        if field in values and not (is_real(values[field]) and values[field] > 0):
            fail(field, "a finite number > 0")
    weights = [f for f in ("task_weight", "logit_weight", "hidden_weight", "attention_weight") if f in values]
    for field in weights:
        if not (is_real(values[field]) and values[field] >= 0):
            fail(field, "a finite number >= 0")
    teacher_terms = [values[f] for f in ("logit_weight", "hidden_weight", "attention_weight") if f in values]
    if teacher_terms and sum(teacher_terms) <= 0:
        fail("logit_weight", "> 0, or hidden_weight or attention_weight > 0 (the students are distilled)")
    for field, low, high in (("latency_lengths", 2, MAX_POSITIONS), ("memory_lengths", 2, MAX_POSITIONS),
                             ("latency_batches", 1, None)):  # fmt: skip
        v = values.get(field, ())
        if field in values and not (
            isinstance(v, (tuple, list)) and v and all(is_int(x) and x >= low and (high is None or x <= high) for x in v)
        ):
            fail(field, f"a non-empty tuple of ints in [{low}, {high or 'inf'}]")


@dataclass(frozen=True)
class Preset:
    """Everything a benchmark run depends on (saved in DIR/preset.json; a resumed run must match).

    Data: ``train_size`` / ``test_size`` reviews (None: the whole split), ``val_size`` of the
    training reviews held out to pick each model's best epoch (never the test set).
    Training: epochs and learning rates of teacher and students; the students' distillation
    weights (``labutils.distill.DistillConfig``); ``quant_warmup_ratio``, the share of the
    students' steps over which BitLinear's quantization strength λ ramps from 0 to 1;
    ``student_init`` and ``student_teacher``, where a student starts and whom it imitates:
    "fp32" (the trained teacher) or a student row trained earlier in the same folder (its latent
    weights in ``latent/<row>.safetensors``, its packed file as the teacher): multi-step
    distillation, FP32 -> W1.58A8 -> W1A8 -> W1A1, as BiT (Liu et al., 2022) does;
    ``w1a1_activations``, how the W1A1 student binarizes its activations: "sign_mean"
    (``sign(x)·mean|x|`` per token) or "elastic" (BiT's ``α·sign(x - β)``, learnable α per layer
    and β per input feature, trained with the student and stored in its latent and packed files;
    ``BitNetConfig.act_binarizer``); ``augment_copies``, how many copies of each training review
    with words swapped for embedding neighbours the students also learn from (TinyBERT's data
    augmentation with probability ``augment_prob`` among ``augment_neighbours`` neighbours;
    ``labutils.augment``; 0: none). ``seed`` seeds the validation hold-out, the data order and
    the fresh heads. Files: how students are packed. CPU: lengths,
    batches and repeats of the latency and memory measurements, threads.
    """

    name: str
    data_source: str = "auto"
    train_size: int | None = None
    val_size: int = 1000
    test_size: int | None = None
    max_length: int = 256
    batch_size: int = 32
    eval_batch_size: int = 256
    teacher_epochs: int = 3
    teacher_lr: float = 5e-5
    student_epochs: int = 4
    student_lr: float = 2e-4
    student_batch_size: int = 128
    logit_weight: float = 1.0
    hidden_weight: float = 1.0
    attention_weight: float = 0.1
    attention_target: str = "kl"
    temperature: float = 1.0
    task_weight: float = 0.0
    quant_warmup_ratio: float = 0.0
    student_init: str = "fp32"
    student_teacher: str = "fp32"
    w1a1_activations: str = "sign_mean"
    augment_copies: int = 0
    augment_prob: float = 0.4
    augment_neighbours: int = 15
    ternary: str = "ternary3"
    embeddings: str = "int4"
    group_size: int = 128
    float_dtype: str = "fp16"
    latency_lengths: tuple[int, ...] = (64, 128, 256, 512)
    latency_batches: tuple[int, ...] = (1, 32)
    latency_repeat: int = 5
    memory_lengths: tuple[int, ...] = (64, 128, 256, 512)
    memory_batch: int = 32
    agreement_reviews: int = 256
    threads: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        _validate_preset(self)


PRESETS: dict[str, Preset] = {
    # The headline run: all 25,000 training reviews (minus 1,000 for validation), all 25,000
    # test reviews. Trained on a GPU; the CPU stage on the edge machine.
    "full": Preset(name="full", data_source="auto"),
    # Minutes on a laptop CPU, on the embedded sample: every row and column, tiny training.
    "ci": Preset(
        name="ci",
        data_source="sample",
        train_size=192,
        val_size=32,
        test_size=128,
        max_length=96,
        batch_size=16,
        student_batch_size=16,
        eval_batch_size=64,
        teacher_epochs=1,
        teacher_lr=5e-5,
        student_epochs=1,
        latency_lengths=(64, 128),
        latency_batches=(1, 8),
        latency_repeat=3,
        memory_lengths=(64, 128, 256),
        memory_batch=8,
        agreement_reviews=32,
    ),
}

# The targets for the full run, checked by check_targets: (key, text).
TARGETS = (
    ("teacher_accuracy", "FP32 teacher >= 89% test accuracy"),
    ("w158a8_gap", "W1.58A8 within 1.0 point of the teacher"),
    ("w1a8_gap", "W1A8 within 2.0 points of the teacher"),
    ("w158a8_size", "packed W1.58A8 file >= 10x smaller than the fp32 safetensors"),
    ("w158a8_vs_fp32_latency", "W1.58A8 CPU latency, batch 32, length 256: >= 1.5x faster than FP32"),
    ("w158a8_vs_int8_latency", "W1.58A8 CPU latency, batch 32, length 256: no slower than INT8"),
)


def check_rows(rows: Iterable[str]) -> tuple[str, ...]:
    from labutils.runs import UsageError

    rows = tuple(rows)
    unknown = [r for r in rows if r not in ROWS]
    if unknown or not rows:
        raise UsageError(f"rows must be among {tuple(ROWS)} (at least one), got {unknown or list(rows)}")
    return rows
