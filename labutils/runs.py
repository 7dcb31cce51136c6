"""What every experiment run shares: provenance, atomic files, option parsing.

The bottom layer of the experiments (``labutils.benchmark`` for IMDb, ``labutils.lm.experiment``,
``labutils.peers``, ``labutils.kernel_bench``, ``labutils.packing_bench``): each of them writes
results that must say where they came from (``provenance``: commit, device, CPU and its flags,
load average, library versions), writes them so that a killed run never leaves a half-written
file (``write_json``, ``save_safetensors``), and takes ``--set FIELD=VALUE`` options for its
preset dataclass (``parse_set_options``, ``replace_fields``). ``labutils.bench`` is only the
command line that dispatches to them. This module imports nothing of labutils above
``packfile`` and ``kernels.cpu``, so any experiment can import it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import functools
import json
import os
import platform
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "UsageError",
    "cache_sizes",
    "commit",
    "cpu_info",
    "device_name",
    "load_average",
    "parse_set_options",
    "positive_int",
    "provenance",
    "read_json",
    "replace_fields",
    "save_safetensors",
    "weights_bytes",
    "write_json",
]


class UsageError(ValueError):
    """A nonsensical argument or preset value, found before any work starts; ``bench.main``
    reports it like argparse does (``prog: error: ...``, exit status 2) instead of a traceback."""


def positive_int(text: str) -> int:
    """argparse type: an int >= 1 (thread counts, sizes, repeats)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {value}")
    return value


# --------------------------------------------------------------------------- --set FIELD=VALUE


def _parse_value(text: str) -> Any:
    """JSON where it parses (numbers, null, true, lists), else the string itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_set_options(items: Iterable[str], preset_type: type) -> dict[str, Any]:
    """``--set FIELD=VALUE`` options -> ``{field: value}`` for the dataclass ``preset_type``.

    Values are read as JSON where they parse (numbers, null, true, lists), else as strings. A
    field whose default is a tuple takes a JSON list or a comma list, each item read the same
    way: ``["steps=8", "lengths=64,128", "sizes=700m"]`` -> ``{"steps": 8, "lengths": (64, 128),
    "sizes": ("700m",)}``. Unknown fields and the preset's name are rejected (UsageError) before
    any work starts."""
    fields = {f.name: f for f in dataclasses.fields(preset_type) if f.name != "name"}
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"--set takes FIELD=VALUE, got {item!r}")
        if key not in fields:
            raise UsageError(f"--set {key}: not a preset field; fields are {sorted(fields)}")
        value = _parse_value(text.strip())
        if isinstance(fields[key].default, tuple) and not isinstance(value, list):
            value = [_parse_value(part.strip()) for part in text.split(",") if part.strip()]
        overrides[key] = tuple(value) if isinstance(value, list) else value
    return overrides


def replace_fields(base: Any, overrides: Mapping[str, Any]) -> Any:
    """The dataclass ``base`` with some fields replaced (its ``__post_init__`` validates them);
    UsageError naming the fields for an unknown one or a value its validation refuses."""
    names = [f.name for f in dataclasses.fields(base)]
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise UsageError(f"unknown preset field(s) {unknown}; the fields are {names}")
    try:
        return dataclasses.replace(base, **overrides) if overrides else base
    except UsageError:
        raise
    except (TypeError, ValueError) as error:
        raise UsageError(str(error)) from None


# --------------------------------------------------------------------------- files


def write_json(path: str | os.PathLike, payload: Any) -> None:
    """Write ``payload`` as indented JSON atomically: a killed run never leaves a half-written
    file that a resumed run would take for a finished stage (``packfile.write_atomic``)."""
    from labutils.packfile import write_atomic

    write_atomic(Path(path), (json.dumps(payload, indent=2, default=str) + "\n").encode())


def read_json(path: str | os.PathLike) -> Any:
    """The JSON in ``path``; ValueError naming the file (and what to do) where it does not parse."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:  # every file here is written atomically: edited or foreign
        raise ValueError(f"{path} is not valid JSON ({exc}); delete it to redo the stage that wrote it") from None


def save_safetensors(model: Any, path: str | os.PathLike) -> int:
    """Save an ``nn.Module``'s state as safetensors, as ``safetensors.torch.save_model`` does (tied
    weights stored once; ``load_model`` reads it), but atomic like ``write_json`` and the same
    bytes for the same model (sorted metadata). Returns the file's size in bytes."""
    from safetensors.torch import _remove_duplicate_names, save

    from labutils.packfile import sorted_metadata, write_atomic

    state = model.state_dict()
    metadata = {}
    # safetensors has no public way to find tied tensors; save_model itself uses this helper
    for kept, removed in _remove_duplicate_names(state).items():
        for name in removed:
            metadata[name] = kept
            del state[name]
    data = sorted_metadata(save({k: v.contiguous() for k, v in state.items()}, metadata=metadata or None))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data)
    return len(data)


