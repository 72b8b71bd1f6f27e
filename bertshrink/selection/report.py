"""The trade-off report: a row per model, the Pareto frontier, plots and a markdown table.

Input is what the evaluate and compare stages wrote (``metrics/<model>.json``,
``metrics/comparison.json``); output is files only (PNG, CSV, markdown). No tracking code here.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bertshrink.config.knobs import JUDGED_RETENTION_WORDS
from bertshrink.evaluation.machine import cpu_features
from bertshrink.evaluation.noise import noise_note

TEACHER, FLOOR = "teacher", "floor"
PLOTS = {  # file stem -> (row key of the x axis, axis label, log scale)
    "accuracy_vs_latency": ("b1_p50_ms", "batch-1 latency, p50 (ms, log scale)", True),
    "accuracy_vs_size": ("size_mb", "size on disk (MB, log scale)", True),
    "accuracy_vs_params": ("params_m", "parameters (millions, log scale)", True),
}
CSV_COLUMNS = ("model", "role", "accuracy", "macro_f1", "retention", "retention_low", "retention_high", "agreement",
               "val_accuracy", "val_retention", "val_retention_low", "val_retention_high", "size_mb", "params_m",
               "b1_p50_ms", "b1_p95_ms", "b1_e2e_p50_ms", "large_batch", "large_p50_ms", "large_p95_ms", "large_throughput_eps",
               "pareto_latency", "pareto_size", "pareto_params")


def lookup(result: Mapping[str, Any], dotted: str):
    """``result["a"]["b"]`` for ``"a.b"``; None where any part is missing."""
    value: Any = result
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _ratio(ours, theirs, inverse: bool) -> float | None:
    if not ours or not theirs:
        return None
    return theirs / ours if inverse else ours / theirs


def role_of(name: str, baseline: str | None, peer: Mapping[str, Any] | None = None) -> str:
    """teacher, floor, baseline, peer (another tool's model, never promoted) or candidate."""
    if peer:
        return "peer"
    return {TEACHER: "teacher", FLOOR: "floor"}.get(name, "baseline" if name == baseline else "candidate")


PEER_VERSION_KEYS = ("optimum-onnx", "olive-ai", "transformers", "onnxruntime")


def peer_label(peer: Mapping[str, Any] | None) -> str:
    """``peer: optimum-onnx 0.1.0 (transformers 4.57.6, onnxruntime 1.23.2)``; empty for our own models.

    The tool's own version first, then the libraries that shape its graph; a fallback is said.
    """
    if not peer:
        return ""
    versions = peer.get("versions") or {}
    tool = peer.get("tool", "?")
    others = [f"{k} {versions[k]}" for k in PEER_VERSION_KEYS if k != tool and k in versions]
    label = f"peer: {tool} {versions.get(tool, '?')}" + (f" ({', '.join(others)})" if others else "")
    return label + (f"; {peer['fallback']}" if peer.get("fallback") else "")


def large_batch(latency: Mapping[str, Any]) -> int | None:
    """The largest measured batch size above 1 (32 by default): the throughput setting."""
    sizes = [int(k.removeprefix("batch_")) for k in latency if k.startswith("batch_")]
    return max((b for b in sizes if b > 1), default=None)


def model_row(result: Mapping[str, Any], latency: Mapping[str, Any] | None, baseline: str | None) -> dict:
    """The figures of one model, flat; latency from the interleaved comparison when given."""
    latency = latency or result.get("latency") or {}
    big = large_batch(latency)
    name = result.get("model", "?")
    peer = result.get("peer")

    def lat(batch: int, key: str):
        return lookup(latency, f"batch_{batch}.{key}")

    size, params = lookup(result, "size.total_bytes"), result.get("parameters")
    return {
        "model": name, "role": role_of(name, baseline, peer), "peer": peer_label(peer),
        "format": result.get("format", ""),
        "accuracy": lookup(result, "metrics.test.accuracy"), "macro_f1": lookup(result, "metrics.test.macro_f1"),
        "retention": lookup(result, "behaviour.retention"), "agreement": lookup(result, "behaviour.agreement"),
        "retention_low": lookup(result, "behaviour.retention_low"),
        "retention_high": lookup(result, "behaviour.retention_high"),
        "val_accuracy": lookup(result, "selection.accuracy"), "val_retention": lookup(result, "selection.retention"),
        "val_retention_low": lookup(result, "selection.retention_low"),
        "val_retention_high": lookup(result, "selection.retention_high"),
        "size_bytes": size, "size_mb": None if size is None else size / 1e6,
        "parameters": params, "params_m": None if params is None else params / 1e6,
        "b1_p50_ms": lat(1, "p50_ms"), "b1_p95_ms": lat(1, "p95_ms"), "b1_e2e_p50_ms": lat(1, "e2e_p50_ms"),
        "large_batch": big, "large_p50_ms": lat(big, "p50_ms"), "large_p95_ms": lat(big, "p95_ms"),
        "large_throughput_eps": lat(big, "throughput_eps"),
        "seeds": result.get("seeds"), "behaviour": result.get("behaviour") or {},
    }


def with_ratios(rows: list[dict], reference: str, prefix: str) -> list[dict]:
    """Add ``<prefix>_smaller``, ``<prefix>_b1_speedup``, ``<prefix>_large_speedup`` against row ``reference``."""
    ref = next((r for r in rows if r["model"] == reference), None)
    for row in rows:
        row[f"{prefix}_smaller"] = _ratio(row["size_bytes"], ref and ref["size_bytes"], inverse=True)
        row[f"{prefix}_b1_speedup"] = _ratio(row["b1_p50_ms"], ref and ref["b1_p50_ms"], inverse=True)
        row[f"{prefix}_large_speedup"] = _ratio(row["large_p50_ms"], ref and ref["large_p50_ms"], inverse=True)
    return rows


def report_rows(results: Sequence[Mapping[str, Any]], comparison: Mapping[str, Any] | None = None,
                baseline: str | None = None) -> list[dict]:
    """One row per evaluated model (teacher first), with ratios to the teacher and to ``baseline``."""
    compared = (comparison or {}).get("models", {})
    rows = [model_row(r, (compared.get(r.get("model")) or {}).get("latency"), baseline) for r in results]
    # the teacher, the baseline, the peers beside it, the floor, then our recipes
    rows.sort(key=lambda r: (r["role"] != "teacher", r["role"] != "baseline", r["role"] != "peer", r["role"] != "floor"))
    with_ratios(rows, TEACHER, "teacher")
    with_ratios(rows, baseline or "", "base")
    for stem, (x, _, _) in PLOTS.items():
        front = set(pareto_front(rows, x))
        for row in rows:
            row[f"pareto_{stem.removeprefix('accuracy_vs_')}"] = row["model"] in front
    return rows


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def pareto_front(rows: Sequence[Mapping[str, Any]], x_key: str, y_key: str = "accuracy") -> list[str]:
    """Names of the rows no other row beats (lower or equal x and higher or equal y, one strictly).

    Returned in increasing x: the frontier's line from the cheapest model to the most accurate.
    """
    points = [(r[x_key], r[y_key], r["model"]) for r in rows if _finite(r.get(x_key)) and _finite(r.get(y_key))]
    front = []
    for x, y, name in points:
        dominated = any(ox <= x and oy >= y and (ox < x or oy > y) for ox, oy, _ in points)
        if not dominated:
            front.append((x, -y, name))
    return [name for _, _, name in sorted(front)]


# --------------------------------------------------------------------------- markdown


def _fmt(value, kind: str = "num") -> str:
    if not _finite(value):
        return "—"
    return {"pct": f"{value:.1%}", "x": f"{value:.2f}x", "acc": f"{value:.4f}", "ms": f"{value:.2f}",
            "mb": f"{value:.1f}", "m": f"{value:.2f}", "eps": f"{value:.0f}"}.get(kind, f"{value:.3g}")


def _pair(a, b) -> str:
    return f"{_fmt(a, 'x')} / {_fmt(b, 'x')}"


def _retention_cell(point, low, high) -> str:
    """``97.3% [94.8, 99.7]``: retention and its paired 95% interval, where one was computed."""
    if not (_finite(low) and _finite(high)) or not _finite(point):
        return _fmt(point, "pct")
    return f"{point:.1%} [{low * 100:.1f}, {high * 100:.1f}]"


def _seeds_cell(seeds: Mapping[str, Any] | None) -> str:
    spread = (seeds or {}).get("accuracy") or {}
    if not spread.get("n") or spread["n"] < 2:
        return ""
    return f" ({spread['mean']:.4f} ± {spread['std']:.4f}, {spread['n']} seeds)"


TABLE_HEADER = ("| model | role | format | test acc | macro-F1 | retention | agreement | val acc | val retention | size MB | params M | "
                "b1 p50 ms | b1 p95 ms | b1 text→label p50 ms | bN p50 ms | bN p95 ms | bN ex/s | smaller vs teacher / base | "
                "b1 faster vs teacher / base | bN faster vs teacher / base | registry |")


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Every model's figures; ratios read "x times smaller / faster" than the teacher / the baseline."""
    big = next((r["large_batch"] for r in rows if r.get("large_batch")), None)
    header = TABLE_HEADER.replace("bN", f"b{big}" if big else "bN")
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for r in rows:
        lines.append("| " + " | ".join([
            r["model"], r.get("peer") or r["role"], r.get("format") or "",
            _fmt(r["accuracy"], "acc") + _seeds_cell(r.get("seeds")), _fmt(r["macro_f1"], "acc"),
            _retention_cell(r["retention"], r.get("retention_low"), r.get("retention_high")),
            _fmt(r["agreement"], "pct"), _fmt(r.get("val_accuracy"), "acc"),
            _retention_cell(r.get("val_retention"), r.get("val_retention_low"), r.get("val_retention_high")),
            _fmt(r["size_mb"], "mb"),
            _fmt(r["params_m"], "m"), _fmt(r["b1_p50_ms"], "ms"), _fmt(r["b1_p95_ms"], "ms"),
            _fmt(r.get("b1_e2e_p50_ms"), "ms"),
            _fmt(r["large_p50_ms"], "ms"), _fmt(r["large_p95_ms"], "ms"), _fmt(r["large_throughput_eps"], "eps"),
            _pair(r["teacher_smaller"], r["base_smaller"]), _pair(r["teacher_b1_speedup"], r["base_b1_speedup"]),
            _pair(r["teacher_large_speedup"], r["base_large_speedup"]), r.get("registry") or "",
        ]) + " |")
    return "\n".join(lines)


def behaviour_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Accuracy per class and per input-length bucket, a column each, a row per model."""
    columns: list[tuple[str, str]] = []
    for r in rows:
        for group in ("by_class", "by_length"):
            for key in (r.get("behaviour") or {}).get(group, {}):
                if (group, key) not in columns:
                    columns.append((group, key))
    if not columns:
        return ""
    head = "| model | " + " | ".join(_column_name(g, k) for g, k in columns) + " | disagreements |"
    lines = [head, "|" + "---|" * (len(columns) + 2)]
    for r in rows:
        b = r.get("behaviour") or {}
        cells = [_fmt(lookup(b, f"{g}.{k}.accuracy"), "acc") for g, k in columns]
        lines.append(f"| {r['model']} | " + " | ".join(cells) + f" | {b.get('disagreements', '—')} |")
    n = {k: lookup(rows[0].get("behaviour") or {}, f"{g}.{k}.n") for g, k in columns} if rows else {}
    lines.append("")
    lines.append("Examples per column: " + ", ".join(f"{_column_name(g, k)}: {n[k]}" for g, k in columns
                                                     if n.get(k) is not None) + ".")
    return "\n".join(lines)


def _column_name(group: str, key: str) -> str:
    return key.replace("words_", "").replace("-up", "+") + " words" if group == "by_length" else key


# --------------------------------------------------------------------------- plots


MARKERS = {"teacher": ("*", "#d62728", 260), "baseline": ("D", "#ff7f0e", 110), "floor": ("s", "#7f7f7f", 100),
           "peer": ("^", "#9467bd", 100), "candidate": ("o", "#1f77b4", 70)}


def plot_tradeoff(rows: Sequence[Mapping[str, Any]], x_key: str, x_label: str, path: Path, title: str,
                  log_x: bool = True) -> Path:
    """Accuracy against ``x_key``: a labelled point per model, the Pareto frontier, teacher/baseline/floor marked."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    points = [r for r in rows if _finite(r.get(x_key)) and _finite(r.get("accuracy"))]
    fig, ax = plt.subplots(figsize=(10, 6.5), dpi=120)
    try:
        front = [next(r for r in points if r["model"] == n) for n in pareto_front(points, x_key)]
        if front:
            ax.step([r[x_key] for r in front], [r["accuracy"] for r in front], where="post", color="#2ca02c",
                    linewidth=1.5, linestyle="--", label="Pareto frontier", zorder=1)
        for role, (marker, colour, size) in MARKERS.items():
            group = [r for r in points if r["role"] == role]
            if group:
                ax.scatter([r[x_key] for r in group], [r["accuracy"] for r in group], marker=marker, s=size,
                           color=colour, edgecolor="black", linewidth=0.5, label=role, zorder=3)
        if log_x:
            _readable_log_axis(ax)
        ax.margins(x=0.12)  # room for the labels of the outermost points
        ys = [r["accuracy"] for r in points]
        if ys:
            pad = max(0.01, (max(ys) - min(ys)) * 0.1)
            ax.set_ylim(min(ys) - pad, min(1.0, max(ys) + pad))
        _label_points(ax, points, x_key)
        ax.set_xlabel(x_label, fontsize=11)
        ax.set_ylabel("test accuracy (fraction correct)", fontsize=11)
        ax.set_title(title, fontsize=12)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="lower right", fontsize=9)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def _label_points(ax, points: Sequence[Mapping[str, Any]], x_key: str) -> None:
    """Name each point; a label that would sit on an earlier one moves down a line (same-spot models)."""
    placed: list[tuple[float, float]] = []
    for r in points:
        px, py = ax.transData.transform((r[x_key], r["accuracy"]))
        dy = 5
        while any(abs(px - qx) < 90 and abs(py + dy - qy) < 11 for qx, qy in placed):
            dy -= 12
        placed.append((px, py + dy))
        ax.annotate(r["model"], (r[x_key], r["accuracy"]), textcoords="offset points", xytext=(6, dy),
                    fontsize=9, zorder=4)


