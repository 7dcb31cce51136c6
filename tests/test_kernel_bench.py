"""labutils.kernel_bench: ``bench kernels`` runs, and reading committed runs back."""

from __future__ import annotations

import argparse
import json
import os

import pytest

from labutils import bench, kernel_bench
from labutils import kernels as K
from labutils.runs import UsageError


def _run(path=None, quick=False, vector_bits=512, binary=1024):
    run = {"command": "kernels", "quick": quick, "peak": {"vector_bits": vector_bits,
                                                          "mac_per_cycle_per_core": {"binary": binary}}}
    if path:
        run["kernel_path"] = path
    return run


def test_the_path_is_read_where_recorded_and_inferred_from_the_peak_otherwise():
    assert kernel_bench.kernel_run_path(_run("generic")) == "generic"
    assert kernel_bench.kernel_run_path({"cpu_features": {"path": "avx2"}}) == "avx2"
    assert kernel_bench.kernel_run_path(_run()) == "avx512"
    assert kernel_bench.kernel_run_path(_run(vector_bits=256, binary=512)) == "avx2"
    assert kernel_bench.kernel_run_path(_run(vector_bits=128, binary=128)) == "generic"


def test_one_full_run_per_path_first_file_wins(tmp_path):
    files = {"a.json": _run("avx2"), "b.json": _run("avx2"), "c.json": _run("avx512", quick=True),
             "d.json": {"command": "packing"}, "e.json": _run()}
    for name, run in files.items():
        (tmp_path / name).write_text(json.dumps(run))
    runs = kernel_bench.committed_kernel_runs(tmp_path)
    assert {path: name for path, (name, _) in runs.items()} == {"avx2": "a.json", "avx512": "e.json"}


def test_the_committed_runs_cover_both_x86_paths(repo_root):
    assert {"avx512", "avx2"} <= set(kernel_bench.committed_kernel_runs(repo_root / "results" / "kernels"))


@pytest.mark.slow
def test_bench_quick_writes_json(tmp_path, capsys):
    out = tmp_path / "kernels.json"
    args = ["kernels", "--quick", "--threads", "1", "--repeat", "2", "--budget", "0", "--out", str(out)]
    assert bench.main(args) == 0
    result = json.loads(out.read_text())
    assert result["command"] == "kernels" and result["threads"] == 1
    assert {"frequency_ghz", "notes", "issue_model", "peak_ratio_w1a1_vs_f32"} <= set(result["peak"])
    assert result["results"], "no shapes measured"
    # The active path (LABBOOK_KERNEL_PATH, else the best) runs first and names the unsuffixed rows.
    assert result["kernel_path"] == K.active_path() == result["paths"][0]
    assert sorted(result["paths"]) == sorted(K.available_paths())
    assert result["cpu_features"]["flags"] == K.cpu_features()["flags"]
    # provenance: commit, CPU flags, load before and after, the thread pools
    assert {"commit", "cpu", "versions", "load_average", "cpu_features"} <= set(result["provenance"])
    assert len(result["loadavg_before_after"]) == 2 and "numba_threading_layer" in result["threading"]
    assert {"torch_f32", "torch_int8", "torch_int_mm"} <= set(result["baselines"])
    assert "load_warning" not in result  # not written into results/
    for row in result["results"]:
        others = {f"{scheme}@{path}" for path in result["paths"][1:] for scheme in ("w1a1", "w1.58a8+q")}
        assert {"w1a1", "w1a8", "w1.58a8", "w1a1+q", "w1a8+q", "w1.58a8+q", "torch_f32", "torch_int8", *others} <= set(row["kernels"])
        for name, timing in row["kernels"].items():
            assert timing["seconds_best"] <= timing["seconds"] and timing["gmac_per_s"] > 0 and timing["rounds"] >= 2
            assert timing["spread"][0] <= timing["seconds"] <= timing["spread"][1]
            for base, cell in timing["vs"].items():
                assert cell["x"] == timing[f"x_{base}"] > 0 and cell["x_best"] > 0
                low, high = cell["x_rounds_min_max"]
                assert low <= cell["x_rounds_p10_p90"][0] <= cell["x_rounds_p10_p90"][1] <= high
        # like with like: integer-only kernels against integer-only baselines, float-in against float-in
        assert "torch_int_mm" in row["kernels"]["w1.58a8"]["vs"] and "torch_int_mm" not in row["kernels"]["w1.58a8+q"]["vs"]
        assert "torch_int8" in row["kernels"]["w1.58a8+q"]["vs"]
        # one token: the lookup GEMV (kernels.lut) beside the tiles, against the same baselines
        assert ("w1.58a8_lut" in row["kernels"]) == (row["m"] == 1)
        if row["m"] == 1:
            assert {"torch_f32", "ort_int8", "torch_int_mm"} & set(row["kernels"]["w1.58a8_lut"]["vs"]) >= {"torch_f32", "torch_int_mm"}
    assert {t["path"] for t in result["targets"]} <= set(K.available_paths())
    assert all(t["pass"] == (t["geomean_ratio"] >= t["target_ratio"]) for t in result["targets"])
    assert "GMAC/s" in capsys.readouterr().out


