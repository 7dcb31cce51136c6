"""labutils.runs: the machinery every experiment shares (options, files, provenance)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from labutils import runs


@dataclass(frozen=True)
class _Preset:
    name: str
    steps: int = 1
    lr: float = 1e-3
    sizes: tuple[str, ...] = ("125m", "350m")
    lengths: tuple[int, ...] = (64,)
    note: str = "x"

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")


def test_set_options_read_json_or_strings():
    assert runs.parse_set_options(["steps=8", "lr=2e-4", "note=hello world", "lengths=[64, 128]"], _Preset) == {
        "steps": 8, "lr": 2e-4, "note": "hello world", "lengths": (64, 128)}  # fmt: skip


@pytest.mark.parametrize("item,value", [("sizes=700m", ("700m",)), ("sizes=125m,700m", ("125m", "700m")),
                                        ("lengths=64,128", (64, 128)), ("lengths=256", (256,)),
                                        ('sizes=["xs"]', ("xs",))])  # fmt: skip
def test_a_tuple_field_takes_a_comma_list(item, value):
    """A tuple field never iterates a string into characters ('700m' -> ('7', '0', '0', 'm'))."""
    key = item.partition("=")[0]
    assert runs.parse_set_options([item], _Preset) == {key: value}


@pytest.mark.parametrize("item,match", [("steps", "FIELD=VALUE"), ("=3", "FIELD=VALUE"), ("name=x", "not a preset field"),
                                        ("epochs=3", "not a preset field")])  # fmt: skip
def test_bad_set_options_are_usage_errors(item, match):
    with pytest.raises(runs.UsageError, match=match):
        runs.parse_set_options([item], _Preset)


def test_replace_fields_validates_and_names_unknown_fields():
    base = _Preset("p")
    assert runs.replace_fields(base, {}) is base
    assert runs.replace_fields(base, {"steps": 4}).steps == 4
    with pytest.raises(runs.UsageError, match="unknown preset field"):
        runs.replace_fields(base, {"epochs": 4})
    with pytest.raises(runs.UsageError, match="steps must be"):
        runs.replace_fields(base, {"steps": 0})


def test_json_round_trip_and_a_clear_error_for_a_broken_file(tmp_path):
    path = tmp_path / "sub" / "r.json"
    path.parent.mkdir()
    runs.write_json(path, {"a": [1, 2], "p": tmp_path})  # non-JSON values written as strings
    assert runs.read_json(path) == {"a": [1, 2], "p": str(tmp_path)}
    path.write_text("{half")
    with pytest.raises(ValueError, match="not valid JSON.*delete it"):
        runs.read_json(path)


def test_save_safetensors_stores_tied_weights_once_and_is_deterministic(tmp_path):
    from safetensors.torch import load_model

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight  # tied
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    size = runs.save_safetensors(model, a)
    runs.save_safetensors(model, b)
    assert size == a.stat().st_size and a.read_bytes() == b.read_bytes()
    copy = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    copy[1].weight = copy[0].weight
    load_model(copy, str(a))
    assert torch.equal(copy[0].weight, model[0].weight)


def test_weights_bytes_counts_each_storage_once():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=True))
    assert runs.weights_bytes(model) == (40 + 40 + 10) * 4
    model[1].weight = model[0].weight
    assert runs.weights_bytes(model) == (40 + 10) * 4


def test_provenance_names_the_machine_and_the_load():
    prov = runs.provenance(runs.device_name("cpu"))
    assert prov["device"].startswith("cpu: ") and prov["cpu"] in prov["device"]
    assert prov["cpu_features"]["path"] in ("avx512", "avx2", "generic")
    assert prov["load_average"] is None or len(prov["load_average"]) == 3
    assert "numpy" in prov["versions"] and prov["date"].endswith("+00:00")
    json.dumps(prov)  # JSON-friendly as it is


def test_provenance_names_the_threading_layer_a_parallel_region_ran_on():
    from numba import njit, prange

    @njit(parallel=True)
    def total(x):
        s = 0.0
        for i in prange(x.shape[0]):
            s += x[i]
        return s

    total(np.ones(4))
    assert runs.provenance("cpu")["numba_threading_layer"] in ("omp", "tbb", "workqueue")


def test_cache_sizes_reads_each_level_and_skips_what_it_cannot_read(tmp_path):
    for name, (level, kind, size) in {"index0": ("1", "Data", "48K"), "index1": ("1", "Instruction", "64K"),
                                      "index2": ("2", "Unified", "2048K"), "index3": ("3", "Unified", "480M")}.items():
        (tmp_path / name).mkdir()
        for field, value in (("level", level), ("type", kind), ("size", size)):
            (tmp_path / name / field).write_text(value + "\n")
    (tmp_path / "index4").mkdir()  # no files: skipped, not an error
    assert runs.cache_sizes(tmp_path) == {"L1d": 48 * 2**10, "L1i": 64 * 2**10, "L2": 2 * 2**20, "L3": 480 * 2**20}
    assert runs.cache_sizes(tmp_path / "missing") == {}
