"""The IMDb benchmark: full precision vs INT8 vs 1.58-bit vs 1-bit, trained, measured, reported.

``python -m labutils.bench imdb --preset {ci,full} --out DIR`` runs three stages, each resumable
(a stage's outputs in DIR are reused when the preset matches; delete them to redo a stage):

1. ``train`` (on the GPU when there is one): fine-tune the FP32 teacher on IMDb; distil it into
   the W1.58A8, W1A8 and W1A1 students (QAT from the teacher's weights, every encoder linear a
   BitLinear; logits + hidden-state + attention distillation); write each student as a packed
   file (``labutils.packfile``: base-3 ternary or 1-bit linears, 4-bit group embeddings) and
   measure the test accuracy *of the model loaded back from that file*. The INT8 row (torch's
   dynamic quantization of the teacher, a CPU-only format) is evaluated on the CPU, in a
   subprocess that runs while the GPU trains the students.
2. ``cpu`` (the edge target, this machine): load every row (students onto the popcount/VNNI
   kernels of ``labutils.kernels``), check that the packed students compute what their
   fake-quantized versions compute, and measure latency (batch 1 and 32, lengths 64-512), peak
   memory against length (eager attention vs PyTorch SDPA), file sizes, MACs and an arithmetic
   energy estimate (``labutils.measure``).
3. ``report``: one ``results.json`` (provenance, preset, every row and column, the targets) that
   ``RESULTS_SCHEMA`` validates, a printed table, and plotly charts (``charts(results)``).

Rows: ``fp32`` (teacher), ``int8``, ``w1.58a8`` (BitNet b1.58), ``w1a8``, ``w1a1``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as _dt
import functools
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from labutils.bitlinear import ACT_BINARIZERS, BitNetConfig, quantize_, quantize_embeddings_

__all__ = [
    "PRESETS",
    "RESULTS_SCHEMA",
    "ROWS",
    "TARGETS",
    "Preset",
    "Row",
    "charts",
    "check_targets",
    "format_table",
    "load_results",
    "run",
    "validate_results",
]

SCHEMA_VERSION = 1


# --------------------------------------------------------------------------- rows and presets


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
    """Raise ``labutils.bench.UsageError`` (a ValueError) naming the first out-of-range field of
    ``preset``: checked when a Preset is made, so nothing runs with a nonsensical value. Fields
    not named here are left to their own checks."""
    import math

    from labutils.bench import UsageError
    from labutils.distill import ATTENTION_TARGETS
    from labutils.packfile import FLOAT_DTYPES, TERNARY_SCHEMES

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
    ``BitNetConfig.act_binarizer``). Files: how students are packed. CPU: lengths,
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


# --------------------------------------------------------------------------- small helpers


def _write_json(path: Path, payload: Any) -> None:
    """Write ``payload`` as JSON atomically: a killed run never leaves a half-written file that a
    resumed run would take for a finished stage (``labutils.packfile.write_atomic``)."""
    from labutils.packfile import write_atomic

    write_atomic(path, (json.dumps(payload, indent=2, default=str) + "\n").encode())


def _save_safetensors(model: nn.Module, path: Path) -> int:
    """What ``safetensors.torch.save_model`` writes (tied weights stored once, ``load_model``
    reads it), but atomic like ``_write_json`` and the same bytes for the same model (sorted
    metadata; save_model's own temporary file would also be left behind by a kill). Returns bytes."""
    from safetensors.torch import _remove_duplicate_names, save

    from labutils.packfile import sorted_metadata, write_atomic

    state = model.state_dict()
    metadata = {}
    for kept, removed in _remove_duplicate_names(state).items():
        for name in removed:
            metadata[name] = kept
            del state[name]
    data = sorted_metadata(save({k: v.contiguous() for k, v in state.items()}, metadata=metadata or None))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data)
    return len(data)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:  # every file here is written atomically: edited or foreign
        raise ValueError(f"{path} is not valid JSON ({exc}); delete it to redo the stage that wrote it") from None


def _commit() -> str | None:
    """The git commit of the code: ``$LABBOOK_COMMIT`` (set where the tree travels without .git),
    else ``git rev-parse HEAD`` of this package's checkout, else None."""
    if os.environ.get("LABBOOK_COMMIT"):
        return os.environ["LABBOOK_COMMIT"]
    try:
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run(["git", "rev-parse", "HEAD"], check=False, cwd=root, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    names = ("torch", "transformers", "accelerate", "datasets", "numba", "numpy", "safetensors", "labutils")
    found = {}
    for name in names:
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return found


def _cpu_name() -> str:
    from labutils.bench import _cpu_info

    return _cpu_info()["model"] or platform.machine()


def _cpu_features() -> dict[str, Any]:
    """The CPU's SIMD features and the kernel path the packed layers run (``labutils.kernels``)."""
    from labutils.kernels import cpu_features

    found = cpu_features()
    return {"flags": found["flags"], "path": found["path"]}


def provenance(device: str) -> dict[str, Any]:
    """Commit, device, library versions, date (UTC), python, CPU and its core count."""
    return {
        "commit": _commit(),
        "device": device,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "versions": _versions(),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        # Other work on the machine slows every timing: the 1, 5 and 15-minute load averages.
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "cpu_features": _cpu_features(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else None,
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {_cpu_name()}"


def _check_rows(rows: Iterable[str]) -> tuple[str, ...]:
    from labutils.bench import UsageError

    rows = tuple(rows)
    unknown = [r for r in rows if r not in ROWS]
    if unknown or not rows:
        raise UsageError(f"rows must be among {tuple(ROWS)} (at least one), got {unknown or list(rows)}")
    return rows


# --------------------------------------------------------------------------- data


@dataclass
class Splits:
    """Tokenized train / val / test datasets (torch format: input_ids, attention_mask, label)."""

    train: Any
    val: Any
    test: Any


def load_splits(preset: Preset, tokenizer: Any) -> Splits:
    """IMDb for ``preset``: a seeded ``val_size`` hold-out of the training split, the test split
    (first ``test_size`` reviews of a seeded shuffle, or all), tokenized to ``max_length``."""
    from labutils.data import ENV_DATA_DIR, DataSourceError, load_imdb, tokenize_imdb

    train = load_imdb("train", source=preset.data_source, seed=preset.seed, shuffle=True)
    test = load_imdb("test", source=preset.data_source, seed=preset.seed, shuffle=True)
    if preset.train_size is None and "'sample'" in train.info.description:
        raise DataSourceError(
            f"preset {preset.name!r} needs the full IMDb, but only the embedded sample is reachable: "
            f"set {ENV_DATA_DIR} to a folder with train.parquet and test.parquet, or go online "
            f"(the Hugging Face Hub's stanfordnlp/imdb)"
        )
    n_train = len(train) - preset.val_size if preset.train_size is None else preset.train_size
    if n_train < 1 or n_train + preset.val_size > len(train):
        raise ValueError(
            f"train_size {preset.train_size} + val_size {preset.val_size} exceed the {len(train)} "
            f"training reviews of source {preset.data_source!r}"
        )
    if preset.test_size is not None:
        if preset.test_size > len(test):
            raise ValueError(f"test_size {preset.test_size} exceeds the {len(test)} test reviews")
        test = test.select(range(preset.test_size))
    val = train.select(range(n_train, n_train + preset.val_size))
    train = train.select(range(n_train))
    tok = lambda ds: tokenize_imdb(ds, tokenizer, preset.max_length)
    return Splits(tok(train), tok(val), tok(test))


def _loader(dataset: Any, batch_size: int, shuffle: bool, seed: int) -> torch.utils.data.DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)


@torch.no_grad()
def accuracy(model: nn.Module, loader: Iterable[Mapping[str, torch.Tensor]], device: torch.device) -> float:
    """Fraction of reviews whose argmax logit equals the label (model in eval mode, float32)."""
    model.eval()
    hits, total = 0, 0
    for batch in loader:
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        hits += int((logits.argmax(-1).cpu() == batch["label"]).sum())
        total += len(batch["label"])
    if total == 0:
        raise ValueError("the evaluation loader yielded no reviews")
    return hits / total


# --------------------------------------------------------------------------- models


def teacher_skeleton(model_path: str | None, seed: int = 0, attn: str = "sdpa") -> nn.Module:
    """The classifier architecture (MiniLM + a fresh head), float32, ``attn`` attention."""
    from labutils.models import load_classifier

    return load_classifier(model_path, num_labels=2, seed=seed, attn_implementation=attn)


def student_config(row: str, preset: Preset | None = None, act_binarizer: str | None = None) -> BitNetConfig:
    """``ROWS[row]``'s BitNetConfig, with 1-bit activations made as ``act_binarizer`` says (default:
    ``preset.w1a1_activations``, else the row's own "sign_mean"); rows with multi-bit activations
    are returned as they are."""
    config = ROWS[row].bitnet
    if config is None:
        raise ValueError(f"row {row!r} is not a student (no BitNetConfig)")
    if act_binarizer is None and preset is not None:
        act_binarizer = preset.w1a1_activations
    if config.act_bits == 1 and act_binarizer is not None:
        config = replace(config, act_binarizer=act_binarizer)
    return config


def student_skeleton(
    row: str, model_path: str | None, attn: str = "sdpa", *, act_binarizer: str | None = None
) -> nn.Module:
    """The teacher architecture with every encoder linear replaced by ``student_config(row)``'s BitLinear."""
    model = teacher_skeleton(model_path, attn=attn)
    quantize_(model, student_config(row, act_binarizer=act_binarizer))
    return model.eval()


def _file_act_binarizer(path: Path) -> str:
    """Whether the packed (or latent) file at ``path`` holds BiT's elastic α ("elastic"), else "sign_mean"."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return "elastic" if any(k.endswith(".act_alpha") for k in f.keys()) else "sign_mean"


def int8_dynamic(model: nn.Module) -> nn.Module:
    """torch's dynamic INT8 quantization of every nn.Linear (int8 weights per tensor, activations
    quantized per batch at run time): what a CPU user picks without retraining. CPU only."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated in favour of torchao
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model).cpu().eval(), {nn.Linear}, dtype=torch.qint8)