def _args(out, force=False):
    return argparse.Namespace(out=out, force=force)


def test_the_load_guard_refuses_results_on_a_busy_machine(tmp_path):
    cores = os.cpu_count()
    busy, quiet = cores / 2 + 0.5, cores / 2
    inside = tmp_path / "results" / "kernels" / "m" / "kernels.json"
    assert kernel_bench._load_guard(_args(tmp_path / "k.json"), busy) is None  # not into results/
    assert kernel_bench._load_guard(_args(inside), quiet) is None
    with pytest.raises(UsageError, match="load average.*--force"):
        kernel_bench._load_guard(_args(inside), busy)
    assert "load average" in kernel_bench._load_guard(_args(inside, force=True), busy)


def test_the_machine_folder_is_in_results(repo_root):
    assert kernel_bench.results_path("xeon-spr") == repo_root / "results" / "kernels" / "xeon-spr" / "kernels.json"
    for bad in ("", "../x", "a/b", ".hidden"):
        with pytest.raises(UsageError, match="--machine"):
            kernel_bench.results_path(bad)


def test_targets_per_path_and_vendor():
    def w1a1(path, vendor):
        return [t[3] for t in kernel_bench.kernel_targets(path, vendor) if t[0] == "w1a1"]

    assert w1a1("avx512", "AuthenticAMD") == [20.0] and w1a1("avx512", "GenuineIntel") == [8.0]
    assert w1a1("avx2", "AuthenticAMD") == [8.0] and w1a1("generic", "GenuineIntel") == []
    a8 = {(t[0], t[2]): t[3] for t in kernel_bench.kernel_targets("avx512", "GenuineIntel") if t[1] == "gemm"}
    assert a8[("w1.58a8", "ort_int8")] == a8[("w1.58a8+q", "torch_int8")] == 1.2
    generic = {(t[0], t[1]): t[3] for t in kernel_bench.kernel_targets("generic", "AuthenticAMD")}
    assert generic[("w1.58a8", "gemm")] == 2.0 and generic[("w1.58a8", "gemv")] == 4.0


def test_machine_folders_come_first(tmp_path):
    (tmp_path / "xeon").mkdir()
    (tmp_path / "xeon" / "kernels.json").write_text(json.dumps(_run("avx512")))
    (tmp_path / "xeon" / "other.json").write_text(json.dumps(_run("avx2")))  # not a machine's run
    (tmp_path / "a.json").write_text(json.dumps(_run("avx512")))
    assert list(kernel_bench.committed_kernel_files(tmp_path)) == ["xeon/kernels.json", "a.json"]
    assert kernel_bench.committed_kernel_runs(tmp_path)["avx512"][0] == "xeon/kernels.json"
