"""labutils.benchmark.ablations: sweep folders read back, seeds grouped, paired p-values."""

from __future__ import annotations

import json

import numpy as np
import pytest

from labutils.benchmark.ablations import sweep_runs, sweep_table
from labutils.stats import encode_predictions, mcnemar

N = 2000
LABELS = np.random.default_rng(0).integers(0, 2, N).astype(np.uint8)


def _predictions(accuracy: float, seed: int) -> np.ndarray:
    wrong = np.random.default_rng(seed).random(N) > accuracy
    return np.where(wrong, 1 - LABELS, LABELS).astype(np.uint8)


def _run(folder, variant, row, preset, accuracy, seed, with_predictions=True):
    (folder / variant).mkdir(parents=True, exist_ok=True)
    (folder / variant / "preset.json").write_text(json.dumps(preset))
    predictions = _predictions(accuracy, seed)
    result = {"accuracy": float((predictions == LABELS).mean()), "history": [{"eval_accuracy": 0.9}]}
    if with_predictions:
        result["test_predictions"] = encode_predictions(predictions, LABELS, "file")
    (folder / variant / f"train_{row}.json").write_text(json.dumps(result))
    return predictions


@pytest.fixture
def sweep(tmp_path):
    base = {"name": "full", "seed": 0, "student_lr": 2e-4, "threads": 2}
    runs = {"teacher": _run(tmp_path, "teacher", "fp32", base, 0.91, 1)}
    for seed in (0, 1, 2):
        name = "base-w1.58a8" if seed == 0 else f"seed{seed}-w1.58a8"
        runs[name] = _run(tmp_path, name, "w1.58a8", {**base, "seed": seed}, 0.88, 10 + seed)
    runs["aug1-w1.58a8"] = _run(tmp_path, "aug1-w1.58a8", "w1.58a8", {**base, "augment_copies": 1}, 0.90, 20)
    _run(tmp_path, "old-w1a1", "w1a1", {**base, "threads": 1}, 0.85, 30, with_predictions=False)
    return tmp_path, runs


def test_runs_are_grouped_by_recipe_with_seed_and_measurement_fields_ignored(sweep):
    folder, _ = sweep
    runs = sweep_runs(folder)
    assert runs[0]["row"] == "fp32" and len(runs) == 6
    table = sweep_table(folder, LABELS)
    recipes = {(r["row"], r["recipe"]): r for r in table}
    base = recipes[("w1.58a8", "base")]
    assert base["seeds"] == 3 and base["variants"] == ["base-w1.58a8", "seed1-w1.58a8", "seed2-w1.58a8"]
    assert recipes[("w1a1", "base")]["seeds"] == 1  # threads differs: a measurement field, not the recipe
    aug = recipes[("w1.58a8", "augment_copies=1")]
    assert aug["vs_base_points"] == pytest.approx(100 * (aug["mean"] - base["mean"]))
    assert base["vs_base_points"] is None and base["p_vs_base"] is None
    teacher = runs[0]["accuracy"]
    assert base["worst_gap_to_teacher_points"] == pytest.approx(100 * (teacher - base["min"]))  # one sweep: the lowest seed
    assert base["worst_gap_to_teacher_points"] > base["gap_to_teacher_points"]


def test_p_values_pair_runs_by_seed_and_need_predictions(sweep):
    folder, runs = sweep
    table = {(r["row"], r["recipe"]): r for r in sweep_table(folder, LABELS)}
    aug = table[("w1.58a8", "augment_copies=1")]
    # one augmented run (seed 0): paired with the base run of seed 0 only, never counted thrice
    assert aug["p_vs_base"] == mcnemar(runs["base-w1.58a8"] == LABELS, runs["aug1-w1.58a8"] == LABELS)["p_value"] < 0.05
    assert table[("w1a1", "base")]["p_vs_teacher"] is None  # stored no predictions
    assert sweep_table(folder)[0]["p_vs_teacher"] is None  # no labels given


def test_a_folder_without_a_teacher_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a sweep folder"):
        sweep_runs(tmp_path)