def _readable_log_axis(ax) -> None:
    """Log x axis with plain-number ticks at 1, 2, 5 x 10^k (not only 10^0, 10^1)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def write_plots(rows: Sequence[Mapping[str, Any]], out_dir: Path, title: str) -> list[Path]:
    """The three trade-off PNGs in ``out_dir``."""
    return [plot_tradeoff(rows, x, label, Path(out_dir) / f"{stem}.png", title, log)
            for stem, (x, label, log) in PLOTS.items()]


def write_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """The plotted figures as CSV, the data of ``dvc plots`` (one row per model)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_COLUMNS})
    return path


# --------------------------------------------------------------------------- targets


def _interval_text(row: Mapping[str, Any], key: str) -> str:
    low, high = row.get(f"{key}_low"), row.get(f"{key}_high")
    return f" (95% interval {low:.2%} to {high:.2%})" if _finite(low) and _finite(high) else ""


def check_targets(row: Mapping[str, Any], targets: Mapping[str, float]) -> list[dict]:
    """Each target (``min_retention``, ``min_b1_speedup_vs_teacher``, ``min_b1_speedup_vs_baseline``,
    ``min_smaller_vs_teacher``, ``min_smaller_vs_baseline``) against ``row``'s figure: met or not."""
    figures = {"min_retention": ("retention", "{:.2%}"), "min_b1_speedup_vs_teacher": ("teacher_b1_speedup", "{:.2f}x"),
               "min_b1_speedup_vs_baseline": ("base_b1_speedup", "{:.2f}x"),
               "min_smaller_vs_teacher": ("teacher_smaller", "{:.2f}x"),
               "min_smaller_vs_baseline": ("base_smaller", "{:.2f}x")}
    checks = []
    for name, required in targets.items():
        key, fmt = figures[name]
        value = row.get(key)
        checks.append({"target": name, "required": required, "measured": value,
                       "required_text": fmt.format(required),
                       "measured_text": "—" if value is None else fmt.format(value) + _interval_text(row, key),
                       "met": value is not None and value >= required})
    return checks


