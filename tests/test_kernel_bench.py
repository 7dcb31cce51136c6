"""labutils.kernel_bench: ``bench kernels`` runs, and reading committed runs back."""

from __future__ import annotations

import json

from labutils import bench, kernel_bench
from labutils import kernels as K


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


def test_bench_quick_writes_json(tmp_path, capsys):
    out = tmp_path / "kernels.json"
    args = ["kernels", "--quick", "--threads", "1", "--repeat", "1", "--budget", "0", "--out", str(out)]
    assert bench.main(args) == 0
    result = json.loads(out.read_text())
    assert result["command"] == "kernels" and result["threads"] == 1
    assert {"frequency_ghz", "notes"} <= set(result["peak"])
    assert result["results"], "no shapes measured"
    # The active path (LABBOOK_KERNEL_PATH, else the best) runs first and names the unsuffixed rows.
    assert result["kernel_path"] == K.active_path() == result["paths"][0]
    assert sorted(result["paths"]) == sorted(K.available_paths())
    assert result["cpu_features"]["flags"] == K.cpu_features()["flags"]
    assert set(result["int8_baselines"]) >= {"torch_int8"}
    for row in result["results"]:
        others = {f"w1a1@{path}" for path in result["paths"][1:]}  # every other path, suffixed
        assert {"w1a1", "w1a8", "w1.58a8", "torch_f32", "torch_int8", *others} <= set(row["kernels"])
        for timing in row["kernels"].values():
            assert timing["seconds"] > 0 and timing["gmac_per_s"] > 0
            assert timing["spread"][0] <= timing["seconds"] <= timing["spread"][1]
    assert {t["path"] for t in result["targets"]} <= set(K.available_paths())
    assert "GMAC/s" in capsys.readouterr().out
