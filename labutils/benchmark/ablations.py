"""The recipe sweeps of ``results/imdb-full/gpu_sweep.sh`` read back: one row per variant, seeds
grouped, and each difference judged by a paired test on the shared test reviews.

A sweep folder holds ``teacher/train_fp32.json`` and one folder per variant with its
``preset.json`` and ``train_<row>.json``. ``sweep_runs`` lists every run; ``sweep_table`` groups
the runs of one recipe over seeds (``seed=N`` is the only difference) and compares each recipe
with its row's base recipe and with the teacher by McNemar's exact test
(``labutils.stats.mcnemar``) wherever both runs stored their test predictions; a p-value is left
out (None) for runs made before predictions were stored.

Several sweeps (GPU sessions, each with its own teacher run) are read as one: a student is
measured against the teacher of its own sweep, and recipes are paired across sweeps on the same
test reviews.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from labutils.benchmark.preset import STUDENTS
from labutils.benchmark.train import TEST_LABELS
from labutils.stats import decode_predictions, mcnemar, seed_summary

__all__ = ["sweep_runs", "sweep_table"]

# preset fields that only say how a run was measured or named, not what recipe it trained
_NOT_RECIPE = {"name", "seed", "latency_lengths", "latency_batches", "latency_repeat", "memory_lengths",
               "memory_batch", "agreement_reviews", "threads", "eval_batch_size"}  # fmt: skip


def _read(path: Path) -> Any:
    return json.loads(path.read_text())


def sweep_runs(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """Every finished run of a sweep folder: ``{"variant", "row", "seed", "recipe", "accuracy",
    "best_val", "predictions"}`` (``recipe``: the preset's fields that differ from the teacher
    folder's, seed excluded, as a sorted tuple of "field=value"; ``predictions``: uint8 ``[n]``
    or None; ``sweep``: the folder), the teacher first (row "fp32")."""
    folder = Path(folder)
    teacher_json = folder / "teacher" / "train_fp32.json"
    if not teacher_json.is_file():
        raise FileNotFoundError(f"{folder} holds no teacher/train_fp32.json: not a sweep folder")
    base_preset = _read(folder / "teacher" / "preset.json")
    runs = []
    for variant in ["teacher", *sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name != "teacher")]:
        preset_file = folder / variant / "preset.json"
        for row in (("fp32",) if variant == "teacher" else STUDENTS):
            result_file = folder / variant / f"train_{row}.json"
            if not (result_file.is_file() and preset_file.is_file()):
                continue
            result, preset = _read(result_file), _read(preset_file)
            recipe = tuple(sorted(f"{k}={preset[k]}" for k in preset
                                  if k not in _NOT_RECIPE and preset.get(k) != base_preset.get(k)))  # fmt: skip
            val = [h["eval_accuracy"] for h in result.get("history", []) if "eval_accuracy" in h]
            runs.append({"sweep": str(folder), "variant": variant, "row": row, "seed": preset.get("seed", 0),
                         "recipe": recipe,
                         "accuracy": result["accuracy"], "best_val": max(val) if val else None,
                         "predictions": decode_predictions(result["test_predictions"]) if "test_predictions" in result else None,
                         "labels_sha256": result.get("test_predictions", {}).get("labels_sha256")})  # fmt: skip
    return runs


def _pooled_p(a: Sequence[dict], b: Sequence[dict], labels: np.ndarray | None,
              same_sweep: bool = False) -> float | None:  # fmt: skip
    """McNemar's exact p of recipe ``b`` against recipe ``a``: runs paired seed by seed (a run of
    ``b`` only against the run of ``a`` with its seed, so that no run counts twice), or with
    ``same_sweep`` each run of ``b`` against the run of ``a`` from its own sweep (a teacher); the
    discordant reviews of all pairs pooled; None where no pair has predictions or ``labels`` is None."""
    if labels is None:
        return None
    key = "sweep" if same_sweep else "seed"
    pairs = [(x, y) for x in a for y in b if x[key] == y[key]]
    pairs = [(x, y) for x, y in pairs if x["predictions"] is not None and y["predictions"] is not None]
    if not pairs:
        return None
    a_correct = np.concatenate([x["predictions"] == labels for x, _ in pairs])
    b_correct = np.concatenate([y["predictions"] == labels for _, y in pairs])
    return mcnemar(a_correct, b_correct)["p_value"]


def _stored_labels(folders: Sequence[Path]) -> np.ndarray | None:
    """The test labels the train stage stored beside the folders' teachers; every folder that
    stored them must hold the same labels (the same test file), or the pairing means nothing."""
    found = [(f, decode_predictions(json.loads((f / "teacher" / TEST_LABELS).read_text())))
             for f in folders if (f / "teacher" / TEST_LABELS).is_file()]  # fmt: skip
    for folder, labels in found[1:]:
        if not np.array_equal(labels, found[0][1]):
            raise ValueError(f"{folder} and {found[0][0]} stored different test labels: their runs cannot be paired")
    return found[0][1] if found else None


def sweep_table(folders: str | os.PathLike | Sequence[str | os.PathLike],
                labels: Sequence[int] | np.ndarray | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """One record per (row, recipe) of one sweep folder or several: its seeds, accuracy mean /
    stdev / min / max (as fractions), the gap to the teacher in points (each run against its own
    sweep's teacher; the mean over the seeds and the worst seed's, so that "every seed within a
    target" can be read off), the difference to the row's base recipe in points, and McNemar p-values
    against the teacher and against the base recipe (runs paired seed by seed, each run once,
    discordant reviews pooled; None without stored predictions or ``labels``, the test labels in file order;
    default: the ``teacher/test_labels.json`` the train stage writes beside each teacher).

    McNemar's p says whether two *models* differ; two seeds of one recipe already do. So each
    other recipe also says whether its mean lies outside the range of the base recipe's seeds
    (``outside_base_seeds``; None with fewer than two base seeds): a lever inside that range moved
    the student no further than a new seed does."""
    folders = [Path(folders)] if isinstance(folders, (str, os.PathLike)) else [Path(f) for f in folders]
    runs = [run for folder in folders for run in sweep_runs(folder)]
    if labels is None:
        labels = _stored_labels(folders)
    labels = None if labels is None else np.asarray(labels, dtype=np.uint8)
    teacher = [r for r in runs if r["row"] == "fp32"]
    teacher_accuracy = {r["sweep"]: r["accuracy"] for r in teacher}
    groups: dict[tuple[str, tuple[str, ...]], list[dict]] = {}
    for run in runs:
        if run["row"] != "fp32":
            groups.setdefault((run["row"], run["recipe"]), []).append(run)
    records = []
    for (row, recipe), members in sorted(groups.items(), key=lambda item: (STUDENTS.index(item[0][0]), item[0][1])):
        base = groups.get((row, ()), [])
        summary = seed_summary([m["accuracy"] for m in members])
        base_mean = statistics.fmean(m["accuracy"] for m in base) if base else None
        records.append({
            "row": row,
            "recipe": ", ".join(recipe) or "base",
            "variants": sorted(m["variant"] for m in members),
            **summary,
            "gap_to_teacher_points": 100 * statistics.fmean(teacher_accuracy[m["sweep"]] - m["accuracy"] for m in members),
            "worst_gap_to_teacher_points": 100 * max(teacher_accuracy[m["sweep"]] - m["accuracy"] for m in members),
            "vs_base_points": None if base_mean is None or not recipe else 100 * (summary["mean"] - base_mean),
            "p_vs_teacher": _pooled_p(teacher, members, labels, same_sweep=True),
            "p_vs_base": None if not recipe else _pooled_p(base, members, labels),
            "outside_base_seeds": None if len(base) < 2 or not recipe
            else not min(m["accuracy"] for m in base) <= summary["mean"] <= max(m["accuracy"] for m in base),
        })  # fmt: skip
    return records