# --------------------------------------------------------------------------- report.md


def machine_line(results: list[dict], comparison: dict | None) -> str:
    machine = (comparison or {}).get("machine") or (results[0].get("machine", {}) if results else {})
    if not machine:
        return ""
    return (f"Measured on {machine.get('cpu_model', '?')} ({cpu_features(machine)}), {machine.get('threads', '?')} "
            f"threads, torch {machine.get('torch', '?')}, onnxruntime {machine.get('onnxruntime', '?')}.")


def noise_warning(comparison: Mapping[str, Any] | None) -> str:
    """A warning line for a comparison its noise guard marked noisy; empty when clean or not guarded."""
    noise = (comparison or {}).get("noise") or {}
    if not noise.get("noisy"):
        return ""
    return (f"> **Warning: {noise_note(noise)}.** The latencies and speed ratios below are kept but not clean "
            "(`noise` in `metrics/comparison.json`).")


def promotion_lines(promotion: dict | None) -> list[str]:
    if not promotion:
        return []
    lines = ["## Promotion", "", f"- rule: `{promotion['objective']}` within {constraint_text(promotion['constraints'])}"
             f"{', auto-promote with margin ' + format(promotion['margin'], '.0%') if promotion['auto_promote'] else ''}",
             f"- challenger: {promotion['reason']}", f"- champion: {promotion['champion_reason']}"]
    lines += [f"- not eligible: `{name}`: {why}" for name, why in promotion.get("rejected", {}).items()]
    return lines + [""]