def _pack_file(out: Path, row: str) -> Path:
    return out / f"{row}.packed"


def _latent_file(out: Path, row: str) -> Path:
    """A trained student's latent (float) weights: where a multi-step distillation continues."""
    return out / "latent" / f"{row}.safetensors"


def _require(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what} needs {path}: train that row first, in the same --out folder")
    return path


def _teacher_file(out: Path) -> Path:
    return out / "teacher" / "model.safetensors"


def load_student(out: Path, row: str, model_path: str | None, attn: str = "sdpa") -> nn.Module:
    """The student of ``row`` loaded back from its packed file in ``out`` (fake-quantized BitLinear)."""
    from labutils.packfile import load_packed

    path = _student_file(out, row)  # the file says whether its 1-bit activations are elastic
    return load_packed(path, student_skeleton(row, model_path, attn, act_binarizer=_file_act_binarizer(path)))


def _student_file(out: Path, row: str) -> Path:
    """The trained student's packed file, else the untrained stand-in's (see ``write_untrained_student``)."""
    trained = _pack_file(out, row)
    return trained if trained.is_file() else out / "untrained" / f"{row}.packed"


def write_untrained_student(out: Path, row: str, model_path: str | None, preset: Preset) -> Path:
    """A stand-in for a student that was not trained here: the pretrained encoder quantized to
    ``row``'s BitLinear (no QAT), packed exactly like a trained one. Its accuracy means nothing, but
    its file size, latency and memory are those of the trained student: none of them depends on
    the weights' values. Written to ``out/untrained/<row>.packed``."""
    model = teacher_skeleton(model_path)
    quantize_(model, student_config(row, preset))
    path = out / "untrained" / f"{row}.packed"
    path.parent.mkdir(parents=True, exist_ok=True)
    _save_student(model, path, preset)
    return path


def _save_student(model: nn.Module, path: Path, preset: Preset) -> int:
    """Write a student as the preset packs it (linears, embeddings, floats); return its bytes."""
    from labutils.packfile import save_packed

    return save_packed(model, path, ternary=preset.ternary, embeddings=preset.embeddings,
                       group_size=preset.group_size, float_dtype=preset.float_dtype)  # fmt: skip


def load_teacher(out: Path, model_path: str | None, attn: str = "sdpa") -> tuple[nn.Module, str]:
    """(teacher, where its weights came from): the trained teacher from ``out`` when present, else
    the architecture with the pretrained encoder (latency, memory and file size do not depend on
    the weights' values, so the CPU stage can run where the teacher's file did not travel)."""
    from safetensors.torch import load_model

    model = teacher_skeleton(model_path, attn=attn)
    path = _teacher_file(out)
    if path.is_file():
        load_model(model, str(path))
        return model.eval(), "trained teacher"
    return model.eval(), "pretrained encoder, new head (the trained teacher's file was not here)"


# --------------------------------------------------------------------------- stage 1: train


def _train_config(preset: Preset, epochs: int, lr: float, quiet: bool, quant_warmup_ratio: float = 0.0):
    from labutils.distill import TrainConfig

    return TrainConfig(
        epochs=epochs,
        lr=lr,
        weight_decay=0.01,
        warmup_ratio=0.06,
        quant_warmup_ratio=quant_warmup_ratio,
        lr_schedule="linear",
        monitor="eval_accuracy",
        restore_best=True,  # the best epoch on the validation hold-out, never on the test set
        seed=preset.seed,
        progress=not quiet,
    )


def _distill_config(preset: Preset):
    from labutils.distill import DistillConfig

    return DistillConfig(
        task_weight=preset.task_weight,
        logit_weight=preset.logit_weight,
        temperature=preset.temperature,
        hidden_weight=preset.hidden_weight,
        attention_weight=preset.attention_weight,
        attention_target=preset.attention_target,
    )


def _accelerator(device: torch.device):
    from accelerate import Accelerator

    if device.type == "cuda":
        return Accelerator(mixed_precision="bf16")
    return Accelerator(cpu=True)


def _train_teacher(preset: Preset, out: Path, splits: Splits, model_path: str | None, device: torch.device, quiet: bool) -> dict:
    from labutils.distill import train

    model = teacher_skeleton(model_path, seed=preset.seed)
    start = time.perf_counter()
    history = train(
        model,
        _loader(splits.train, preset.batch_size, True, preset.seed),
        _loader(splits.val, preset.eval_batch_size, False, preset.seed),
        config=_train_config(preset, preset.teacher_epochs, preset.teacher_lr, quiet),
        accelerator=_accelerator(device),
    )
    seconds = time.perf_counter() - start
    model = model.float().to(device)
    test_accuracy = accuracy(model, _loader(splits.test, preset.eval_batch_size, False, 0), device)
    _save_safetensors(model.cpu(), _teacher_file(out))
    return {"accuracy": test_accuracy, "train_seconds": seconds, "history": list(history)}


