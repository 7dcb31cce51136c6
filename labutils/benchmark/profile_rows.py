"""Where the time of the IMDb benchmark's rows goes: ``profile_packed_forward`` on each row.

``python -m labutils.benchmark.profile_rows OUT_JSON [rows] [repeat] [--unfused]`` profiles the
rows of ``results/imdb-full`` (the teacher and the students' packed files, untrained stand-ins
where a student was not trained there) and writes what chapter 7's profile chart reads.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from labutils.benchmark.checkpoints import int8_dynamic, load_student, load_teacher, student_file, write_untrained_student
from labutils.benchmark.cpu import random_inputs
from labutils.benchmark.preset import PRESETS
from labutils.kernels.layer import pack_model
from labutils.kernels.profile import profile_packed_forward
from labutils.measure import threads as use_threads
from labutils.runs import device_name, provenance


def profile_benchmark_rows(
    out: str,
    rows: tuple[str, ...] = ("fp32", "w1.58a8", "w1a1"),
    points: tuple[tuple[int, int], ...] = ((1, 128), (32, 256)),
    *,
    threads: int = 2,
    repeat: int = 3,
    model_path: str | None = None,
    unfused: bool = False,
    engine: bool = False,
    quiet: bool = False,
) -> dict[str, Any]:
    """``profile_packed_forward`` of the benchmark's rows (``labutils.benchmark``'s own loading:
    the teacher and the students' packed files in ``out``, untrained stand-ins where a student
    was not trained there) at each (batch, length); ``unfused`` adds "<row>-unfused" rows, the
    same packed students on the unfused steps (before/after in one run, under one load); ``engine`` adds
    "<row>-engine" rows, the same students on the compiled encoder, profiled by its own marks
    (``engine.encoder.engine_profile``: sections ``ENGINE_SECTIONS``, not the hook categories); with provenance (commit, CPU flags, load
    average before and after, threads). Returns {"provenance", "profiles": {row: {"b1_L128": {...}}}}."""
    folder = Path(out)
    load_before = list(os.getloadavg())
    profiles: dict[str, dict] = {}
    with use_threads(threads):
        models, notes = {}, {}
        for row in rows:
            if row == "fp32":
                models[row], notes[row] = load_teacher(folder, model_path)
            elif row == "int8":
                models[row], notes[row] = int8_dynamic(load_teacher(folder, model_path)[0]), "int8 of the teacher"
            else:
                if not student_file(folder, row).is_file():
                    write_untrained_student(folder, row, model_path, PRESETS["full"])
                models[row], notes[row] = pack_model(load_student(folder, row, model_path)), str(student_file(folder, row))
                if engine:
                    from labutils.engine.encoder import EncoderEngine
                    from labutils.kernels.layer import pack_embeddings_
                    from labutils.packfile import load_packed

                    packed = pack_model(load_student(folder, row, model_path))
                    pack_embeddings_(packed, load_packed(student_file(folder, row)))
                    models[f"{row}-engine"] = EncoderEngine(packed)
                if unfused:
                    models[f"{row}-unfused"] = pack_model(load_student(folder, row, model_path))
                    for module in models[f"{row}-unfused"].modules():
                        if hasattr(module, "fused"):
                            module.fused = False
        for batch, length in points:
            inputs = random_inputs(30522, batch, length, 0)
            for row, model in models.items():
                if row.endswith("-engine"):
                    from labutils.engine.encoder import engine_profile

                    found = engine_profile(model, inputs, repeat=repeat)
                else:
                    found = profile_packed_forward(model, inputs, repeat=repeat)
                profiles.setdefault(row, {})[f"b{batch}_L{length}"] = found
                if not quiet:
                    print(row, f"b{batch} L{length}", {k: round(1e3 * v, 1) for k, v in found.items() if k != "repeat"}, flush=True)
    prov = {**provenance(device_name("cpu")), "threads": threads, "load_average_before": load_before,
            "weights_source": notes, "unit": "seconds per forward pass (median of repeat)"}  # fmt: skip
    return {"provenance": prov, "profiles": profiles}


if __name__ == "__main__":  # python -m labutils.benchmark.profile_rows OUT_JSON [rows] [repeat] [--unfused] [--engine]

    args = [a for a in sys.argv[1:] if a not in ("--unfused", "--engine")]
    target = args[0]
    chosen = tuple(args[1].split(",")) if len(args) > 1 else ("fp32", "w1.58a8", "w1a1")
    result = profile_benchmark_rows("results/imdb-full", chosen, repeat=int(args[2]) if len(args) > 2 else 3,
                                    unfused="--unfused" in sys.argv, engine="--engine" in sys.argv)
    with open(target, "w") as f:
        json.dump(result, f, indent=1)