def constraint_text(constraints: dict) -> str:
    judged = JUDGED_RETENTION_WORDS[constraints.get("retention_bound") or "point"]
    words = {"min_retention": judged + " >= {:.0%}", "min_agreement": "agreement >= {:.0%}",
             "max_p95_ms": "b1 p95 <= {} ms", "max_size_mb": "size <= {} MB"}
    parts = [words[k].format(v) for k, v in constraints.items() if v is not None and k in words]
    return ", ".join(parts) or "no constraints"


def report_markdown(rows: list[dict], title: str, comparison: dict | None, promotion: dict | None,
                    machine: str, baseline: str | None) -> str:
    how = ("Latencies: one interleaved comparison (every batch run by every model back to back), "
           if comparison else "Latencies: each model's own evaluation, ")
    warning = noise_warning(comparison)
    lines = [f"# {title}", "", *([warning, ""] if warning else []), markdown_table(rows), "",
             how + "forward pass only (tokenization excluded), except the floor, whose time includes its TF-IDF "
             "featurisation; *text→label* is the same batch from text in to label out (tokenization, forward, "
             "argmax): what a service pays. Speed ratios, the plots and the promotion rule (`fastest`, `max_p95_ms`) "
             f"use the forward-only figures. Ratios: times smaller / faster than the PyTorch fp32 teacher / than `{baseline}`. "
             "Retention: test accuracy / the teacher's, with its paired bootstrap 95% interval in brackets. Agreement: share of test predictions equal to the teacher's. "
             "The promotion rule judges the validation figures (val acc, val retention, and agreement on validation); "
             "the test split only reports, so the chosen model's test figures are not inflated by the choice. "
             "Registry: the version registered by this run and the aliases this run gave it.", "", machine, ""]
    lines += promotion_lines(promotion)
    behaviour = behaviour_table(rows)
    if behaviour:
        lines += ["## Accuracy by class and by input length", "", behaviour, ""]
    lines += ["## Trade-offs", ""] + [f"![{stem}]({stem}.png)" for stem in PLOTS] + [""]
    return "\n".join(lines)