def _train_student(
    row: str, preset: Preset, out: Path, splits: Splits, model_path: str | None, device: torch.device, quiet: bool
) -> dict:
    from safetensors.torch import load_model, save_model

    from labutils.distill import train

    teacher, _ = load_teacher(out, model_path, attn="eager")  # eager: attention maps for the KD loss
    student = copy.deepcopy(teacher)
    config = student_config(row, preset)
    quantize_(student, config)
    if preset.embeddings != "float":  # QAT of the embeddings: train with the rounding the file applies
        quantize_embeddings_(student, bits=int(preset.embeddings[3:]), group_size=preset.group_size)
    if preset.student_init != "fp32":  # multi-step distillation: start where a higher-precision student ended
        path = _require(_latent_file(out, preset.student_init), f"student_init={preset.student_init!r}")
        missing, unexpected = load_model(student, str(path), strict=False)
        # a sign_mean student (w1a8, or w1a1 sign_mean) has no elastic α/β: those start fresh
        # (β = 0, α from the first batch, as BiT); every other tensor must be in the file
        missing = [k for k in missing if k.rpartition(".")[2] not in ("act_alpha", "act_beta", "act_alpha_initialized")]
        if missing or unexpected:
            raise RuntimeError(f"{path} does not fit the {row} student: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if preset.student_teacher != "fp32":
        _require(_pack_file(out, preset.student_teacher), f"student_teacher={preset.student_teacher!r}")
        teacher = load_student(out, preset.student_teacher, model_path, attn="eager")
    start = time.perf_counter()
    history = train(
        student,
        _loader(splits.train, preset.student_batch_size, True, preset.seed),
        _loader(splits.val, preset.eval_batch_size, False, preset.seed),
        config=_train_config(preset, preset.student_epochs, preset.student_lr, quiet, preset.quant_warmup_ratio),
        teacher=teacher.to(device),
        distill=_distill_config(preset),
        accelerator=_accelerator(device),
    )
    seconds = time.perf_counter() - start
    test = _loader(splits.test, preset.eval_batch_size, False, 0)
    student = student.float().to(device).eval()
    before = accuracy(student, test, device)
    _latent_file(out, row).parent.mkdir(parents=True, exist_ok=True)
    tmp = _latent_file(out, row).with_suffix(".tmp")  # the next step of a distillation chain starts here
    save_model(student.cpu(), str(tmp))
    os.replace(tmp, _latent_file(out, row))
    file_bytes = _save_student(student.cpu(), _pack_file(out, row), preset)
    reloaded = load_student(out, row, model_path).to(device)
    return {
        "accuracy": accuracy(reloaded, test, device),  # the shipped file's model, what users get
        "accuracy_before_packing": before,  # float embeddings and heads, same BitLinear weights
        "file_bytes": file_bytes,
        "train_seconds": seconds,
        "history": list(history),
        "bitnet": asdict(config),
    }


def _int8_accuracy(preset: Preset, out: Path, model_path: str | None, threads: int, quiet: bool) -> dict:
    """The INT8 row's test accuracy, on the CPU (torch's dynamic quantization runs nowhere else)."""
    from labutils.models import load_tokenizer

    torch.set_num_threads(threads)
    teacher, source = load_teacher(out, model_path)
    if source != "trained teacher":
        raise FileNotFoundError(f"the INT8 row needs the trained teacher at {_teacher_file(out)}")
    splits = load_splits(preset, load_tokenizer(model_path))
    model = int8_dynamic(teacher)
    start = time.perf_counter()
    loader = _loader(splits.test, preset.eval_batch_size, False, 0)
    if not quiet:
        from tqdm.auto import tqdm

        loader = tqdm(loader, desc="INT8 accuracy (CPU)")
    acc = accuracy(model, loader, torch.device("cpu"))
    return {"accuracy": acc, "eval_seconds": time.perf_counter() - start, "threads": threads, "device": f"cpu: {_cpu_name()}"}


def _row_file(out: Path, stage: str, row: str) -> Path:
    return out / f"{stage}_{row}.json"


def _spawn_int8(preset_file: Path, out: Path, model_path: str | None, threads: int) -> subprocess.Popen:
    """Evaluate the INT8 row in a subprocess on ``threads`` CPU cores while the GPU trains."""
    cmd = [sys.executable, "-m", "labutils.bench", "imdb", "--stage", "int8", "--preset-file", str(preset_file),
           "--out", str(out), "--threads", str(threads), "--quiet"]  # fmt: skip
    if model_path:
        cmd += ["--model", str(model_path)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return subprocess.Popen(cmd, env=env)


def run_train(
    preset: Preset,
    out: Path,
    *,
    rows: Sequence[str] = tuple(ROWS),
    model_path: str | None = None,
    device: str = "auto",
    quiet: bool = False,
) -> None:
    """Stage 1: train the teacher and the students of ``rows`` and measure their test accuracy;
    writes ``out/train_<row>.json`` (skipping rows that already have one)."""
    from labutils.models import load_tokenizer

    rows = _check_rows(rows)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    prov = provenance(_device_name(dev))
    splits = None

    def _splits() -> Splits:
        nonlocal splits
        if splits is None:
            splits = load_splits(preset, load_tokenizer(model_path))
        return splits

    if not _row_file(out, "train", "fp32").is_file() or not _teacher_file(out).is_file():
        result = _train_teacher(preset, out, _splits(), model_path, dev, quiet)
        _write_json(_row_file(out, "train", "fp32"), {**result, "provenance": prov})
        print(f"[train] fp32 teacher: test accuracy {result['accuracy']:.4f} ({result['train_seconds']:.0f} s)", flush=True)

    int8_job = None
    if "int8" in rows and not _row_file(out, "train", "int8").is_file():
        if dev.type == "cuda":  # the CPU is idle while the GPU trains: evaluate INT8 beside it
            int8_job = _spawn_int8(out / "preset.json", out, model_path, max(1, (os.cpu_count() or 2) - 2))
        else:
            result = _int8_accuracy(preset, out, model_path, torch.get_num_threads(), quiet)
            _write_json(_row_file(out, "train", "int8"), {**result, "provenance": provenance(result["device"])})
    for row in rows:
        if ROWS[row].is_student and not _row_file(out, "train", row).is_file():
            result = _train_student(row, preset, out, _splits(), model_path, dev, quiet)
            _write_json(_row_file(out, "train", row), {**result, "provenance": prov})
            print(
                f"[train] {row}: test accuracy {result['accuracy']:.4f} (before packing "
                f"{result['accuracy_before_packing']:.4f}), {result['file_bytes'] / 1e6:.2f} MB, "
                f"{result['train_seconds']:.0f} s",
                flush=True,
            )
    if int8_job is not None and int8_job.wait() != 0:
        raise RuntimeError(f"the INT8 accuracy subprocess failed with exit status {int8_job.returncode}")


# --------------------------------------------------------------------------- stage 2: cpu

CPU_COLUMNS = ("agreement", "latency", "memory", "weights_bytes", "file_bytes", "compute")


def _inputs(vocab_size: int, batch: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    """Random token ids (no padding: every position is a real token, the worst case) for timing."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab_size, (batch, length), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _weights_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers the model holds in memory (packed buffers included;
    an ONNX Runtime row: its graph's initializers)."""
    if hasattr(model, "weights_nbytes"):
        return int(model.weights_nbytes)
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    for module in model.modules():  # torch's dynamic-quantized Linear keeps its weight in a packed object
        packed = getattr(module, "_packed_params", None)
        if packed is not None and hasattr(packed, "_weight_bias"):
            w, b = packed._weight_bias()
            total += w.numel() * w.element_size() + (b.numel() * b.element_size() if b is not None else 0)
    return total


@dataclass
class CpuModels:
    """What the CPU stage measures: {row: inference model} (FP32, INT8, packed students on the
    kernels), {student row: the same student fake-quantized}, {row: where its weights came from}."""

    inference: dict[str, nn.Module]
    fake_quantized: dict[str, nn.Module]
    notes: dict[str, str]


def _cpu_models(out: Path, rows: Sequence[str], model_path: str | None) -> CpuModels:
    """Load every row once (a student's packed file is read and fitted once, then packed; its
    group-quantized embeddings stay packed: ``kernels.layer.pack_embeddings_``)."""
    from labutils.kernels import pack_model
    from labutils.kernels.layer import pack_embeddings_
    from labutils.packfile import load_packed

    models = CpuModels({}, {}, {})
    teacher, source = load_teacher(out, model_path)
    for row in rows:
        if row == "fp32":
            models.inference[row], models.notes[row] = teacher, source
        elif row == "int8":
            models.inference[row], models.notes[row] = int8_dynamic(teacher), source
        elif _student_file(out, row).is_file():
            student = load_student(out, row, model_path)
            models.fake_quantized[row], models.inference[row] = student, pack_model(student)
            path = _student_file(out, row)
            # the int4 embeddings stay int4 in RAM, each looked-up row dequantized when read
            pack_embeddings_(models.inference[row], load_packed(path))
            trained = path == _pack_file(out, row)
            models.notes[row] = f"packed file {path.relative_to(out)}" + ("" if trained else " (untrained stand-in)")
    if "fp32" in rows:
        _add_onnx_rows(models, teacher, out, source)
    return models


ONNX_ROWS = ("onnx-fp32", "onnx-int8")
"""Extra CPU-stage rows (latency, memory, weights only): the FP32 teacher exported to ONNX and
its dynamic INT8 quantization (``onnxruntime.quantization.quantize_dynamic``), run by ONNX
Runtime on the same threads: what a CPU user would deploy without retraining."""
ONNX_LABELS = {"onnx-fp32": "FP32 (ONNX Runtime)", "onnx-int8": "INT8 dynamic (ONNX Runtime)"}


class OnnxModel(nn.Module):
    """An ONNX Runtime session called like the HF classifier: ``model(input_ids=, attention_mask=).logits``."""

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        super().__init__()
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        # no spin-waiting after a call: with rows interleaved, ONNX Runtime's spinning threads would
        # take the cores from the next row (they made FP32 at batch 1 2.5x slower)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.weights_nbytes = _onnx_initializer_bytes(path)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: Any) -> Any:
        feed = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()}
        logits = self.session.run(["logits"], feed)[0]
        return type("Output", (), {"logits": torch.from_numpy(logits)})()

    def set_attn_implementation(self, attn: str) -> None:  # the graph's attention is fixed at export
        pass


def _onnx_initializer_bytes(path: Path) -> int:
    import onnx

    return sum(onnx.numpy_helper.to_array(t).nbytes for t in onnx.load(str(path)).graph.initializer)


def _add_onnx_rows(models: CpuModels, teacher: nn.Module, out: Path, source: str) -> None:
    """Export the teacher to ONNX (once, in ``out/onnx``), quantize it dynamically to INT8 and
    add both as ONNX_ROWS; skipped with a printed reason where onnxruntime or onnx is missing or
    the export fails."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as exc:
        print(f"[cpu] ONNX Runtime rows skipped: {exc} (pip install onnxruntime onnx)", flush=True)
        return
    folder = out / "onnx"
    fp32, int8 = folder / "fp32.onnx", folder / "int8.onnx"
    try:
        if not fp32.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            inputs = _inputs(teacher.config.vocab_size, 2, 16, 0)
            wrapped = _LogitsOnly(copy.deepcopy(teacher).eval())
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(wrapped, (inputs["input_ids"], inputs["attention_mask"]), str(fp32), dynamo=False,
                                  input_names=["input_ids", "attention_mask"], output_names=["logits"], opset_version=17,
                                  dynamic_axes={"input_ids": {0: "batch", 1: "length"}, "attention_mask": {0: "batch", 1: "length"},
                                                "logits": {0: "batch"}})  # fmt: skip
        if not int8.is_file():
            quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)
        threads = torch.get_num_threads()
        for row, path in zip(ONNX_ROWS, (fp32, int8)):
            models.inference[row] = OnnxModel(path, threads)
            models.notes[row] = f"{source}, exported to ONNX ({path.relative_to(out)}), ONNX Runtime, {threads} threads"
    except Exception as exc:  # noqa: BLE001 - an exporter failure must not lose the other rows
        print(f"[cpu] ONNX Runtime rows skipped: the export or quantization failed: {type(exc).__name__}: {exc}", flush=True)


class _LogitsOnly(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def _agreement(student: nn.Module, packed: nn.Module, preset: Preset, splits: Splits) -> dict:
    """Packed student (kernels) vs the same student fake-quantized (BitLinear), on test reviews."""
    n = min(preset.agreement_reviews, len(splits.test))
    batch = splits.test[:n]
    with torch.no_grad():
        a = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        b = packed(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return {
        "reviews": n,
        "max_abs_logit_diff": float((a - b).abs().max()),
        "max_abs_logit": float(a.abs().max()),
        "same_prediction": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
    }


def _latency(models: Mapping[str, nn.Module], preset: Preset, vocab: int, quiet: bool) -> dict[str, dict]:
    """{row: {"b{B}": {"L{L}": {...}}}}, rows timed round-robin at every (batch, length).

    The noise protocol: rows interleaved (round i of every row under the same load), the
    median, best and every run kept, the machine's 1-minute load average before and after each
    case, and for every row its speed against fp32 as ``measure.paired_ratio`` (ratio of
    medians, spread of the per-round ratios, "no difference" where the spread overlaps 1.0)."""
    from tqdm.auto import tqdm

    from labutils.measure import interleaved_timings, paired_ratio

    result: dict[str, dict] = {row: {} for row in models}
    cases = [(b, n) for b in preset.latency_batches for n in preset.latency_lengths]
    for b, n in tqdm(cases, desc="latency", disable=quiet):
        inputs = _inputs(vocab, b, n, preset.seed)
        fns = {row: functools.partial(m, **inputs) for row, m in models.items()}
        load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        with torch.inference_mode():
            timings = interleaved_timings(fns, warmup=1, repeat=preset.latency_repeat)
        load = [load_before, os.getloadavg()[0] if hasattr(os, "getloadavg") else None]
        for row, t in timings.items():
            entry = {"median_ms": 1e3 * t.median, "best_ms": 1e3 * t.best, "runs_ms": [1e3 * x for x in t.seconds],
                     "load_average": load}  # fmt: skip
            if "fp32" in timings and row != "fp32":
                entry["vs_fp32"] = paired_ratio(timings["fp32"], t)
            result[row].setdefault(f"b{b}", {})[f"L{n}"] = entry
    return result


def _memory(models: Mapping[str, nn.Module], preset: Preset, vocab: int, quiet: bool) -> dict[str, dict]:
    """{row: {"eager"|"sdpa": {"L{L}": peak extra MB}}} at batch ``memory_batch``, lengths ascending."""
    from tqdm.auto import tqdm

    from labutils.measure import peak_memory

    result: dict[str, dict] = {row: {} for row in models}
    cases = [(attn, row) for attn in ("eager", "sdpa") for row in models]
    for attn, row in tqdm(cases, desc="memory", disable=quiet):
        model = models[row]
        model.set_attn_implementation(attn)
        for n in sorted(preset.memory_lengths):
            inputs = _inputs(vocab, preset.memory_batch, n, preset.seed)
            with torch.inference_mode():
                peak = peak_memory(functools.partial(model, **inputs))
            result[row].setdefault(attn, {})[f"L{n}"] = peak.peak_bytes / 1e6
        model.set_attn_implementation("sdpa")
    return result


def _sizes(out: Path, rows: Sequence[str], models: Mapping[str, nn.Module], preset: Preset) -> dict[str, int]:
    """File bytes on disk: fp32 safetensors; INT8 as save_packed with 8-bit linears (torch keeps
    its embeddings in fp32, so does this file); the students' packed files."""
    from labutils.packfile import save_packed

    sizes: dict[str, int] = {}
    teacher = models.get("fp32")
    for row in rows:
        if row == "fp32" and teacher is not None:
            sizes[row] = _save_safetensors(teacher, out / "sizes" / "fp32.safetensors")
        elif row == "int8" and teacher is not None:
            int8 = copy.deepcopy(teacher)
            quantize_(int8, BitNetConfig(weight_bits=8, act_bits=8, per_channel=False, norm=None))
            path = out / "sizes" / "int8.packed"
            path.parent.mkdir(exist_ok=True)
            sizes[row] = save_packed(int8, path)
        elif _student_file(out, row).is_file():
            sizes[row] = _student_file(out, row).stat().st_size
    return sizes


def _macs_and_energy(models: CpuModels, vocab: int) -> dict[str, dict]:
    """MACs of one review of 256 tokens and their arithmetic energy (``labutils.measure``)."""
    from labutils.measure import count_macs, energy_estimate

    result = {}
    inputs = _inputs(vocab, 1, 256, 0)
    for row, model in models.inference.items():
        if row not in ROWS:  # the ONNX Runtime rows compute what fp32 computes
            continue
        macs = count_macs(model, **inputs)
        extra = {}
        if row == "w1.58a8":  # zero weights cost no add
            extra["nonzero_fraction"] = _nonzero_fraction(models.fake_quantized[row])
        energy = energy_estimate(macs, ROWS[row].energy_scheme, **extra)
        result[row] = {"macs": macs, "energy": energy, **extra}
    return result


def _nonzero_fraction(model: nn.Module) -> float:
    from labutils.bitlinear import bitlinear_layers

    nonzero = total = 0
    for _, layer in bitlinear_layers(model):
        codes, _ = layer.quantized_weight()
        nonzero += int((codes != 0).sum())
        total += codes.numel()
    return nonzero / total


def run_cpu(
    preset: Preset,
    out: Path,
    *,
    rows: Sequence[str] = tuple(ROWS),
    model_path: str | None = None,
    threads: int | None = None,
    untrained: bool = False,
    quiet: bool = False,
    columns: Sequence[str] = CPU_COLUMNS,
) -> dict:
    """Stage 2: agreement, latency, memory, sizes, MACs and energy on this CPU; writes ``out/cpu.json``.

    A student without a trained packed file in ``out`` is left out, or with ``untrained`` measured
    on an untrained stand-in (``write_untrained_student``; its weights_source says so).
    ``columns`` (a subset of CPU_COLUMNS) measures only those and keeps the others of an existing
    ``cpu.json``; ``column_provenance`` says which run (and which weights) made each column."""
    from labutils.measure import threads as use_threads
    from labutils.models import load_tokenizer

    rows = _check_rows(rows)
    columns = tuple(columns)
    if not columns or any(c not in CPU_COLUMNS for c in columns):
        raise ValueError(f"columns must be a non-empty subset of {CPU_COLUMNS}, got {columns}")
    threads = preset.threads if threads is None else threads
    tokenizer = load_tokenizer(model_path)
    vocab = len(tokenizer)
    for row in rows:
        if untrained and ROWS[row].is_student and not _student_file(out, row).is_file():
            write_untrained_student(out, row, model_path, preset)
    with use_threads(threads):
        models = _cpu_models(out, rows, model_path)
        students = models.fake_quantized
        measure = {
            "agreement": lambda: {row: _agreement(students[row], models.inference[row], preset, splits) for row in students},
            "latency": lambda: _latency(models.inference, preset, vocab, quiet),
            "memory": lambda: _memory(models.inference, preset, vocab, quiet),
            "weights_bytes": lambda: {row: _weights_bytes(m) for row, m in models.inference.items()},
            "file_bytes": lambda: _sizes(out, rows, models.inference, preset),
            "compute": lambda: _macs_and_energy(models, vocab),
        }
        splits = load_splits(preset, tokenizer) if students and "agreement" in columns else None
        prov = {**provenance(f"cpu: {_cpu_name()}"), "threads": threads}
        measured = {column: measure[column]() for column in CPU_COLUMNS if column in columns}
    previous = _read_json(out / "cpu.json") if set(columns) != set(CPU_COLUMNS) and (out / "cpu.json").is_file() else {}
    kept = {c: previous[c] for c in CPU_COLUMNS if c not in measured and c in previous}
    column_prov = {c: previous.get("column_provenance", {}).get(c, {**(previous.get("provenance") or {}), "weights_source": previous.get("weights_source")})
                   for c in kept}  # fmt: skip
    column_prov.update({c: {**prov, "weights_source": models.notes} for c in measured})
    result = {"provenance": prov, "weights_source": models.notes, **kept, **measured, "column_provenance": column_prov}
    _write_json(out / "cpu.json", result)
    return result


# --------------------------------------------------------------------------- stage 3: report


def _rows_of(out: Path, cpu: Mapping[str, Any]) -> dict[str, dict]:
    rows = {}
    for name, row in ROWS.items():
        trained = _read_json(_row_file(out, "train", name)) if _row_file(out, "train", name).is_file() else {}
        if not trained and name not in cpu.get("latency", {}):
            continue
        entry: dict[str, Any] = {"label": row.label, "accuracy": trained.get("accuracy")}
        for key in ("accuracy_before_packing", "train_seconds", "history", "bitnet"):
            if key in trained:
                entry[key] = trained[key]
        for key in ("latency", "memory", "weights_bytes", "file_bytes", "agreement", "compute", "weights_source"):
            if name in cpu.get(key, {}):
                entry[key] = cpu[key][name]
        rows[name] = entry
    # The ONNX Runtime rows compute what fp32 computes: latency and weights only. Their peak memory
    # stays in cpu.json but not in the report: ONNX Runtime's arena keeps what an earlier call
    # allocated, so the extra RSS of one call (measure.peak_memory) reads near 0 and is no peak.
    for name in ONNX_ROWS:
        if name in cpu.get("latency", {}):
            entry = {"label": ONNX_LABELS[name], "accuracy": None}
            for key in ("latency", "weights_bytes", "weights_source"):
                if name in cpu.get(key, {}):
                    entry[key] = cpu[key][name]
            rows[name] = entry
    return rows


def check_targets(results: Mapping[str, Any]) -> list[dict]:
    """The issue's targets against ``results``: [{key, text, value, pass}] (pass None = not measured)."""
    rows = results["rows"]
    get = lambda row, *keys: _dig(rows.get(row, {}), keys)
    teacher = get("fp32", "accuracy")

    def gap(row: str) -> float | None:
        acc = get(row, "accuracy")
        return None if acc is None or teacher is None else 100 * (teacher - acc)

    def speedup(base: str) -> float | None:
        a, b = get(base, "latency", "b32", "L256", "median_ms"), get("w1.58a8", "latency", "b32", "L256", "median_ms")
        return None if a is None or b is None else a / b

    fp32_file, w158_file = get("fp32", "file_bytes"), get("w1.58a8", "file_bytes")
    values = {
        "teacher_accuracy": (None if teacher is None else 100 * teacher, lambda v: v >= 89.0),
        "w158a8_gap": (gap("w1.58a8"), lambda v: v <= 1.0),
        "w1a8_gap": (gap("w1a8"), lambda v: v <= 2.0),
        "w158a8_size": (None if not (fp32_file and w158_file) else fp32_file / w158_file, lambda v: v >= 10.0),
        "w158a8_vs_fp32_latency": (speedup("fp32"), lambda v: v >= 1.5),
        "w158a8_vs_int8_latency": (speedup("int8"), lambda v: v >= 1.0),
    }
    checked = []
    for key, text in TARGETS:
        value, ok = values[key]
        checked.append({"key": key, "text": text, "value": value, "pass": None if value is None else bool(ok(value))})
    return checked


def _dig(mapping: Any, keys: Sequence[str]) -> Any:
    for key in keys:
        if not isinstance(mapping, Mapping) or key not in mapping:
            return None
        mapping = mapping[key]
    return mapping


def run_report(preset: Preset, out: Path) -> dict:
    """Stage 3: merge the stages into ``out/results.json`` (validated), print the table, write charts."""
    cpu = _read_json(out / "cpu.json") if (out / "cpu.json").is_file() else {}
    train_prov = {}
    for name in ROWS:
        path = _row_file(out, "train", name)
        if path.is_file():
            train_prov[name] = _read_json(path).get("provenance")
    results = {
        "schema_version": SCHEMA_VERSION,
        "benchmark": "IMDb sentiment: full precision vs INT8 vs 1.58-bit vs 1-bit",
        "preset": asdict(preset),
        "provenance": {"train": train_prov, "cpu": cpu.get("provenance"), "report": provenance("report")},
        "rows": _rows_of(out, cpu),
    }
    results["targets"] = check_targets(results)
    validate_results(results)
    _write_json(out / "results.json", results)
    print(format_table(results))
    for name, fig in charts(results).items():
        fig.write_html(out / f"{name}.html", include_plotlyjs="cdn", full_html=True)
    return results


# --------------------------------------------------------------------------- results: schema, table, charts

_NUM = {"type": "number"}
_NUM_OR_NULL = {"type": ["number", "null"]}
_BY_LENGTH = {"type": "object", "patternProperties": {"^L[0-9]+$": {}}, "additionalProperties": False}

RESULTS_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "labutils IMDb benchmark results",
    "type": "object",
    "required": ["schema_version", "preset", "provenance", "rows", "targets"],
    "properties": {
        "schema_version": {"const": SCHEMA_VERSION},
        "preset": {"type": "object", "required": ["name", "max_length", "latency_lengths", "latency_batches"]},
        "provenance": {
            "type": "object",
            "required": ["train", "cpu"],
            "properties": {
                "train": {"type": "object", "additionalProperties": {
                    "type": "object", "required": ["commit", "device", "versions", "date"]}},
                "cpu": {"type": ["object", "null"], "required": ["commit", "device", "versions", "date", "threads"]},
            },
        },
        "rows": {
            "type": "object",
            "propertyNames": {"enum": [*ROWS, *ONNX_ROWS]},
            "additionalProperties": {
                "type": "object",
                "required": ["label", "accuracy"],
                "properties": {
                    "accuracy": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
                    "file_bytes": {"type": "integer", "minimum": 1},
                    "weights_bytes": {"type": "integer", "minimum": 1},
                    "latency": {"type": "object", "patternProperties": {"^b[0-9]+$": {
                        "type": "object", "patternProperties": {"^L[0-9]+$": {
                            "type": "object", "required": ["median_ms", "best_ms"],
                            "properties": {"median_ms": _NUM, "best_ms": _NUM}}}}}},
                    "memory": {"type": "object", "propertyNames": {"enum": ["eager", "sdpa"]},
                               "additionalProperties": _BY_LENGTH},
                    "agreement": {"type": "object", "required": ["reviews", "max_abs_logit_diff", "same_prediction"]},
                    "compute": {"type": "object", "required": ["macs", "energy"]},
                },
            },
        },
        "targets": {"type": "array", "items": {
            "type": "object", "required": ["key", "text", "value", "pass"],
            "properties": {"value": _NUM_OR_NULL, "pass": {"type": ["boolean", "null"]}}}},
    },
}  # fmt: skip


def validate_results(results: Mapping[str, Any]) -> None:
    """Raise ``jsonschema.ValidationError`` unless ``results`` follows ``RESULTS_SCHEMA``."""
    import jsonschema

    jsonschema.validate(results, RESULTS_SCHEMA)


def load_results(path: str | os.PathLike) -> dict:
    """Read and validate a ``results.json``."""
    results = _read_json(Path(path))
    validate_results(results)
    return results


def format_table(results: Mapping[str, Any], batch: int = 32, length: int = 256) -> str:
    """The benchmark as a text table, then the targets."""
    rows = results["rows"]
    teacher = _dig(rows, ("fp32", "accuracy"))
    b, n = f"b{batch}", f"L{length}"
    lines = [f"{'row':<26}{'accuracy':>9}{'Δ pts':>7}{'file MB':>9}{f'ms {b} {n}':>13}{'MB sdpa':>9}{'MB eager':>9}{'energy µJ':>10}"]
    for name, row in rows.items():
        acc = row.get("accuracy")
        delta = "" if acc is None or teacher is None or name == "fp32" else f"{100 * (acc - teacher):+.2f}"
        ms = _dig(row, ("latency", b, n, "median_ms"))
        mem = [_dig(row, ("memory", attn, n)) for attn in ("sdpa", "eager")]
        energy = _dig(row, ("compute", "energy", "total_j"))
        fmt = lambda value, spec: "" if value is None else format(value, spec)
        file_mb = None if row.get("file_bytes") is None else row["file_bytes"] / 1e6
        cells = [
            f"{row['label']:<26}",
            f"{fmt(None if acc is None else 100 * acc, '.2f'):>9}",
            f"{delta:>7}",
            f"{fmt(file_mb, '.2f'):>9}",
            f"{fmt(ms, '.1f'):>13}",
            *(f"{fmt(m, '.0f'):>9}" for m in mem),
            f"{fmt(None if energy is None else energy * 1e6, '.1f'):>10}",
        ]
        lines.append("".join(cells))
    lines.append("")
    for t in results.get("targets", []):
        mark = {True: "PASS", False: "MISS", None: "n/a "}[t["pass"]]
        value = "" if t["value"] is None else f" ({t['value']:.2f})"
        lines.append(f"[{mark}] {t['text']}{value}")
    return "\n".join(lines)


def table_records(results: Mapping[str, Any], speed_points: Sequence[tuple[int, int]] = ((1, 128), (32, 256))) -> list[dict[str, Any]]:
    """The benchmark as one record per row (for a DataFrame): accuracy and its gap to the
    teacher (points), file and resident-weight sizes and how many times smaller than FP32's,
    speed-up over FP32 at each (batch, length) of ``speed_points`` (ratio of median latencies),
    peak extra memory at the longest length (SDPA) and the arithmetic energy of one pass."""
    rows = results["rows"]
    base = rows.get("fp32", {})
    teacher = base.get("accuracy")
    longest = max((int(k[1:]) for k in _dig(base, ("memory", "sdpa")) or {}), default=None)

    def ratio(a: Any, b: Any) -> float | None:
        return None if a is None or b is None or b == 0 else a / b

    records = []
    for name, row in rows.items():
        acc = row.get("accuracy")
        record: dict[str, Any] = {
            "model": row["label"],
            "accuracy (%)": None if acc is None else 100 * acc,
            "Δ vs teacher (points)": None if acc is None or teacher is None or name == "fp32" else 100 * (acc - teacher),
            "file (MB)": None if row.get("file_bytes") is None else row["file_bytes"] / 1e6,
            "file: × smaller": ratio(base.get("file_bytes"), row.get("file_bytes")),
            "weights in RAM (MB)": None if row.get("weights_bytes") is None else row["weights_bytes"] / 1e6,
            "RAM: × smaller": ratio(base.get("weights_bytes"), row.get("weights_bytes")),
        }
        for b, n in speed_points:
            key = ("latency", f"b{b}", f"L{n}", "median_ms")
            record[f"speed-up b{b} L{n}"] = ratio(_dig(base, key), _dig(row, key))
        if longest is not None:
            record[f"peak MB L{longest} (SDPA)"] = _dig(row, ("memory", "sdpa", f"L{longest}"))
        energy = _dig(row, ("compute", "energy", "total_j"))
        record["energy (µJ)"] = None if energy is None else energy * 1e6
        records.append(record)
    return records


def charts(results: Mapping[str, Any]) -> dict[str, Any]:
    """Plotly figures: accuracy vs file size, latency vs length (one panel per batch), peak
    memory vs length (eager vs SDPA)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    rows = results["rows"]
    figs = {}
    size = go.Figure()
    for name, row in rows.items():
        if row.get("file_bytes") and row.get("accuracy") is not None:
            size.add_trace(go.Scatter(
                x=[row["file_bytes"] / 1e6], y=[100 * row["accuracy"]], mode="markers+text", name=row["label"],
                text=[row["label"]], textposition="top center", marker={"size": 12}))
    size.update_layout(title="Accuracy vs file size", xaxis_title="file size on disk (MB, log)", xaxis_type="log",
                       yaxis_title="test accuracy (%)", template="plotly_white", showlegend=False)
    figs["accuracy_vs_size"] = size

    # The trade-off at a glance: what each row keeps (accuracy) for what it saves (size) and gains (speed).
    speed_point = (1, 128) if _dig(rows, ("fp32", "latency", "b1", "L128")) is not None else None
    trade = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.06,
                          subplot_titles=["file size on disk", "speed-up over FP32" + (" (batch 1, 128 tokens)" if speed_point else "")])
    base = rows.get("fp32", {})
    for name, row in rows.items():
        if row.get("accuracy") is None or not row.get("file_bytes"):
            continue
        acc = 100 * row["accuracy"]
        trade.add_trace(go.Scatter(x=[row["file_bytes"] / 1e6], y=[acc], mode="markers+text", text=[row["label"]],
                                   textposition="top center", marker={"size": 13}, name=row["label"], legendgroup=name), row=1, col=1)
        key = ("latency", "b1", "L128", "median_ms")
        if speed_point and _dig(row, key) and _dig(base, key):
            trade.add_trace(go.Scatter(x=[_dig(base, key) / _dig(row, key)], y=[acc], mode="markers+text", text=[row["label"]],
                                       textposition="top center", marker={"size": 13}, name=row["label"], legendgroup=name,
                                       showlegend=False), row=1, col=2)
    trade.update_xaxes(title_text="MB (log)", type="log", row=1, col=1)
    trade.update_xaxes(title_text="× FP32's speed (higher is faster)", row=1, col=2)
    trade.update_yaxes(title_text="test accuracy (%)", row=1, col=1)
    trade.update_layout(title="What each format keeps, saves and gains", template="plotly_white", showlegend=False)
    figs["tradeoff"] = trade

    batches = list(results["preset"]["latency_batches"])
    lat = make_subplots(rows=1, cols=len(batches), subplot_titles=[f"batch {b}" for b in batches])
    for name, row in rows.items():
        for col, b in enumerate(batches, start=1):
            series = _dig(row, ("latency", f"b{b}")) or {}
            xs = sorted(int(k[1:]) for k in series)
            lat.add_trace(go.Scatter(x=xs, y=[series[f"L{x}"]["median_ms"] for x in xs], mode="lines+markers",
                                     name=row["label"], legendgroup=name, showlegend=col == 1), row=1, col=col)
    lat.update_yaxes(title_text="median latency (ms, log)", type="log")
    lat.update_xaxes(title_text="sequence length (tokens)", type="log")
    lat.update_layout(title="CPU inference latency vs length", template="plotly_white")
    figs["latency_vs_length"] = lat

    mem = go.Figure()
    for name, row in rows.items():
        for attn, dash in (("eager", "dash"), ("sdpa", "solid")):
            series = _dig(row, ("memory", attn)) or {}
            xs = sorted(int(k[1:]) for k in series)
            if xs:
                mem.add_trace(go.Scatter(x=xs, y=[series[f"L{x}"] for x in xs], mode="lines+markers",
                                         name=f"{row['label']}, {attn}", line={"dash": dash}))
    mem.update_layout(title=f"Peak activation memory vs length (batch {results['preset']['memory_batch']})",
                      xaxis_title="sequence length (tokens)", yaxis_title="peak extra resident memory (MB)",
                      template="plotly_white")
    figs["memory_vs_length"] = mem
    return figs


def profile_chart(profiles: Mapping[str, Mapping[str, Any]], rows: Sequence[str] = ("w1.58a8", "w1a1"),
                  points: Sequence[str] = ("b1_L128", "b32_L256"), share: bool = True) -> Any:
    """Where the time of a forward pass goes, before and after: one panel per (batch, length) of
    ``points``, one stacked bar per (row, profile) with the categories of
    ``kernels.profile.CATEGORIES``. ``profiles`` maps a label ("before", "after") to the JSON
    ``python -m labutils.kernels.profile`` writes; ``share`` stacks percentages of each pass (the
    hooked total in ms above each bar), else milliseconds."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from labutils.kernels.profile import CATEGORIES

    fig = make_subplots(rows=1, cols=len(points), subplot_titles=[p.replace("_", " ").replace("b", "batch ", 1).replace(" L", ", length ") for p in points])
    palette = ["#636efa", "#ef553b", "#00cc96", "#ab63fa", "#ffa15a", "#19d3f3", "#ff6692", "#b6e880", "#ff97ff", "#fecb52"]
    for col, point in enumerate(points, start=1):
        bars = [(f"{ROWS[row].label.split(' (')[0]}<br>{when}", data["profiles"][row][point])
                for row in rows for when, data in profiles.items() if point in data["profiles"].get(row, {})]
        for i, category in enumerate(CATEGORIES):
            ys = [1e3 * p[category] * (100 / (1e3 * p["total"]) if share else 1) for _, p in bars]
            fig.add_trace(go.Bar(x=[b for b, _ in bars], y=ys, name=category.replace("_", " "), legendgroup=category,
                                 marker_color=palette[i % len(palette)], showlegend=col == 1,
                                 customdata=[1e3 * p[category] for _, p in bars],
                                 hovertemplate="%{x}: %{customdata:.1f} ms<extra>" + category + "</extra>"), row=1, col=col)
        fig.add_trace(go.Scatter(x=[b for b, _ in bars], y=[100 if share else 1e3 * p["total"] for _, p in bars],
                                 text=[f"{1e3 * p['total']:,.0f} ms" for _, p in bars], mode="text", textposition="top center",
                                 showlegend=False, hoverinfo="skip"), row=1, col=col)
    fig.update_yaxes(title_text="share of the forward pass (%)" if share else "ms per forward pass", range=[0, 112] if share else None)
    fig.update_layout(barmode="stack", template="plotly_white", title="Where the time of a packed forward pass goes (2 threads)")
    return fig


# --------------------------------------------------------------------------- the command


STAGES = ("train", "cpu", "report")


def _with_overrides(base: Preset, overrides: Mapping[str, Any]) -> Preset:
    """``base`` with some fields replaced (and validated by ``Preset.__post_init__``)."""
    import dataclasses

    from labutils.bench import UsageError

    names = [f.name for f in dataclasses.fields(Preset)]
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise UsageError(f"unknown preset field(s) {unknown}; the fields are {names}")
    return replace(base, **overrides) if overrides else base


def _check_run_options(stages: Sequence[str], threads: int | None, device: str) -> None:
    """Reject bad stages, thread counts and devices before anything is written or trained."""
    from labutils.bench import UsageError

    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise UsageError(f"stages must be among {STAGES} (at least one), got {list(stages)}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise UsageError(f"threads must be an int >= 1 (or None: the preset's), got {threads!r}")
    if device != "auto":
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise UsageError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r} ({exc})") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"device {device!r} was asked for, but torch sees no CUDA device")
        if dev.type not in ("cpu", "cuda"):
            raise UsageError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")


def _resolve_preset(out: Path, preset: Preset) -> Preset:
    """Save ``preset`` in ``out/preset.json``, or check that a resumed run uses the same one."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "preset.json"
    current = json.loads(json.dumps(asdict(preset)))
    if path.is_file():
        try:
            saved = _read_json(path)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path} is unreadable ({exc}); delete it (or the folder) to start over") from None
        # a field added since that run was saved is taken at its default (older folders resume)
        defaults = {f.name: f.default for f in dataclasses.fields(Preset) if f.default is not dataclasses.MISSING}
        saved = {**{k: v for k, v in json.loads(json.dumps(defaults)).items() if k not in saved}, **saved} \
            if isinstance(saved, dict) else saved  # fmt: skip
        if saved != current:
            changed = sorted(k for k in current if saved.get(k) != current.get(k))
            raise ValueError(
                f"{out} holds a run of another preset (differs in {changed}); use a new --out or delete it"
            )
    else:
        _write_json(path, current)
    return preset


def run(
    preset: str | Preset = "ci",
    out: str | os.PathLike = "imdb-benchmark",
    *,
    stages: Sequence[str] = STAGES,
    rows: Sequence[str] = tuple(ROWS),
    model_path: str | None = None,
    device: str = "auto",
    threads: int | None = None,
    untrained: bool = False,
    quiet: bool = False,
    cpu_columns: Sequence[str] = CPU_COLUMNS,
    **overrides: Any,
) -> dict | None:
    """Run the benchmark's ``stages`` for ``preset`` (a name in PRESETS or a Preset, with field
    ``overrides``) into ``out``; returns the results dict when "report" ran."""
    base = PRESETS[preset] if isinstance(preset, str) else preset
    if not isinstance(base, Preset):
        raise TypeError(f"preset must be one of {tuple(PRESETS)} or a Preset, got {preset!r}")
    config = _with_overrides(base, overrides)
    _check_run_options(stages, threads, device)
    rows = _check_rows(rows)
    if not cpu_columns or any(c not in CPU_COLUMNS for c in cpu_columns):
        raise ValueError(f"cpu columns must be a non-empty subset of {CPU_COLUMNS}, got {tuple(cpu_columns)}")
    for field in ("student_init", "student_teacher"):
        source = getattr(config, field)
        if source != "fp32" and source not in STUDENTS:
            raise ValueError(f"{field} must be 'fp32' or a student row among {STUDENTS}, got {source!r}")
        if source != "fp32" and source in rows and "train" in stages:
            raise ValueError(f"{field}={source!r}: train that row first (its own run), then the rows that start from it")
    out = Path(out)
    _resolve_preset(out, config)
    if "train" in stages:
        run_train(config, out, rows=rows, model_path=model_path, device=device, quiet=quiet)
    if "cpu" in stages:
        run_cpu(config, out, rows=rows, model_path=model_path, threads=threads, untrained=untrained, quiet=quiet,
                columns=cpu_columns)
    if "report" in stages:
        return run_report(config, out)
    return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), default="ci")
    parser.add_argument("--preset-file", type=Path, help="a preset.json written by an earlier run (internal)")
    parser.add_argument("--stage", choices=[*STAGES, "all", "int8"], default="all")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, among {','.join(ROWS)}")
    parser.add_argument("--model", default=None, help="checkpoint folder or hub id (default: MiniLM)")
    parser.add_argument("--device", default="auto", help="training device: auto, cpu, cuda")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for latency/memory (default: preset's)")
    parser.add_argument("--train-size", type=int, default=None)
    parser.add_argument("--test-size", type=int, default=None)
    parser.add_argument("--untrained", action="store_true",
                        help="cpu stage: measure students not trained here on untrained stand-ins (size, latency, memory only)")
    parser.add_argument("--columns", default=",".join(CPU_COLUMNS),
                        help="cpu stage: measure only these (comma-separated), keep the others of an existing cpu.json")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a preset field (repeatable), e.g. --set student_epochs=8 "
                             "--set student_lr=1e-4; recorded in DIR/preset.json")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["student_epochs=8", "latency_lengths=[64,128]"]`` -> ``{"student_epochs": 8, ...}``
    (``labutils.bench.parse_set_options`` on this module's ``Preset``)."""
    from labutils.bench import parse_set_options

    return parse_set_options(items, Preset)


def run_command(args: argparse.Namespace) -> dict[str, Any]:
    """``python -m labutils.bench imdb``: see the module docstring."""
    out = Path(args.out or "imdb-benchmark")
    if args.stage == "int8":  # the INT8 accuracy subprocess of the train stage
        preset = Preset(**{k: tuple(v) if isinstance(v, list) else v for k, v in _read_json(args.preset_file).items()})
        result = _int8_accuracy(preset, out, args.model, args.threads or 1, args.quiet)
        _write_json(_row_file(out, "train", "int8"), {**result, "provenance": provenance(result["device"])})
        print(f"[train] int8: test accuracy {result['accuracy']:.4f} ({result['eval_seconds']:.0f} s on the CPU)", flush=True)
        return {"int8_accuracy": result["accuracy"]}
    overrides = {k: v for k, v in (("train_size", args.train_size), ("test_size", args.test_size)) if v is not None}
    overrides.update(parse_overrides(getattr(args, "overrides", [])))
    stages = STAGES if args.stage == "all" else (args.stage,)
    # The preset is built here, so that fields sharing a name with run()'s options (threads) work with --set.
    preset = _with_overrides(PRESETS[args.preset], overrides)
    results = run(preset, out, stages=stages, rows=args.rows.split(","), model_path=args.model,
                  device=args.device, threads=args.threads, untrained=args.untrained, quiet=args.quiet,
                  cpu_columns=tuple(c.strip() for c in args.columns.split(",")))  # fmt: skip
    if results is None:
        return {"out": str(out), "stages": list(stages)}
    return {"out": str(out), "pass": all(t["pass"] is not False for t in results["targets"])}
