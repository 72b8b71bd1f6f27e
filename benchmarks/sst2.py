"""SST-2 benchmark write-up: ``bench/results/sst2.json`` and ``BENCHMARKS.md`` from the last
``python -m flows.pipeline --params configs/sst2.yaml``, ``benchmarks/peers.py`` and
``python -m flows.compare --with-peers`` (``make bench`` runs them all).

Every figure comes from that one run: the teacher, the floor, ``baseline-ort-int8`` and every
recipe, timed interleaved on the same batches, ratios from the same run. The champion is checked
against the targets of issue 5; published figures from the papers are shown beside ours, labelled
as such (other hardware, other teachers). ``bench/notes.md`` (hand-written analysis) is appended.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from the repository root

from bertshrink.modelfolder.peers import current_peers  # noqa: E402
from bertshrink.config.artifacts import Artifacts, read_json  # noqa: E402
from bertshrink.config.params import load_params  # noqa: E402
from bertshrink.selection.report import (PLOTS, check_targets, constraint_text, machine_line, markdown_table,  # noqa: E402
                                        noise_warning, report_rows)
from flows.report import report_names  # noqa: E402
from tasks.report import load_results, registry_cell  # noqa: E402
from tracking.runs import git_commit  # noqa: E402

TARGETS = {"min_retention": 0.99, "min_b1_speedup_vs_teacher": 6.0, "min_b1_speedup_vs_baseline": 2.0,
           "min_smaller_vs_teacher": 15.0, "min_smaller_vs_baseline": 4.0}
TARGET_WORDS = {"min_retention": "accuracy retained (of the teacher's)",
                "min_b1_speedup_vs_teacher": "batch-1 speedup vs the PyTorch fp32 teacher",
                "min_b1_speedup_vs_baseline": "batch-1 speedup vs baseline-ort-int8",
                "min_smaller_vs_teacher": "smaller than the fp32 teacher",
                "min_smaller_vs_baseline": "smaller than baseline-ort-int8"}
PUBLISHED = [  # published anchors: other hardware, other (bigger) teachers; not comparable one to one
    ("DistilBERT (Sanh et al., 2019)", "97% of BERT-base's GLUE score, 1.6x faster (60% of the time), 40% smaller"),
    ("TinyBERT-4 (Jiao et al., 2020)", "96.8% of BERT-base on GLUE, 7.5x smaller, 9.4x faster"),
    ("Q8BERT (Zafrir et al., 2019)", "SST-2 92.24 (int8) vs 92.36 (fp32), 4x smaller"),
    ("MiniLM-L6 (Wang et al., 2020)", "SST-2 91.5 (its own fine-tuning on all 67k sentences)"),
]


def champion_name(promotion: dict | None) -> str | None:
    """The model behind @champion after the run: the challenger if it was promoted, else the one before."""
    if not promotion:
        return None
    if promotion.get("champion_moved"):
        return (promotion.get("challenger") or {}).get("name")
    return (promotion.get("champion_before") or {}).get("name")


def copy_plots(report_dir: Path, out_dir: Path) -> list[str]:
    names = []
    for stem in PLOTS:
        source = report_dir / f"{stem}.png"
        if source.is_file():
            shutil.copyfile(source, out_dir / f"sst2_{stem}.png")
            names.append(f"sst2_{stem}.png")
    return names


def targets_markdown(champion: str | None, checks: list[dict]) -> list[str]:
    if not champion:
        return ["No champion was promoted in this run (see the promotion section of the report).", ""]
    lines = [f"Champion: `{champion}`.", "", "| target | required | measured | met |", "|---|---|---|---|"]
    lines += [f"| {TARGET_WORDS[c['target']]} | >= {c['required_text']} | {c['measured_text']} | "
              f"{'yes' if c['met'] else '**no**'} |" for c in checks]
    return lines + [""]


def peers_markdown(summary: dict | None) -> list[str]:
    """What benchmarks/peers.py ran: each peer tool, its versions, what it did, how long, or why it failed."""
    if not summary:
        return ["No peer tools ran (`python benchmarks/peers.py --params ...`, part of `make bench`).", ""]
    lines = ["Each peer ran by its own code in its own venv (`benchmarks/peers.py`), from the same teacher folder; "
             "its graph is timed in the same interleaved comparison and evaluated by the same code as ours. "
             "Peers are never registered or promoted.", "",
             "| peer | tool and versions | what it ran | search | time to make | status |", "|---|---|---|---|---|---|"]
    for p in summary.get("peers", []):
        versions = ", ".join(f"{k} {v}" for k, v in (p.get("versions") or {}).items())
        made = (p.get("peer_seconds") or {}).get("total")
        status = "ok" if p.get("status") == "ok" else f"**failed**: {p.get('error', '?')}"
        search = "yes" if p.get("search") else ("no" + (f" ({p['fallback']})" if p.get("fallback") else ""))
        lines.append(f"| {p['name']} | {versions or '—'} | {p.get('recipe') or '—'} | {search} | "
                     f"{'—' if made is None else f'{made:.0f} s'} | {status} |")
    return lines + [""]


def benchmarks_markdown(rows, promotion, champion, checks, plots, machine, params_file, seconds, notes,
                        peers: dict | None = None) -> str:
    lines = ["# Benchmarks: GLUE SST-2", "",
             f"Generated by `make bench` (`python -m flows.pipeline --params {params_file}` then "
             "`python benchmarks/sst2.py`) from `../shared/datasets/sst2`; every figure below comes from one run "
             "of the pipeline on this machine, and every ratio from one interleaved timing of all models. "
             f"Raw figures: `bench/results/sst2.json`. Pipeline wall time: {seconds}.", "",
             machine, "", "## Champion against the targets", ""]
    lines += targets_markdown(champion, checks)
    if promotion:
        lines += [f"Rule: `{promotion['objective']}` among models with {constraint_text(promotion['constraints'])}. "
                  f"Challenger: {promotion['reason']}. "
                  f"Champion: {promotion['champion_reason']}.", ""]
    lines += ["## Every model (SST-2 dev, 872 sentences)", "", markdown_table(rows), "",
              "Ratios: times smaller / faster than the PyTorch fp32 teacher / than `baseline-ort-int8` (ONNX Runtime "
              "dynamic int8, the standard recipe). Latency: forward pass at sequence length <= 64, 2 threads; the "
              "floor's includes its TF-IDF featurisation.", "", "## Peers: other tools on the same teacher", ""]
    lines += peers_markdown(peers)
    lines += ["## Trade-offs", ""]
    lines += [f"![{p}](bench/results/{p})" for p in plots] + [""]
    lines += ["## Published figures (for orientation only)", "",
              "Published on other hardware (GPUs or server CPUs), with BERT-base teachers fine-tuned on all of SST-2; "
              "our teacher is MiniLM-L6 fine-tuned on a 6k-sentence CPU budget, so only the ratios are comparable "
              "in kind, not the accuracies.", "", "| method | published |", "|---|---|"]
    lines += [f"| {name} | {what} |" for name, what in PUBLISHED] + [""]
    if notes:
        lines += [notes.strip(), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="configs/sst2.yaml")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--markdown", default="BENCHMARKS.md")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    paths = Artifacts(params.base)
    peers, _ = current_peers(paths.peers_dir, paths.teacher) if paths.teacher.is_dir() else ([], {})
    results = load_results(paths, report_names(params) + [p.name for p in peers])
    if not results:
        sys.exit(f"bertshrink: no metrics in {params.base.metrics_dir}: run `make bench` (the pipeline on {args.params}) first.")
    comparison = read_json(paths.comparison)
    promotion = read_json(paths.promotion)
    rows = report_rows(results, comparison, params.compress.baseline)
    for r in rows:
        r["registry"] = registry_cell(paths, r["model"], promotion)
    champion = champion_name(promotion)
    row = next((r for r in rows if r["model"] == champion), None)
    checks = check_targets(row, TARGETS) if row else []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plots = copy_plots(paths.report_dir, out)
    summary = paths.pipeline_summary
    seconds = next((line.split(":", 1)[1].strip().rstrip(".") for line in summary.read_text().splitlines()
                    if line.startswith("Pipeline wall time")), "unknown") if summary.is_file() else "unknown"
    # a comparison timed on a busy machine is said so above the targets, not published as clean
    machine = "\n\n".join(filter(None, [noise_warning(comparison), machine_line(results, comparison)]))
    record = {"dataset": "GLUE SST-2, dev split (872 sentences)", "params_file": args.params, "git_commit": git_commit(),
              "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "pipeline_wall_time": seconds,
              "machine": (comparison or {}).get("machine") or results[0].get("machine"), "champion": champion,
              "targets": checks, "promotion": promotion,
              "peers": read_json(paths.peers_summary),
              "models": [{k: v for k, v in r.items() if k != "behaviour"} | {"behaviour": r.get("behaviour")}
                         for r in rows],
              "published_anchors": [{"method": n, "published": w} for n, w in PUBLISHED]}
    (out / "sst2.json").write_text(json.dumps(record, indent=2, default=str))
    notes_file = ROOT / "bench" / "notes.md"
    notes = notes_file.read_text() if notes_file.is_file() else ""
    Path(args.markdown).write_text(benchmarks_markdown(rows, promotion, champion, checks, plots, machine,
                                                       args.params, seconds, notes, read_json(paths.peers_summary)))
    print(f"bertshrink: wrote {out / 'sst2.json'} and {args.markdown}; champion {champion}: "
          + ", ".join(f"{c['target']} {c['measured_text']} ({'met' if c['met'] else 'MISSED'})" for c in checks))


if __name__ == "__main__":
    main()
