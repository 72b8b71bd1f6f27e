"""Bad inputs and faults, each through the real command line: what the user sees, and what is kept.

Builds a small good workspace first (BBC News capped to 160 training rows, the packaged MiniLM,
one epoch: prepare, validate, teacher, evaluate, register), then runs each input of issue 13
against it as a user would, in a fresh process, with the same workspace and MLflow store. For
each: the command, the exit code, the first line of the message, the seconds to fail, and whether
the good data, teacher, metrics and registry aliases are byte-for-byte unchanged.

    python benchmarks/faults.py                 # -> bench/results/faults.json and FAULTS.md

About 10 minutes on 2 cores. Offline by design: the Hub rows show what no network looks like.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from a checkout

from flows._prefect_server import SERVER_APP  # noqa: E402  (what a temporary Prefect server runs)
GOOD = ("base:\n  seed: 42\n"
        "data:\n  source: packaged:bbc-news\n  max_train_samples: 160\n  max_eval_samples: 60\n"
        "teacher:\n  model: packaged:all-MiniLM-L6-v2\n  max_length: 32\n  epochs: 1\n  save_steps: 5\n"
        "evaluate:\n  batch_sizes: [1]\n  warmup_iterations: 1\n  timed_iterations: 3\n"
        "floor:\n  enabled: false\n")
WORDS = "good bad great awful fine poor nice dull bright dark".split()


@dataclass
class Outcome:
    row: str
    input: str
    command: str
    exit_code: int
    message: str
    seconds: float
    changed: list[str] = field(default_factory=list)
    note: str = ""


def run(args: list[str], ws: Path, env: dict | None = None, timeout: int = 900) -> tuple[int, str, float]:
    """One command as a user runs it: exit code, stderr, wall seconds."""
    started = time.time()
    done = subprocess.run([sys.executable, *args], cwd=ws, env={**base_env(ws), **(env or {})},
                          capture_output=True, text=True, timeout=timeout)
    return done.returncode, done.stderr + done.stdout, time.time() - started


def base_env(ws: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{ws / 'mlflow.db'}"}
    for name in ("PREFECT_API_URL", "HF_HUB_OFFLINE"):
        env.pop(name, None)  # as a user has it: a temporary Prefect server, no offline flag
    return env


def message(output: str) -> str:
    """The first thing the user is told (the ``bertshrink:`` line and the list under it), or the first warning."""
    lines = output.splitlines()
    for prefix in ("bertshrink:", "WARNING"):
        at = next((i for i, line in enumerate(lines) if line.startswith(prefix) or f"| {prefix}" in line), None)
        if at is not None:
            first = lines[at].split(" - ", 1)[-1] if "|" in lines[at] else lines[at]
            listed = [line.strip() for line in lines[at + 1:at + 3] if line.startswith("  - ")]
            return " ".join([first, *listed])
    return ""


def digest(path: Path) -> str:
    """sha256 over a file or a folder's files (names and bytes)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []
    for p in files:
        h.update(str(p.relative_to(path.parent)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def registry_state(ws: Path) -> dict:
    """Aliases -> version, and each version's recorded accuracy, from the workspace's MLflow store."""
    code = ("import json, mlflow\nfrom mlflow import MlflowClient\nc = MlflowClient()\n"
            "m = c.get_registered_model('bertshrink-classifier')\n"
            "vs = c.search_model_versions(\"name='bertshrink-classifier'\")\n"
            "print(json.dumps({'aliases': m.aliases, 'versions': {v.version: v.tags.get('metric.test.accuracy') "
            "for v in vs}}, sort_keys=True))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ws, env=base_env(ws), capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else {"error": done.stderr[-300:]}


def snapshot(ws: Path) -> dict:
    return {"data/prepared": digest(ws / "data" / "prepared"), "models/teacher": digest(ws / "models" / "teacher"),
            "metrics/teacher.json": digest(ws / "metrics" / "teacher.json"), "registry": registry_state(ws)}


def changes(before: dict, after: dict) -> list[str]:
    return [name for name in before if before[name] != after[name]]


def params_with(ws: Path, name: str, extra: str) -> str:
    """A params file: the good one with sections replaced (YAML: the later key wins)."""
    path = ws / f"params-{name}.yaml"
    path.write_text(GOOD + extra)
    return path.name


def csv_rows(n: int, seed: int = 0, classes=("pos", "neg")) -> list[str]:
    import random

    rng = random.Random(seed)
    return [f"{' '.join(rng.choice(WORDS) for _ in range(8))} {i},{classes[i % len(classes)]}" for i in range(n)]


# ---------------------------------------------------------------- the inputs


def data_inputs(files: Path) -> dict[str, tuple[str, str]]:
    """name -> (issue row, file) for the data sources that must fail or report."""
    files.mkdir(exist_ok=True)
    (files / "single_class.csv").write_text("text,label\n" + "\n".join(csv_rows(200, classes=("pos",))) + "\n")
    (files / "one_row.csv").write_text("text,label\nhello world,pos\n")
    (files / "header_only.csv").write_text("text,label\n")
    (files / "latin1.csv").write_bytes(("text,label\n" + "\n".join(f"caf\xe9 {r}" for r in csv_rows(200))).encode("latin-1"))
    ragged = ["text\tlabel"] + [r.replace(",", "\t") for r in csv_rows(200)]
    ragged[8] = "a\tb\tc\td"
    (files / "ragged.tsv").write_text("\n".join(ragged) + "\n")
    (files / "blank_texts.csv").write_text("text,label\n" + "\n".join(csv_rows(135) + [" ,pos"] * 15) + "\n")
    (files / "missing_labels.csv").write_text("text,label\n" + "\n".join(csv_rows(150) + [f"no label {i}," for i in range(10)]) + "\n")
    return {"single-class dataset": ("1", "single_class.csv"), "one-row dataset": ("6", "one_row.csv"),
            "header-only CSV": ("6", "header_only.csv"), "latin-1 CSV": ("6", "latin1.csv"),
            "ragged TSV": ("6", "ragged.tsv"), "15 blank texts of 150": ("9", "blank_texts.csv"),
            "10 rows without a label": ("9", "missing_labels.csv"), "nonexistent path": ("8", "does/not/exist.csv")}


def build_good_workspace(ws: Path) -> None:
    (ws / "params.yaml").write_text(GOOD)
    for stage in ("prepare", "validate", "teacher", "evaluate", "register"):
        code, output, seconds = run(["-m", f"flows.{stage}"], ws)
        print(f"  good workspace: {stage} exit {code} in {seconds:.0f} s", flush=True)
        if code != 0:
            raise SystemExit(f"the good workspace failed at {stage}:\n{output[-3000:]}")


def gpt2_folder(ws: Path) -> Path:
    from transformers import GPT2Config

    folder = ws / "inputs" / "gpt2"
    GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=50).save_pretrained(folder)
    return folder


def truncated_model(ws: Path) -> Path:
    folder = ws / "inputs" / "truncated"
    shutil.copytree(ws / "models" / "teacher", folder, dirs_exist_ok=True)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4])
    return folder


