"""The report stage: one results.json (validated by ``RESULTS_SCHEMA``), a table, charts."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from labutils.benchmark.checkpoints import row_file
from labutils.benchmark.onnx_runtime import ONNX_LABELS, ONNX_ROWS
from labutils.benchmark.preset import ROWS, TARGETS, Preset
from labutils.runs import provenance, read_json, write_json

SCHEMA_VERSION = 1


def rows_of(out: Path, cpu: Mapping[str, Any]) -> dict[str, dict]:
    rows = {}
    for name, row in ROWS.items():
        trained = read_json(row_file(out, "train", name)) if row_file(out, "train", name).is_file() else {}
        if not trained and name not in cpu.get("latency", {}):
            continue
        entry: dict[str, Any] = {"label": row.label, "accuracy": trained.get("accuracy")}
        for key in ("accuracy_before_packing", "train_seconds", "history", "bitnet"):
            if key in trained:
                entry[key] = trained[key]
        for key in ("latency", "memory", "weights_bytes", "file_bytes", "agreement", "compute", "weights_source"):
            if name in cpu.get(key, {}):
                entry[key] = cpu[key][name]
        rows[name] = entry
    # The ONNX Runtime rows: latency and weights from the CPU stage, onnx-int8's accuracy from the
    # train stage's CPU subprocess (--stage int8 --rows int8,onnx-int8). Their peak memory
    # stays in cpu.json but not in the report: ONNX Runtime's arena keeps what an earlier call
    # allocated, so the extra RSS of one call (measure.peak_memory) reads near 0 and is no peak.
    for name in ONNX_ROWS:
        trained = read_json(row_file(out, "train", name)) if row_file(out, "train", name).is_file() else {}
        if trained or name in cpu.get("latency", {}):
            entry = {"label": ONNX_LABELS[name], "accuracy": trained.get("accuracy")}
            for key in ("latency", "weights_bytes", "weights_source"):
                if name in cpu.get(key, {}):
                    entry[key] = cpu[key][name]
            rows[name] = entry
    return rows


def check_targets(results: Mapping[str, Any]) -> list[dict]:
    """The issue's targets against ``results``: [{key, text, value, pass}] (pass None = not measured)."""
    rows = results["rows"]
    get = lambda row, *keys: lookup(rows.get(row, {}), keys)
    teacher = get("fp32", "accuracy")

    def gap(row: str) -> float | None:
        acc = get(row, "accuracy")
        return None if acc is None or teacher is None else 100 * (teacher - acc)

    def speedup(base: str) -> float | None:
        a, b = get(base, "latency", "b32", "L256", "median_ms"), get("w1.58a8", "latency", "b32", "L256", "median_ms")
        return None if a is None or b is None else a / b

    fp32_file, w158_file = get("fp32", "file_bytes"), get("w1.58a8", "file_bytes")
    values = {
        "teacher_accuracy": (None if teacher is None else 100 * teacher, lambda v: v >= 89.0),
        "w158a8_gap": (gap("w1.58a8"), lambda v: v <= 1.0),
        "w1a8_gap": (gap("w1a8"), lambda v: v <= 2.0),
        "w158a8_size": (None if not (fp32_file and w158_file) else fp32_file / w158_file, lambda v: v >= 10.0),
        "w158a8_vs_fp32_latency": (speedup("fp32"), lambda v: v >= 1.5),
        "w158a8_vs_int8_latency": (speedup("int8"), lambda v: v >= 1.0),
    }
    checked = []
    for key, text in TARGETS:
        value, ok = values[key]
        checked.append({"key": key, "text": text, "value": value, "pass": None if value is None else bool(ok(value))})
    return checked


def lookup(mapping: Any, keys: Sequence[str]) -> Any:
    """``mapping[k1][k2]...`` for ``keys``, or None where a key is missing (a row without that column)."""
    for key in keys:
        if not isinstance(mapping, Mapping) or key not in mapping:
            return None
        mapping = mapping[key]
    return mapping


def run_report(preset: Preset, out: Path) -> dict:
    """Stage 3: merge the stages into ``out/results.json`` (validated), print the table, write charts."""
    cpu = read_json(out / "cpu.json") if (out / "cpu.json").is_file() else {}
    train_prov = {}
    for name in ROWS:
        path = row_file(out, "train", name)
        if path.is_file():
            train_prov[name] = read_json(path).get("provenance")
    results = {
        "schema_version": SCHEMA_VERSION,
        "benchmark": "IMDb sentiment: full precision vs INT8 vs 1.58-bit vs 1-bit",
        "preset": asdict(preset),
        "provenance": {"train": train_prov, "cpu": cpu.get("provenance"), "report": provenance("report")},
        "rows": rows_of(out, cpu),
    }
    results["targets"] = check_targets(results)
    validate_results(results)
    write_json(out / "results.json", results)
    print(format_table(results))
    for name, fig in charts(results).items():
        fig.write_html(out / f"{name}.html", include_plotlyjs="cdn", full_html=True)
    return results