def weights_bytes(model: Any) -> int:
    """Bytes of the parameters and buffers an ``nn.Module`` holds in memory, each storage once
    (packed buffers included; a model with ``weights_nbytes``, e.g. an ONNX Runtime row, says
    itself); torch's dynamic-quantized Linear keeps its int8 weight in a packed object, counted too."""
    if hasattr(model, "weights_nbytes"):
        return int(model.weights_nbytes)
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    for module in model.modules():
        packed = getattr(module, "_packed_params", None)
        if packed is not None and hasattr(packed, "_weight_bias"):
            w, b = packed._weight_bias()
            total += w.numel() * w.element_size() + (b.numel() * b.element_size() if b is not None else 0)
    return total


# --------------------------------------------------------------------------- provenance


def commit() -> str | None:
    """The git commit of the code: ``$LABBOOK_COMMIT`` (set where the tree travels without .git),
    else ``git rev-parse HEAD`` of this package's checkout, else None."""
    if os.environ.get("LABBOOK_COMMIT"):
        return os.environ["LABBOOK_COMMIT"]
    try:
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run(["git", "rev-parse", "HEAD"], check=False, cwd=root, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


@functools.lru_cache(maxsize=1)
def cpu_info() -> dict[str, Any]:
    """Vendor, model name, flags (a frozenset) and nominal MHz from /proc/cpuinfo (the model from
    ``platform`` and empty flags where it is unreadable, e.g. macOS)."""
    info: dict[str, Any] = {"vendor": "", "model": platform.processor() or platform.machine(), "flags": frozenset(), "mhz": None}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "vendor_id" and not info["vendor"]:
            info["vendor"] = value
        elif key == "model name" and not info["flags"]:
            info["model"] = value
        elif key == "flags" and not info["flags"]:
            info["flags"] = frozenset(value.split())
        elif key == "cpu MHz" and info["mhz"] is None:
            info["mhz"] = float(value)
    return info


def cache_sizes(root: str | Path = "/sys/devices/system/cpu/cpu0/cache") -> dict[str, int]:
    """Bytes of each cache level of CPU 0 ({"L1d": 49152, "L1i": ..., "L2": ..., "L3": ...}), read
    from Linux's sysfs; {} where it is unreadable (macOS, some containers). A kernel whose weights
    fit the last level can be fed from it, not from DRAM, so a timed kernel run records them."""
    sizes: dict[str, int] = {}
    for index in sorted(Path(root).glob("index*")):
        try:
            level, kind, size = ((index / name).read_text().strip() for name in ("level", "type", "size"))
        except OSError:
            continue
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        number = int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
        sizes[f"L{level}" + {"Data": "d", "Instruction": "i"}.get(kind, "")] = number
    return sizes


def load_average() -> list[float] | None:
    """The 1, 5 and 15-minute load averages (None where the OS has none): other work on the
    machine slows every timing, so each timed result records it."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def device_name(device: Any) -> str:
    """"cuda: <GPU name>" for a CUDA ``torch.device``, else "cpu: <CPU model>"."""
    if getattr(device, "type", str(device)) == "cuda":
        import torch

        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {cpu_info()['model']}"


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    names = ("torch", "transformers", "accelerate", "datasets", "numba", "numpy", "safetensors", "onnxruntime", "labutils")
    found = {}
    for name in names:
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return found


def _kernel_features() -> dict[str, Any]:
    """The SIMD flags the kernels see and the path they run (``labutils.kernels``)."""
    from labutils.kernels.dispatch import cpu_features

    found = cpu_features()
    return {"flags": found["flags"], "path": found["path"]}


def _numba_threading_layer() -> str:
    """The layer Numba's parallel regions ran on in this process ("omp", "tbb", "workqueue"),
    or, before any region has run, the one asked for ("requested: default" lets Numba pick). On
    an idle 2-core Xeon a region costs 2.4 µs under OpenMP and 29 under workqueue, and the
    decode engine's tokens/s differ up to 3.7x between them (``results/peers-xeon*``)."""
    import numba

    try:
        return numba.threading_layer()
    except ValueError:
        return f"requested: {numba.config.THREADING_LAYER}"


def provenance(device: str) -> dict[str, Any]:
    """Where a result came from: commit, ``device`` (a ``device_name``), CPU model, vendor and
    core count, the kernels' SIMD flags and path, Numba's threading layer, the load averages,
    python and library versions, the date (UTC) and the command line."""
    cpu = cpu_info()
    return {
        "commit": commit(),
        "device": device,
        "cpu": cpu["model"],
        "cpu_vendor": cpu["vendor"],
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "versions": _versions(),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "load_average": load_average(),
        "cpu_features": _kernel_features(),
        "numba_threading_layer": _numba_threading_layer(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else None,
    }
