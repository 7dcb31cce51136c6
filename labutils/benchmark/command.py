"""``python -m labutils.bench imdb``: the stages run in order into one resumable folder."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from labutils.benchmark.checkpoints import row_file
from labutils.benchmark.cpu import CPU_COLUMNS, run_cpu
from labutils.benchmark.preset import PRESETS, ROWS, STUDENTS, Preset, check_rows
from labutils.benchmark.report import run_report
from labutils.benchmark.train import CPU_ACCURACY_ROWS, int8_accuracy, run_train
from labutils.runs import provenance, read_json, write_json

STAGES = ("train", "cpu", "report")


def with_overrides(base: Preset, overrides: Mapping[str, Any]) -> Preset:
    """``base`` with some fields replaced (and validated by ``Preset.__post_init__``)."""
    import dataclasses

    from labutils.runs import UsageError

    names = [f.name for f in dataclasses.fields(Preset)]
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise UsageError(f"unknown preset field(s) {unknown}; the fields are {names}")
    return replace(base, **overrides) if overrides else base


def _check_run_options(stages: Sequence[str], threads: int | None, device: str) -> None:
    """Reject bad stages, thread counts and devices before anything is written or trained."""
    from labutils.runs import UsageError

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


def resolve_preset(out: Path, preset: Preset) -> Preset:
    """Save ``preset`` in ``out/preset.json``, or check that a resumed run uses the same one."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "preset.json"
    current = json.loads(json.dumps(asdict(preset)))
    if path.is_file():
        try:
            saved = read_json(path)
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
        write_json(path, current)
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
    config = with_overrides(base, overrides)
    _check_run_options(stages, threads, device)
    rows = check_rows(rows)
    if not cpu_columns or any(c not in CPU_COLUMNS for c in cpu_columns):
        raise ValueError(f"cpu columns must be a non-empty subset of {CPU_COLUMNS}, got {tuple(cpu_columns)}")
    for field in ("student_init", "student_teacher"):
        source = getattr(config, field)
        if source != "fp32" and source not in STUDENTS:
            raise ValueError(f"{field} must be 'fp32' or a student row among {STUDENTS}, got {source!r}")
        if source != "fp32" and source in rows and "train" in stages:
            raise ValueError(f"{field}={source!r}: train that row first (its own run), then the rows that start from it")
    out = Path(out)
    resolve_preset(out, config)
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
    parser.add_argument("--stage", choices=[*STAGES, "all", "int8"], default="all",
                        help="int8: the CPU accuracy rows alone (int8, and onnx-int8 if --rows names it), from a trained teacher in --out")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, among {','.join(ROWS)} (--stage int8: int8,onnx-int8)")
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
    (``labutils.runs.parse_set_options`` on the benchmark's ``Preset``)."""
    from labutils.runs import parse_set_options

    return parse_set_options(items, Preset)


def run_command(args: argparse.Namespace) -> dict[str, Any]:
    """``python -m labutils.bench imdb``: see the module docstring."""
    out = Path(args.out or "imdb-benchmark")
    if args.stage == "int8":  # the CPU accuracy subprocess of the train stage (int8; onnx-int8 when asked)
        preset = Preset(**{k: tuple(v) if isinstance(v, list) else v for k, v in read_json(args.preset_file).items()})
        asked = [row for row in args.rows.split(",") if row in CPU_ACCURACY_ROWS] or ["int8"]
        scores = {}
        for row in asked:
            result = int8_accuracy(preset, out, args.model, args.threads or 1, args.quiet, row=row)
            write_json(row_file(out, "train", row), {**result, "provenance": provenance(result["device"])})
            print(f"[train] {row}: test accuracy {result['accuracy']:.4f} ({result['eval_seconds']:.0f} s on the CPU)", flush=True)
            scores[f"{row}_accuracy"] = result["accuracy"]
        return scores
    overrides = {k: v for k, v in (("train_size", args.train_size), ("test_size", args.test_size)) if v is not None}
    overrides.update(parse_overrides(getattr(args, "overrides", [])))
    stages = STAGES if args.stage == "all" else (args.stage,)
    # The preset is built here, so that fields sharing a name with run()'s options (threads) work with --set.
    preset = with_overrides(PRESETS[args.preset], overrides)
    results = run(preset, out, stages=stages, rows=args.rows.split(","), model_path=args.model,
                  device=args.device, threads=args.threads, untrained=args.untrained, quiet=args.quiet,
                  cpu_columns=tuple(c.strip() for c in args.columns.split(",")))  # fmt: skip
    if results is None:
        return {"out": str(out), "stages": list(stages)}
    return {"out": str(out), "pass": all(t["pass"] is not False for t in results["targets"])}