def test_the_labels_the_train_stage_stored_are_used_by_default(sweep):
    folder, _ = sweep
    (folder / "teacher" / "test_labels.json").write_text(json.dumps(encode_predictions(LABELS, LABELS, "file")))
    assert sweep_table(folder) == sweep_table(folder, LABELS)
    assert sweep_table(folder)[0]["p_vs_teacher"] is not None


def test_several_sweeps_read_as_one_each_student_against_its_own_teacher(sweep, tmp_path_factory):
    folder, runs = sweep
    other = tmp_path_factory.mktemp("other")
    base = {"name": "full", "seed": 0, "student_lr": 2e-4, "threads": 2}
    teacher_b = _run(other, "teacher", "fp32", base, 0.93, 2)
    student_b = _run(other, "emb-float-w1.58a8", "w1.58a8", {**base, "embeddings": "float"}, 0.89, 40)
    table = {(r["row"], r["recipe"]): r for r in sweep_table([folder, other], LABELS)}
    emb = table[("w1.58a8", "embeddings=float")]
    assert emb["gap_to_teacher_points"] == pytest.approx(100 * ((teacher_b == LABELS).mean() - (student_b == LABELS).mean()))
    assert emb["worst_gap_to_teacher_points"] == pytest.approx(emb["gap_to_teacher_points"])  # one seed: worst = mean
    assert emb["p_vs_teacher"] == mcnemar(teacher_b == LABELS, student_b == LABELS)["p_value"]  # its own sweep's teacher only
    assert emb["p_vs_base"] == mcnemar(runs["base-w1.58a8"] == LABELS, student_b == LABELS)["p_value"]  # paired across sweeps, seed 0
    assert table[("w1.58a8", "base")] == {**sweep_table(folder, LABELS)[0]}  # the first sweep's rows unchanged


def test_sweeps_that_stored_different_labels_are_refused(sweep, tmp_path_factory):
    folder, _ = sweep
    other = tmp_path_factory.mktemp("other")
    _run(other, "teacher", "fp32", {"name": "full"}, 0.9, 3)
    for target, labels in ((folder, LABELS), (other, 1 - LABELS)):
        (target / "teacher" / "test_labels.json").write_text(json.dumps(encode_predictions(labels, labels, "file")))
    with pytest.raises(ValueError, match="different test labels"):
        sweep_table([folder, other])


def test_a_recipe_is_set_against_the_spread_of_the_base_seeds(sweep):
    folder, runs = sweep
    base = {"name": "full", "seed": 0, "student_lr": 2e-4, "threads": 2}
    # a lever whose run lands exactly on one base seed: a different model, no different recipe
    _run(folder, "lr-w1.58a8", "w1.58a8", {**base, "student_lr": 3e-4}, 0.88, 11)
    table = {(r["row"], r["recipe"]): r for r in sweep_table(folder, LABELS)}
    assert table[("w1.58a8", "augment_copies=1")]["outside_base_seeds"] is True  # 2 points above 0.88
    assert table[("w1.58a8", "student_lr=0.0003")]["outside_base_seeds"] is False
    assert table[("w1.58a8", "base")]["outside_base_seeds"] is None
    assert table[("w1a1", "base")]["outside_base_seeds"] is None  # one base run: no spread to set against


def test_a_recipe_with_several_seeds_pools_its_seed_pairs(sweep):
    folder, runs = sweep
    base = {"name": "full", "seed": 0, "student_lr": 2e-4, "threads": 2}
    aug_seed1 = _run(folder, "aug1-seed1-w1.58a8", "w1.58a8", {**base, "seed": 1, "augment_copies": 1}, 0.90, 21)
    aug = {(r["row"], r["recipe"]): r for r in sweep_table(folder, LABELS)}[("w1.58a8", "augment_copies=1")]
    assert aug["seeds"] == 2
    a = np.concatenate([runs["base-w1.58a8"] == LABELS, runs["seed1-w1.58a8"] == LABELS])  # seeds 0 and 1; seed 2 unpaired
    b = np.concatenate([runs["aug1-w1.58a8"] == LABELS, aug_seed1 == LABELS])
    assert aug["p_vs_base"] == mcnemar(a, b)["p_value"]