# --------------------------------------------------------------------------- results: schema, table, charts

_NUM = {"type": "number"}
_NUM_OR_NULL = {"type": ["number", "null"]}
_BY_LENGTH = {"type": "object", "patternProperties": {"^L[0-9]+$": {}}, "additionalProperties": False}

RESULTS_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "labutils IMDb benchmark results",
    "type": "object",
    "required": ["schema_version", "preset", "provenance", "rows", "targets"],
    "properties": {
        "schema_version": {"const": SCHEMA_VERSION},
        "preset": {"type": "object", "required": ["name", "max_length", "latency_lengths", "latency_batches"]},
        "provenance": {
            "type": "object",
            "required": ["train", "cpu"],
            "properties": {
                "train": {"type": "object", "additionalProperties": {
                    "type": "object", "required": ["commit", "device", "versions", "date"]}},
                "cpu": {"type": ["object", "null"], "required": ["commit", "device", "versions", "date", "threads"]},
            },
        },
        "rows": {
            "type": "object",
            "propertyNames": {"enum": [*ROWS, *ONNX_ROWS]},
            "additionalProperties": {
                "type": "object",
                "required": ["label", "accuracy"],
                "properties": {
                    "accuracy": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
                    "file_bytes": {"type": "integer", "minimum": 1},
                    "weights_bytes": {"type": "integer", "minimum": 1},
                    "latency": {"type": "object", "patternProperties": {"^b[0-9]+$": {
                        "type": "object", "patternProperties": {"^L[0-9]+$": {
                            "type": "object", "required": ["median_ms", "best_ms"],
                            "properties": {"median_ms": _NUM, "best_ms": _NUM}}}}}},
                    "memory": {"type": "object", "propertyNames": {"enum": ["eager", "sdpa"]},
                               "additionalProperties": _BY_LENGTH},
                    "agreement": {"type": "object", "required": ["reviews", "max_abs_logit_diff", "same_prediction"]},
                    "compute": {"type": "object", "required": ["macs", "energy"]},
                },
            },
        },
        "targets": {"type": "array", "items": {
            "type": "object", "required": ["key", "text", "value", "pass"],
            "properties": {"value": _NUM_OR_NULL, "pass": {"type": ["boolean", "null"]}}}},
    },
}  # fmt: skip


def validate_results(results: Mapping[str, Any]) -> None:
    """Raise ``jsonschema.ValidationError`` unless ``results`` follows ``RESULTS_SCHEMA``."""
    import jsonschema

    jsonschema.validate(results, RESULTS_SCHEMA)


def load_results(path: str | os.PathLike) -> dict:
    """Read and validate a ``results.json``."""
    results = read_json(Path(path))
    validate_results(results)
    return results


def format_table(results: Mapping[str, Any], batch: int = 32, length: int = 256) -> str:
    """The benchmark as a text table, then the targets."""
    rows = results["rows"]
    teacher = lookup(rows, ("fp32", "accuracy"))
    b, n = f"b{batch}", f"L{length}"
    lines = [f"{'row':<26}{'accuracy':>9}{'Δ pts':>7}{'file MB':>9}{f'ms {b} {n}':>13}{'MB sdpa':>9}{'MB eager':>9}{'energy µJ':>10}"]
    for name, row in rows.items():
        acc = row.get("accuracy")
        delta = "" if acc is None or teacher is None or name == "fp32" else f"{100 * (acc - teacher):+.2f}"
        ms = lookup(row, ("latency", b, n, "median_ms"))
        mem = [lookup(row, ("memory", attn, n)) for attn in ("sdpa", "eager")]
        energy = lookup(row, ("compute", "energy", "total_j"))
        fmt = lambda value, spec: "" if value is None else format(value, spec)
        file_mb = None if row.get("file_bytes") is None else row["file_bytes"] / 1e6
        cells = [
            f"{row['label']:<26}",
            f"{fmt(None if acc is None else 100 * acc, '.2f'):>9}",
            f"{delta:>7}",
            f"{fmt(file_mb, '.2f'):>9}",
            f"{fmt(ms, '.1f'):>13}",
            *(f"{fmt(m, '.0f'):>9}" for m in mem),
            f"{fmt(None if energy is None else energy * 1e6, '.1f'):>10}",
        ]
        lines.append("".join(cells))
    lines.append("")
    for t in results.get("targets", []):
        mark = {True: "PASS", False: "MISS", None: "n/a "}[t["pass"]]
        value = "" if t["value"] is None else f" ({t['value']:.2f})"
        lines.append(f"[{mark}] {t['text']}{value}")
    return "\n".join(lines)


