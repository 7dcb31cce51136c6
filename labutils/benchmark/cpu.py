"""The CPU stage: every row loaded (students onto ``labutils.kernels``), checked and measured.

Agreement of the packed students with their fake-quantized selves, latency (interleaved
rounds, paired ratios), peak memory against length, file sizes, MACs and an energy estimate.

A packed student runs on the compiled encoder (``labutils.engine.encoder.EncoderEngine``);
``LABBOOK_PACKED_ENCODER=layers`` runs it layer by layer instead (``PackedBitLinear`` modules
between torch operations, the path before issue 28), for comparison. Its file says which ran."""

from __future__ import annotations

import copy
import functools
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from labutils.benchmark.checkpoints import (
    int8_dynamic,
    load_student,
    load_teacher,
    pack_file,
    student_file,
    write_untrained_student,
)
from labutils.benchmark.onnx_runtime import OnnxModel, export_onnx
from labutils.benchmark.preset import ROWS, Preset, check_rows
from labutils.benchmark.train import Splits, load_splits
from labutils.bitlinear import BitNetConfig, quantize_
from labutils.runs import device_name, provenance, read_json, save_safetensors, weights_bytes, write_json

CPU_COLUMNS = ("agreement", "latency", "memory", "weights_bytes", "file_bytes", "compute")
PACKED_ENCODER_VAR = "LABBOOK_PACKED_ENCODER"
PACKED_ENCODERS = ("engine", "layers")


def packed_encoder() -> str:
    """How packed students run: "engine" (default) or "layers", from ``LABBOOK_PACKED_ENCODER``."""
    value = os.environ.get(PACKED_ENCODER_VAR, "").strip() or "engine"
    if value not in PACKED_ENCODERS:
        raise ValueError(f"{PACKED_ENCODER_VAR} must be one of {PACKED_ENCODERS}, got {value!r}")
    return value


