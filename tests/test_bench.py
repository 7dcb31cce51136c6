"""labutils.bench: reading committed ``bench kernels`` runs back."""

from __future__ import annotations

import json

from labutils import bench


def _run(path=None, quick=False, vector_bits=512, binary=1024):
    run = {"command": "kernels", "quick": quick, "peak": {"vector_bits": vector_bits,
                                                          "mac_per_cycle_per_core": {"binary": binary}}}
    if path:
        run["kernel_path"] = path
    return run


def test_the_path_is_read_where_recorded_and_inferred_from_the_peak_otherwise():
    assert bench.kernel_run_path(_run("generic")) == "generic"
    assert bench.kernel_run_path({"cpu_features": {"path": "avx2"}}) == "avx2"
    assert bench.kernel_run_path(_run()) == "avx512"
    assert bench.kernel_run_path(_run(vector_bits=256, binary=512)) == "avx2"
    assert bench.kernel_run_path(_run(vector_bits=128, binary=128)) == "generic"


def test_one_full_run_per_path_first_file_wins(tmp_path):
    files = {"a.json": _run("avx2"), "b.json": _run("avx2"), "c.json": _run("avx512", quick=True),
             "d.json": {"command": "packing"}, "e.json": _run()}
    for name, run in files.items():
        (tmp_path / name).write_text(json.dumps(run))
    runs = bench.committed_kernel_runs(tmp_path)
    assert {path: name for path, (name, _) in runs.items()} == {"avx2": "a.json", "avx512": "e.json"}


def test_the_committed_runs_cover_both_x86_paths(repo_root):
    assert {"avx512", "avx2"} <= set(bench.committed_kernel_runs(repo_root / "results" / "kernels"))