def table_records(results: Mapping[str, Any], speed_points: Sequence[tuple[int, int]] = ((1, 128), (32, 256))) -> list[dict[str, Any]]:
    """The benchmark as one record per row (for a DataFrame): accuracy and its gap to the
    teacher (points), file and resident-weight sizes and how many times smaller than FP32's,
    speed-up over FP32 at each (batch, length) of ``speed_points`` (ratio of median latencies),
    peak extra memory at the longest length (SDPA) and the arithmetic energy of one pass."""
    rows = results["rows"]
    base = rows.get("fp32", {})
    teacher = base.get("accuracy")
    longest = max((int(k[1:]) for k in lookup(base, ("memory", "sdpa")) or {}), default=None)

    def ratio(a: Any, b: Any) -> float | None:
        return None if a is None or b is None or b == 0 else a / b

    records = []
    for name, row in rows.items():
        acc = row.get("accuracy")
        record: dict[str, Any] = {
            "model": row["label"],
            "accuracy (%)": None if acc is None else 100 * acc,
            "Δ vs teacher (points)": None if acc is None or teacher is None or name == "fp32" else 100 * (acc - teacher),
            "file (MB)": None if row.get("file_bytes") is None else row["file_bytes"] / 1e6,
            "file: × smaller": ratio(base.get("file_bytes"), row.get("file_bytes")),
            "weights in RAM (MB)": None if row.get("weights_bytes") is None else row["weights_bytes"] / 1e6,
            "RAM: × smaller": ratio(base.get("weights_bytes"), row.get("weights_bytes")),
        }
        for b, n in speed_points:
            key = ("latency", f"b{b}", f"L{n}", "median_ms")
            record[f"speed-up b{b} L{n}"] = ratio(lookup(base, key), lookup(row, key))
        if longest is not None:
            record[f"peak MB L{longest} (SDPA)"] = lookup(row, ("memory", "sdpa", f"L{longest}"))
        energy = lookup(row, ("compute", "energy", "total_j"))
        record["energy (µJ)"] = None if energy is None else energy * 1e6
        records.append(record)
    return records