def random_inputs(vocab_size: int, batch: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    """Random token ids (no padding: every position is a real token, the worst case) for timing."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab_size, (batch, length), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@dataclass
class CpuModels:
    """What the CPU stage measures: {row: inference model} (FP32, INT8, packed students on the
    kernels), {student row: the same student fake-quantized}, {row: where its weights came from}."""

    inference: dict[str, nn.Module]
    fake_quantized: dict[str, nn.Module]
    notes: dict[str, str]


def cpu_models(out: Path, rows: Sequence[str], model_path: str | None) -> CpuModels:
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
        elif student_file(out, row).is_file():
            student = load_student(out, row, model_path)
            models.fake_quantized[row], models.inference[row] = student, pack_model(student)
            path = student_file(out, row)
            # the int4 embeddings stay int4 in RAM, each looked-up row dequantized when read
            pack_embeddings_(models.inference[row], load_packed(path))
            runner = packed_encoder()
            if runner == "engine":
                from labutils.engine.encoder import EncoderEngine

                models.inference[row] = EncoderEngine(models.inference[row])
            trained = path == pack_file(out, row)
            models.notes[row] = (f"packed file {path.relative_to(out)}" + ("" if trained else " (untrained stand-in)")
                                 + f", run by the {'compiled encoder engine' if runner == 'engine' else 'PackedBitLinear layers'}")  # fmt: skip
    if "fp32" in rows:
        add_onnx_rows(models, teacher, out, source)
    return models



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
        inputs = random_inputs(vocab, b, n, preset.seed)
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
            inputs = random_inputs(vocab, preset.memory_batch, n, preset.seed)
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
            sizes[row] = save_safetensors(teacher, out / "sizes" / "fp32.safetensors")
        elif row == "int8" and teacher is not None:
            int8 = copy.deepcopy(teacher)
            quantize_(int8, BitNetConfig(weight_bits=8, act_bits=8, per_channel=False, norm=None))
            path = out / "sizes" / "int8.packed"
            path.parent.mkdir(exist_ok=True)
            sizes[row] = save_packed(int8, path)
        elif student_file(out, row).is_file():
            sizes[row] = student_file(out, row).stat().st_size
    return sizes


def _macs_and_energy(models: CpuModels, vocab: int) -> dict[str, dict]:
    """MACs of one review of 256 tokens and their arithmetic energy (``labutils.measure``)."""
    from labutils.measure import count_macs, energy_estimate

    result = {}
    inputs = random_inputs(vocab, 1, 256, 0)
    for row, model in models.inference.items():
        if row not in ROWS:  # the ONNX Runtime rows compute what fp32 computes
            continue
        # MACs depend on shapes only: a student is counted on its BitLinear model, whose linears
        # the hooks see (the compiled engine has no linear modules)
        macs = count_macs(models.fake_quantized.get(row, model), **inputs)
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

    rows = check_rows(rows)
    columns = tuple(columns)
    if not columns or any(c not in CPU_COLUMNS for c in columns):
        raise ValueError(f"columns must be a non-empty subset of {CPU_COLUMNS}, got {columns}")
    threads = preset.threads if threads is None else threads
    tokenizer = load_tokenizer(model_path)
    vocab = len(tokenizer)
    for row in rows:
        if untrained and ROWS[row].is_student and not student_file(out, row).is_file():
            write_untrained_student(out, row, model_path, preset)
    with use_threads(threads):
        models = cpu_models(out, rows, model_path)
        students = models.fake_quantized
        measure = {
            "agreement": lambda: {row: _agreement(students[row], models.inference[row], preset, splits) for row in students},
            "latency": lambda: _latency(models.inference, preset, vocab, quiet),
            "memory": lambda: _memory(models.inference, preset, vocab, quiet),
            "weights_bytes": lambda: {row: weights_bytes(m) for row, m in models.inference.items()},
            "file_bytes": lambda: _sizes(out, rows, models.inference, preset),
            "compute": lambda: _macs_and_energy(models, vocab),
        }
        splits = load_splits(preset, tokenizer) if students and "agreement" in columns else None
        prov = {**provenance(device_name("cpu")), "threads": threads}
        measured = {column: measure[column]() for column in CPU_COLUMNS if column in columns}
    previous = read_json(out / "cpu.json") if set(columns) != set(CPU_COLUMNS) and (out / "cpu.json").is_file() else {}
    kept = {c: previous[c] for c in CPU_COLUMNS if c not in measured and c in previous}
    column_prov = {c: previous.get("column_provenance", {}).get(c, {**(previous.get("provenance") or {}), "weights_source": previous.get("weights_source")})
                   for c in kept}  # fmt: skip
    column_prov.update({c: {**prov, "weights_source": models.notes} for c in measured})
    result = {"provenance": prov, "weights_source": models.notes, **kept, **measured, "column_provenance": column_prov}
    write_json(out / "cpu.json", result)
    return result


# --------------------------------------------------------------------------- the ONNX Runtime rows


def add_onnx_rows(models: CpuModels, teacher: nn.Module, out: Path, source: str) -> None:
    """Export the teacher to ONNX (once, in ``out/onnx``), quantize it dynamically to INT8 and
    add both as ONNX_ROWS; skipped with a printed reason where onnxruntime or onnx is missing or
    the export fails."""
    try:
        paths = export_onnx(teacher, out / "onnx")
    except ImportError as exc:
        print(f"[cpu] ONNX Runtime rows skipped: {exc} (pip install onnxruntime onnx)", flush=True)
        return
    except Exception as exc:  # noqa: BLE001 - an exporter failure must not lose the other rows
        print(f"[cpu] ONNX Runtime rows skipped: the export or quantization failed: {type(exc).__name__}: {exc}", flush=True)
        return
    threads = torch.get_num_threads()
    for row, path in paths.items():
        models.inference[row] = OnnxModel(path, threads)
        models.notes[row] = f"{source}, exported to ONNX ({path.relative_to(out)}), ONNX Runtime, {threads} threads"
