"""Measured scaling of the recipe stage: wall time of the recipes on 1, 2, ... Prefect process workers.

``python benchmarks/fan_out_scaling.py [--params params.yaml] [--recipes a,b] [--workers 1 2] [--out FILE]``
(``make bench-scaling``; README "Recipes on a work pool"). Everything it needs is started here, on free
localhost ports in a temporary folder, and stopped on the way out, on failure and Ctrl-C too:
PostgreSQL and an MLflow tracking server on it (``services/``), a Prefect server with the ``recipe``
deployment on a process pool (``services/prefect_pool.py``).

1. In a submitting folder, the teacher's stages run once (prepare, validate, teacher, evaluate).
2. For each worker count N: the teacher is registered into a registered model of its own
   (``<registry.model_name>-scaling-n<N>``: no recipe finds an earlier result and is skipped);
   N workers start, each on a checkout of its own with ``cores // N`` threads (OMP_NUM_THREADS,
   MKL_NUM_THREADS, ``evaluate.threads``); the pipeline's recipe stage runs on them
   (``benchmarks/fan_out_round.py``); the workers stop.
3. ``--out`` (default bench/results/fan_out_scaling.json) gets the machine, the stage times, each
   round's wall time (first submission to last recipe's end) and each recipe's flow run; the
   Markdown table goes next to it (``.md``) and to stdout.

Run it on an otherwise idle machine: the figures are wall times. A small setting for a check:
``--params configs/tiny.yaml`` (about 10 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from the repository root

from bertshrink.evaluation.machine import machine_info  # noqa: E402
from services.mlflow_server import MlflowServer  # noqa: E402
from services.postgres import Postgres  # noqa: E402
from services.prefect_pool import PrefectPool, free_port  # noqa: E402

TEACHER_STAGES = ("prepare", "validate", "teacher", "evaluate")
ROUND = ROOT / "benchmarks" / "fan_out_round.py"


# ----------------------------------------------------------------------------- facts and params

def machine_facts() -> dict:
    """What the wall times depend on: the evaluation's machine facts (CPU, flags, versions), the cores
    this process may use, the load, the Prefect and MLflow versions, the commit."""
    cores = len(os.sched_getaffinity(0))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return {**machine_info(threads=cores), "cores": cores, "load_average_1_5_15": list(os.getloadavg()),
            "prefect": version("prefect"), "mlflow": version("mlflow"), "git_commit": commit.stdout.strip() or None,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def selected(raw: dict, recipes: list[str] | None) -> dict:
    """``raw`` params with only ``recipes`` (all when None), no search; the baseline kept only if selected."""
    compress = dict(raw.get("compress") or {})
    available = compress.get("recipes") or {}
    unknown = sorted(set(recipes or []) - set(available))
    if unknown:
        raise SystemExit(f"fan_out_scaling: --recipes {', '.join(unknown)} not in the params file's compress.recipes "
                         f"({', '.join(available)}).")
    compress["recipes"] = {name: steps for name, steps in available.items() if recipes is None or name in recipes}
    if compress.get("baseline", "baseline-ort-int8") not in compress["recipes"]:
        compress["baseline"] = None
    return {**raw, "compress": compress, "search": {**(raw.get("search") or {}), "enabled": False}}


def round_params(raw: dict, workers: int, threads: int) -> dict:
    """Params of the round on ``workers`` workers: a registered model of its own, fan-out insisted
    on, ``threads`` timing threads (each worker's share of the cores)."""
    registry = raw.get("registry") or {}
    scale_out = raw.get("scale_out") or {}
    return {**raw,
            "registry": {**registry, "model_name": f"{registry.get('model_name', 'bertshrink-classifier')}-scaling-n{workers}"},
            "evaluate": {**(raw.get("evaluate") or {}), "threads": threads},
            "scale_out": {**scale_out, "mode": "deployment", "concurrency": max(workers, scale_out.get("concurrency", 4))}}


def write_yaml(data: dict, *paths: Path) -> None:
    for path in paths:
        path.write_text(yaml.safe_dump(data, sort_keys=False))


def thread_env(threads: int) -> dict[str, str]:
    """A worker's fair share of the cores: torch's and MKL's intra-op threads (torch reads OMP_NUM_THREADS)."""
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


# ----------------------------------------------------------------------------- services

def start_tracking(home: Path, stack: ExitStack) -> str:
    """A throwaway PostgreSQL and an MLflow server on it (proxied artifacts in ``home``); returns its URI."""
    pg = Postgres(home, free_port())
    stack.callback(pg.stop)
    pg.init(secrets.token_urlsafe(16), fast=True)   # nothing in it must outlive the benchmark
    pg.start()
    pg.create_database("mlflow")
    server = MlflowServer(home / "mlflow", free_port())
    stack.callback(server.stop)
    server.start(pg.url("mlflow"), str(home / "artifacts"), {**os.environ, **pg.client_env()}, timeout_s=900)
    return server.uri


def wait_for_workers(pool: PrefectPool, names: list[str], timeout_s: float = 600) -> None:
    """Until every worker in ``names`` has polled the pool (ONLINE): their start-up is not measured."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for name, (process, _) in pool.workers.items():
            if process.poll() is not None:
                raise RuntimeError(f"worker {name} exited with {process.returncode}; see {pool.home / name}.log")
        try:
            found = httpx.post(f"{pool.api}/work_pools/{pool.pool}/workers/filter", json={}, timeout=10).json()
            online = {w["name"] for w in found if w.get("status") == "ONLINE"}
        except (httpx.HTTPError, ValueError):
            online = set()
        if set(names) <= online:
            return
        time.sleep(1)
    raise RuntimeError(f"workers {', '.join(names)} did not come online in {timeout_s:.0f} s")


# ----------------------------------------------------------------------------- the stages

def run_logged(command: list[str], cwd: Path, env: dict, log: Path) -> float:
    """Run ``command``, its output to ``log``; returns its wall seconds, or raises with the log's tail."""
    started = time.monotonic()
    with open(log, "w") as out:
        done = subprocess.run(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"{' '.join(command)} failed (exit {done.returncode}); {log}:\n{tail}")
    return time.monotonic() - started


def stage(name: str, params_file: str) -> list[str]:
    return [sys.executable, "-m", f"flows.{name}", "--params", params_file]


def train_teacher(submitter: Path, env: dict, params_file: str) -> dict[str, float]:
    """The teacher's stages, once, in the submitting folder; seconds per stage."""
    return {name: round(run_logged(stage(name, params_file), submitter, env, submitter / f"{name}.log"), 1)
            for name in TEACHER_STAGES}


def run_round(pool: PrefectPool, submitter: Path, env: dict, raw: dict, workers: int, cores: int) -> dict:
    """The recipes on ``workers`` fresh workers: register the teacher for this round, start the workers,
    run the recipe stage, note which worker ran what, stop the workers."""
    threads = max(1, cores // workers)
    params_file = f"scaling-n{workers}.yaml"
    params = round_params(raw, workers, threads)
    write_yaml(params, submitter / params_file)
    register_seconds = run_logged(stage("register", params_file), submitter, env, submitter / f"register-n{workers}.log")
    names = [f"n{workers}-w{i}" for i in range(1, workers + 1)]
    try:
        checkouts = {name: pool.start_worker(name, thread_env(threads)) for name in names}
        write_yaml(params, *(home / params_file for home in checkouts.values()))
        wait_for_workers(pool, names)
        out = submitter / f"round-n{workers}.json"
        run_logged([sys.executable, str(ROUND), params_file, str(out)], submitter, env,
                   submitter / f"round-n{workers}.log")
        measured = json.loads(out.read_text())
    finally:
        pool.stop_workers()
    ran_on = {recipe.name: name for name, home in checkouts.items()
              for recipe in (home / "models" / "candidates").glob("*")}
    for run in measured["runs"]:
        run["worker"] = ran_on.get(run["recipe"])
    return {"workers": workers, "threads_per_worker": threads, "worker_env": thread_env(threads),
            "evaluate_threads": threads, "concurrency": params["scale_out"]["concurrency"],
            "register_teacher_seconds": round(register_seconds, 1), **measured}


# ----------------------------------------------------------------------------- the write-up

def _minutes(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds / 60:.1f}"


def markdown(result: dict) -> str:
    """The rounds side by side, then each recipe's run time per round."""
    m, rounds = result["machine"], result["rounds"]
    base = rounds[0]["wall_seconds"] if rounds else None
    lines = [f"Recipes on Prefect process workers ({len(result['recipes'])} recipes of `{result['params']}`; "
             f"{m['cpu_model']}, {m['cores']} cores; commit {m['git_commit']}, {m['date']}). Teacher stages "
             f"{_minutes(sum(result['teacher_stages_seconds'].values()))} min, once, not in the figures below.", "",
             "| workers | threads each | recipes wall (min) | speed-up | sum of recipe run times (min) | failed |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rounds:
        total = sum(run["run_seconds"] for run in r["runs"])
        speedup = f"{base / r['wall_seconds']:.2f}x" if base and r["wall_seconds"] else "n/a"
        lines.append(f"| {r['workers']} | {r['threads_per_worker']} | {_minutes(r['wall_seconds'])} | {speedup} | "
                     f"{_minutes(total)} | {', '.join(r['failed']) or 'none'} |")
    lines += ["", "| recipe | " + " | ".join(f"run on {r['workers']} (min, worker)" for r in rounds) + " |",
              "| --- |" + " --- |" * len(rounds)]
    for recipe in result["recipes"]:
        cells = []
        for r in rounds:
            run = next((x for x in r["runs"] if x["recipe"] == recipe), None)
            cells.append(f"{_minutes(run['run_seconds'])} ({run['worker']})" if run else "n/a")
        lines.append(f"| {recipe} | " + " | ".join(cells) + " |")
    lines += ["", "Wall: the first recipe's submission to the last recipe's end (Prefect's flow-run times), "
              "teacher fetch, compression, evaluation and registration on the workers included; each worker "
              "runs one flow run at a time with cores / N threads."]
    return "\n".join(lines)


def write_results(result: dict, out: Path) -> str:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    out.with_suffix(".md").write_text(table + "\n")
    return table


# ----------------------------------------------------------------------------- main

def measure(args: argparse.Namespace, home: Path, stack: ExitStack) -> dict:
    raw = selected(yaml.safe_load(args.params.read_text()), args.recipes)
    result = {"params": str(args.params), "recipes": list(raw["compress"]["recipes"]), "machine": machine_facts(),
              "workers": args.workers}
    tracking_uri = start_tracking(home, stack)
    pool = PrefectPool(home / "prefect", tracking_uri, ROOT)
    stack.callback(pool.stop)
    pool.start()
    submitter = home / "submitter"
    submitter.mkdir()
    write_yaml({**raw, "scale_out": {**(raw.get("scale_out") or {}), "mode": "local"}}, submitter / "scaling-base.yaml")
    env = {**pool.env, "PYTHONPATH": str(ROOT)}  # the submitting folder runs this checkout's code
    result["teacher_stages_seconds"] = train_teacher(submitter, env, "scaling-base.yaml")
    result["rounds"] = [run_round(pool, submitter, env, raw, n, result["machine"]["cores"]) for n in args.workers]
    return result


def _stop_on_sigterm(signum, frame) -> None:
    raise KeyboardInterrupt  # unwinds through the ExitStack, which stops what was started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml", help="pipeline params (default: params.yaml)")
    parser.add_argument("--recipes", type=lambda s: [r for r in s.split(",") if r], default=None,
                        help="comma-separated subset of the params file's recipes (default: all)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts, one round each")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fan_out_scaling.json")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, stores) afterwards")
    args = parser.parse_args(argv)
    if any(n < 1 for n in args.workers):
        parser.error("--workers: each count must be at least 1")
    args.params = args.params.resolve()
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    home = Path(tempfile.mkdtemp(prefix="bertshrink-scaling-"))  # under /tmp: as root, PostgreSQL's user must reach it
    started, ok = time.monotonic(), False
    try:
        with ExitStack() as stack:
            print(f"fan_out_scaling: working in {home} (logs: submitter/*.log, prefect/*.log)", flush=True)
            result = measure(args, home, stack)
        result["benchmark_seconds"] = round(time.monotonic() - started, 1)
        print(write_results(result, args.out))
        print(f"\nfan_out_scaling: wrote {args.out} and {args.out.with_suffix('.md')}")
        ok = True
    finally:
        if ok and not args.keep:
            shutil.rmtree(home, ignore_errors=True)
        else:
            print(f"fan_out_scaling: kept {home}", file=sys.stderr)
    failed = [r["workers"] for r in result["rounds"] if r["failed"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