def charts(results: Mapping[str, Any]) -> dict[str, Any]:
    """Plotly figures: accuracy vs file size, latency vs length (one panel per batch), peak
    memory vs length (eager vs SDPA)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    rows = results["rows"]
    figs = {}
    size = go.Figure()
    for name, row in rows.items():
        if row.get("file_bytes") and row.get("accuracy") is not None:
            size.add_trace(go.Scatter(
                x=[row["file_bytes"] / 1e6], y=[100 * row["accuracy"]], mode="markers+text", name=row["label"],
                text=[row["label"]], textposition="top center", marker={"size": 12}))
    size.update_layout(title="Accuracy vs file size", xaxis_title="file size on disk (MB, log)", xaxis_type="log",
                       yaxis_title="test accuracy (%)", template="plotly_white", showlegend=False)
    figs["accuracy_vs_size"] = size

    # The trade-off at a glance: what each row keeps (accuracy) for what it saves (size) and gains (speed).
    speed_point = (1, 128) if lookup(rows, ("fp32", "latency", "b1", "L128")) is not None else None
    trade = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.06,
                          subplot_titles=["file size on disk", "speed-up over FP32" + (" (batch 1, 128 tokens)" if speed_point else "")])
    base = rows.get("fp32", {})
    for name, row in rows.items():
        if row.get("accuracy") is None or not row.get("file_bytes"):
            continue
        acc = 100 * row["accuracy"]
        trade.add_trace(go.Scatter(x=[row["file_bytes"] / 1e6], y=[acc], mode="markers+text", text=[row["label"]],
                                   textposition="top center", marker={"size": 13}, name=row["label"], legendgroup=name), row=1, col=1)
        key = ("latency", "b1", "L128", "median_ms")
        if speed_point and lookup(row, key) and lookup(base, key):
            trade.add_trace(go.Scatter(x=[lookup(base, key) / lookup(row, key)], y=[acc], mode="markers+text", text=[row["label"]],
                                       textposition="top center", marker={"size": 13}, name=row["label"], legendgroup=name,
                                       showlegend=False), row=1, col=2)
    trade.update_xaxes(title_text="MB (log)", type="log", row=1, col=1)
    trade.update_xaxes(title_text="× FP32's speed (higher is faster)", row=1, col=2)
    trade.update_yaxes(title_text="test accuracy (%)", row=1, col=1)
    trade.update_layout(title="What each format keeps, saves and gains", template="plotly_white", showlegend=False)
    figs["tradeoff"] = trade

    batches = list(results["preset"]["latency_batches"])
    lat = make_subplots(rows=1, cols=len(batches), subplot_titles=[f"batch {b}" for b in batches])
    for name, row in rows.items():
        for col, b in enumerate(batches, start=1):
            series = lookup(row, ("latency", f"b{b}")) or {}
            xs = sorted(int(k[1:]) for k in series)
            lat.add_trace(go.Scatter(x=xs, y=[series[f"L{x}"]["median_ms"] for x in xs], mode="lines+markers",
                                     name=row["label"], legendgroup=name, showlegend=col == 1), row=1, col=col)
    lat.update_yaxes(title_text="median latency (ms, log)", type="log")
    lat.update_xaxes(title_text="sequence length (tokens)", type="log")
    lat.update_layout(title="CPU inference latency vs length", template="plotly_white")
    figs["latency_vs_length"] = lat

    mem = go.Figure()
    for name, row in rows.items():
        for attn, dash in (("eager", "dash"), ("sdpa", "solid")):
            series = lookup(row, ("memory", attn)) or {}
            xs = sorted(int(k[1:]) for k in series)
            if xs:
                mem.add_trace(go.Scatter(x=xs, y=[series[f"L{x}"] for x in xs], mode="lines+markers",
                                         name=f"{row['label']}, {attn}", line={"dash": dash}))
    mem.update_layout(title=f"Peak activation memory vs length (batch {results['preset']['memory_batch']})",
                      xaxis_title="sequence length (tokens)", yaxis_title="peak extra resident memory (MB)",
                      template="plotly_white")
    figs["memory_vs_length"] = mem
    return figs


def profile_chart(profiles: Mapping[str, Mapping[str, Any]], rows: Sequence[str] = ("w1.58a8", "w1a1"),
                  points: Sequence[str] = ("b1_L128", "b32_L256"), share: bool = True) -> Any:
    """Where the time of a forward pass goes, before and after: one panel per (batch, length) of
    ``points``, one stacked bar per (row, profile) with the categories of
    ``kernels.profile.CATEGORIES``. ``profiles`` maps a label ("before", "after") to the JSON
    ``python -m labutils.benchmark.profile_rows`` writes; ``share`` stacks percentages of each pass (the
    hooked total in ms above each bar), else milliseconds."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from labutils.kernels.profile import CATEGORIES

    fig = make_subplots(rows=1, cols=len(points), subplot_titles=[p.replace("_", " ").replace("b", "batch ", 1).replace(" L", ", length ") for p in points])
    palette = ["#636efa", "#ef553b", "#00cc96", "#ab63fa", "#ffa15a", "#19d3f3", "#ff6692", "#b6e880", "#ff97ff", "#fecb52"]
    for col, point in enumerate(points, start=1):
        bars = [(f"{ROWS[row].label.split(' (')[0]}<br>{when}", data["profiles"][row][point])
                for row in rows for when, data in profiles.items() if point in data["profiles"].get(row, {})]
        for i, category in enumerate(CATEGORIES):
            ys = [1e3 * p[category] * (100 / (1e3 * p["total"]) if share else 1) for _, p in bars]
            fig.add_trace(go.Bar(x=[b for b, _ in bars], y=ys, name=category.replace("_", " "), legendgroup=category,
                                 marker_color=palette[i % len(palette)], showlegend=col == 1,
                                 customdata=[1e3 * p[category] for _, p in bars],
                                 hovertemplate="%{x}: %{customdata:.1f} ms<extra>" + category + "</extra>"), row=1, col=col)
        fig.add_trace(go.Scatter(x=[b for b, _ in bars], y=[100 if share else 1e3 * p["total"] for _, p in bars],
                                 text=[f"{1e3 * p['total']:,.0f} ms" for _, p in bars], mode="text", textposition="top center",
                                 showlegend=False, hoverinfo="skip"), row=1, col=col)
    fig.update_yaxes(title_text="share of the forward pass (%)" if share else "ms per forward pass", range=[0, 112] if share else None)
    fig.update_layout(barmode="stack", template="plotly_white", title="Where the time of a packed forward pass goes (2 threads)")
    return fig
