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

The package, bottom up: ``preset`` (rows, presets, targets), ``checkpoints`` (where each row's
model lives in a run folder; building, saving and loading it), ``train``, ``cpu`` and ``report``
(the three stages), ``command`` (``run`` and the command line). All of them write through
``labutils.runs`` (provenance, atomic JSON and safetensors).
"""

from labutils.benchmark.checkpoints import (
    int8_dynamic,
    load_student,
    load_teacher,
    student_config,
    student_skeleton,
    teacher_skeleton,
    write_untrained_student,
)
from labutils.benchmark.command import (
    STAGES,
    add_arguments,
    parse_overrides,
    resolve_preset,
    run,
    run_command,
    with_overrides,
)
from labutils.benchmark.cpu import CPU_COLUMNS, random_inputs, run_cpu
from labutils.benchmark.onnx_runtime import ONNX_LABELS, ONNX_ROWS, export_onnx
from labutils.benchmark.preset import DATA_SOURCES, PRESETS, ROWS, STUDENTS, TARGETS, Preset, Row
from labutils.benchmark.report import (
    RESULTS_SCHEMA,
    SCHEMA_VERSION,
    charts,
    check_targets,
    format_table,
    load_results,
    lookup,
    profile_chart,
    rows_of,
    run_report,
    table_records,
    validate_results,
)
from labutils.benchmark.train import Splits, accuracy, load_splits, run_train

__all__ = [
    "CPU_COLUMNS",
    "DATA_SOURCES",
    "ONNX_LABELS",
    "ONNX_ROWS",
    "PRESETS",
    "RESULTS_SCHEMA",
    "ROWS",
    "SCHEMA_VERSION",
    "STAGES",
    "STUDENTS",
    "TARGETS",
    "Preset",
    "Row",
    "Splits",
    "accuracy",
    "add_arguments",
    "charts",
    "check_targets",
    "export_onnx",
    "format_table",
    "int8_dynamic",
    "load_results",
    "load_splits",
    "load_student",
    "load_teacher",
    "lookup",
    "parse_overrides",
    "profile_chart",
    "random_inputs",
    "resolve_preset",
    "rows_of",
    "run",
    "run_command",
    "run_cpu",
    "run_report",
    "run_train",
    "student_config",
    "student_skeleton",
    "table_records",
    "teacher_skeleton",
    "validate_results",
    "with_overrides",
    "write_untrained_student",
]