def log_text(ws: Path) -> str:
    log = ws / "reports" / "logs" / "bertshrink.log"
    return log.read_text() if log.is_file() else ""


def resumed_from(ws: Path) -> str:
    """The checkpoint the last teacher run resumed from, as its log says."""
    lines = [line for line in log_text(ws).splitlines() if "Resuming training from" in line]
    return lines[-1].split(" - ", 1)[-1][:160] if lines else "no resume logged"


def prefect_servers() -> int:
    """Temporary Prefect servers running on this machine."""
    import psutil

    return sum(SERVER_APP in " ".join(p.info["cmdline"] or [])
               for p in psutil.process_iter(["cmdline"]))


def running_mlflow_runs(ws: Path) -> int:
    code = ("import mlflow\nprint(len(mlflow.search_runs(search_all_experiments=True, "
            "filter_string=\"attributes.status = 'RUNNING'\")))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ws, env=base_env(ws), capture_output=True, text=True)
    return int(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else -1


def start_and_wait_for_server(args: list[str], ws: Path, seconds_after: float, **popen) -> subprocess.Popen:
    """Start a command, wait until its Prefect server is up and ``seconds_after`` more (into the flow)."""
    import psutil

    proc = subprocess.Popen([sys.executable, *args], cwd=ws, env=base_env(ws), **popen)
    deadline = time.time() + 120
    while time.time() < deadline and not any(SERVER_APP in " ".join(c.cmdline())
                                             for c in psutil.Process(proc.pid).children(recursive=True)):
        time.sleep(0.5)
    time.sleep(seconds_after)
    return proc


KILLED = "teacher:\n  model: packaged:all-MiniLM-L6-v2\n  max_length: 32\n  epochs: 4\n  save_steps: 5\n"


def killed_run(ws: Path) -> Outcome:
    """SIGKILL a teacher run once it has written a checkpoint; then what the next command finds and does."""
    proc = start_and_wait_for_server(["-m", "flows.teacher", "--params", params_with(ws, "killed", KILLED)], ws, 0,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not list((ws / "checkpoints" / "teacher").glob("checkpoint-*/trainer_state.json")):
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    servers, runs = prefect_servers(), running_mlflow_runs(ws)
    code, output, seconds = run(["-m", "flows.validate"], ws)
    return Outcome("5", "SIGKILL while the teacher trains, then the next command", "python -m flows.validate",
                   code, message(output), seconds,
                   note=f"after the kill: {servers} temporary Prefect server(s) and {runs} MLflow run(s) left "
                        f"RUNNING; after the next command: {prefect_servers()} and {running_mlflow_runs(ws)}")


def interrupted_run(ws: Path) -> Outcome:
    """Ctrl-C (SIGINT) while the teacher trains, before its first checkpoint: no promise of a resume."""
    params = params_with(ws, "interrupted", "base:\n  checkpoints_dir: checkpoints-fresh\nteacher:\n"
                         "  model: packaged:all-MiniLM-L6-v2\n  max_length: 32\n  epochs: 4\n  save_steps: 1000\n")
    proc = start_and_wait_for_server(["-m", "flows.teacher", "--params", params], ws, 3,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    started = time.time()
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=120)[0]
    return Outcome("5", "Ctrl-C before the first checkpoint", "python -m flows.teacher (SIGINT)",
                   proc.returncode, message(output), time.time() - started)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, default=None, help="keep the workspace here (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "faults.json")
    parser.add_argument("--markdown", type=Path, default=ROOT / "FAULTS.md")
    parser.add_argument("--only-interrupt", action="store_true",
                        help="rerun the Ctrl-C row alone in --workspace (built before) and update --out")
    args = parser.parse_args(argv)
    if args.only_interrupt:
        rerun_interrupt(args.workspace, args.out, args.markdown)
        return
    ws = args.workspace or Path(tempfile.mkdtemp(prefix="bertshrink-faults-"))
    ws.mkdir(parents=True, exist_ok=True)
    print(f"workspace: {ws}", flush=True)
    build_good_workspace(ws)
    outcomes: list[Outcome] = []

    def check(row: str, what: str, args_: list[str], extra_params: str | None = None, env: dict | None = None,
              setup: Callable[[], None] | None = None, note: Callable[[], str] | None = None,
              expected_change: tuple[str, ...] = ()) -> None:
        if setup:
            setup()
        before = snapshot(ws)
        if extra_params is not None:
            args_ = [*args_, "--params", params_with(ws, str(len(outcomes)), extra_params)]
        code, output, seconds = run(args_, ws, env)
        changed = changes(before, snapshot(ws))
        said = [f"{c} changed, as it should be" for c in changed if c in expected_change]
        outcomes.append(Outcome(row, what, "python " + " ".join(args_), code, message(output), seconds,
                                [c for c in changed if c not in expected_change],
                                "; ".join([*said, note() if note else ""]).strip("; ")))
        print(f"  [{row}] {what}: exit {code} in {seconds:.1f} s; {outcomes[-1].message[:100]}", flush=True)

    files = ws / "inputs"
    for what, (row, name) in data_inputs(files).items():
        usable = row == "9"  # rows dropped and said, the rest prepared: data/prepared is replaced
        check(row, what, ["-m", "flows.prepare"], f"data:\n  source: {files / name}\n",
              expected_change=("data/prepared",) if usable else ())
        if usable:
            run(["-m", "flows.prepare"], ws)  # back to the good data for the rows that follow
    check("3", "GPT-2 folder as teacher.model", ["-m", "flows.pipeline", "--no-dvc-commit"],
          f"teacher:\n  model: {gpt2_folder(ws)}\n")
    check("6", "truncated model.safetensors as teacher.model", ["-m", "flows.teacher"],
          f"teacher:\n  model: {truncated_model(ws)}\n  max_length: 32\n  epochs: 1\n")
    (ws / "models_is_a_file").write_text("not a folder\n")
    check("6", "unwritable models/ (a file where the folder goes)", ["-m", "flows.teacher"],
          "base:\n  models_dir: models_is_a_file/models\n")
    check("8", "hub:glue/sst2 with no network", ["-m", "flows.prepare"], "data:\n  source: hub:glue/sst2\n")
    check("8", "bert-base-uncased with no network", ["-m", "flows.pipeline", "--no-dvc-commit"],
          "teacher:\n  model: bert-base-uncased\n")
    check("9", "distill step key typo (epoch)", ["-m", "flows.pipeline", "--no-dvc-commit"],
          "compress:\n  recipes:\n    d: [{distill: {epoch: 1}}]\n")
    outcomes.append(interrupted_run(ws))
    outcomes.append(killed_run(ws))  # leaves complete checkpoints of its run in checkpoints/teacher
    stale = ws / "models" / ".teacher.killed-save"
    partial = ws / "checkpoints" / "teacher" / "checkpoint-9999"

    def leftovers() -> None:
        """What a kill during the final save and one during a checkpoint save leave."""
        stale.mkdir(parents=True, exist_ok=True)
        (stale / "model.safetensors").write_bytes(b"half")
        partial.mkdir(parents=True, exist_ok=True)
        (partial / "model.safetensors").write_bytes(b"half")

    check("4, 5", "rerun after kills during a checkpoint save and the final save", ["-m", "flows.teacher"],
          KILLED, setup=leftovers, expected_change=("models/teacher",),
          note=lambda: f"stale temp folder removed: {not stale.exists()}; partial checkpoint set aside: "
                       f"{(partial.parent / 'incomplete-checkpoint-9999').exists() or 'incomplete' in log_text(ws)}; "
                       f"resumed from: {resumed_from(ws)}")
    check("2", "retrained teacher, then register without evaluating", ["-m", "flows.register"],
          setup=lambda: run(["-m", "flows.teacher", "--params", params_with(ws, "retrain", "base:\n  seed: 7\n")], ws),
          expected_change=())
    check("2", "... then promote", ["-m", "flows.promote"], expected_change=("registry",),
          note=lambda: "moves @challenger to v1, whose metrics are its own; the retrained, unevaluated "
                       "teacher is not registered")
    write(outcomes, args.out, args.markdown)


def rerun_interrupt(ws: Path, out: Path, markdown: Path) -> None:
    """The Ctrl-C row again, in place, in the workspace of an earlier full run."""
    shutil.rmtree(ws / "checkpoints-fresh", ignore_errors=True)
    fresh = interrupted_run(ws)
    fresh.note = "rerun alone in the same workspace after the full run"
    outcomes = [Outcome(**o) for o in json.loads(out.read_text())]
    outcomes = [fresh if o.input == fresh.input else o for o in outcomes]
    write(outcomes, out, markdown)


def write(outcomes: list[Outcome], out: Path, markdown: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps([asdict(o) for o in outcomes], indent=2))
    lines = ["# Bad inputs and faults: what the user sees (issue 13)", "",
             "Written by `python benchmarks/faults.py` from one run on this machine (each command in a fresh "
             "process, against a good workspace: prepared BBC data, a trained teacher, its metrics, and "
             "`@teacher` in the registry). *Unchanged* compares those byte for byte, and the registry's "
             "aliases and version tags, before and after the command.", "",
             "*s to fail* is the command's wall time: about 8 s of it is Python importing torch, transformers, "
             "Prefect and MLflow, and about 5 s Prefect's temporary server starting (params errors come before "
             "it). Before issue 13, `hub:glue/sst2` offline took 167 s to fail, `bert-base-uncased` 61 s and a "
             "nonexistent path 28 s (retries and HTTP attempts).", "",
             "| row | input | command | exit | message (first line) | s to fail | unchanged | note |",
             "|---|---|---|---|---|---|---|---|"]
    for o in outcomes:
        kept = "all" if not o.changed else "**changed: " + ", ".join(o.changed) + "**"
        text = o.message.replace("|", "\\|")
        lines.append(f"| {o.row} | {o.input} | `{o.command.replace('python -m ', '')}` | {o.exit_code} | {text} | "
                     f"{o.seconds:.1f} | {kept} | {o.note} |")
    markdown.write_text("\n".join(lines) + "\n")
    print(f"wrote {out} and {markdown}")


if __name__ == "__main__":
    main()
