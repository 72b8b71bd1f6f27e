"""Peer tools on our teacher, by their own code in their own venvs -> ``models/.../peers/<name>/`` (make bench).

Each peer (Optimum's export + ``ORTQuantizer``; Olive's search) pins other transformers versions than
ours, so it runs in a venv of its own under ``bench/.venvs/<venv>`` (made here when missing, with the
CPU torch wheel pinned), as a standalone script of ``benchmarks/peers/`` that imports nothing from
bertshrink. Its graph then becomes one of our model folders (``bertshrink.compression.peers``), and
``python -m flows.evaluate --model-dir`` measures it with our code. A peer that fails does not stop
the others; what each did, its tool versions and its failure go to ``reports/.../peers/summary.json``.

    python benchmarks/peers.py --params configs/sst2.yaml [--peer optimum-ort-int8] [--no-evaluate]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from the repository root

from bertshrink.compression.peers import write_peer_folder  # noqa: E402
from bertshrink.config.artifacts import Artifacts  # noqa: E402
from bertshrink.config.params import Params, load_params  # noqa: E402
from bertshrink.config.recipes import SELECTION_SPLIT  # noqa: E402
from bertshrink.data.prepare import load_prepared  # noqa: E402
from bertshrink.errors import BertshrinkError, ParamsError  # noqa: E402
from bertshrink.modelfolder.files import CONFIG_FILE  # noqa: E402

VENVS = ROOT / "bench" / ".venvs"
SCRIPTS = ROOT / "benchmarks" / "peers"
# Exactly this pin: its CPU wheel is on disk; a looser one downloads GBs of CUDA packages.
TORCH_PIN = "torch==2.13.0"
PEER_TIMEOUT_S = 3 * 3600


@dataclass(frozen=True)
class Peer:
    """A peer tool: its folder name, its venv and what goes in it, and its script."""

    name: str
    venv: str
    requirements: tuple[str, ...]
    script: str

    def command(self, python: Path, teacher: Path, work: Path, validation: Path, min_retention: float) -> list[str]:
        args = [str(python), str(SCRIPTS / self.script), "--teacher", str(teacher.resolve()), "--out", str(work)]
        if self.venv == "olive":  # the search's goal: our accuracy bar, on our validation split
            args += ["--validation", str(validation), "--min-retention", str(min_retention)]
        return args


# Pinned to what resolved when this was written (transformers < 4.58 for optimum-onnx), so reruns compare the
# same tools; the onnxruntime pin is ours too, so both quantize with the same library as our recipes.
PEERS = (
    Peer("optimum-ort-int8", "optimum",
         (TORCH_PIN, "optimum-onnx==0.1.0", "optimum==2.1.0", "transformers==4.57.6", "onnxruntime==1.32.0"),
         "optimum_int8.py"),
    Peer("olive-search", "olive",
         (TORCH_PIN, "olive-ai==0.13.0", "transformers==4.57.6", "onnxruntime==1.32.0", "optuna==5.0.0"),
         "olive_search.py"),
)


class PeerSetupError(BertshrinkError):
    """A peer's venv could not be made (pip failed); the log says why."""


# --------------------------------------------------------------------------- venvs


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def venv_is_ready(venv: Path, requirements: tuple[str, ...]) -> bool:
    """True when the venv exists and was installed with exactly ``requirements`` (its stamp says so)."""
    stamp = venv / ".peer-requirements"
    return venv_python(venv).is_file() and stamp.is_file() and stamp.read_text() == "\n".join(requirements)


def base_python() -> str:
    """python3.11 (the peers' wheels are built for it), else the interpreter running this."""
    return shutil.which("python3.11") or sys.executable


def ensure_venv(peer: Peer, log: Path) -> Path:
    """The peer's venv python, made and installed first when missing or when its pins changed."""
    venv = VENVS / peer.venv
    if venv_is_ready(venv, peer.requirements):
        return venv_python(venv)
    print(f"bertshrink: peers: installing {' '.join(peer.requirements)} into {venv} (minutes, once)", flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        # pip install into an existing venv moves it to changed pins without reinstalling the rest
        steps = ([] if venv_python(venv).is_file() else [[base_python(), "-m", "venv", str(venv)]])
        steps.append([str(venv_python(venv)), "-m", "pip", "install", *peer.requirements])
        for step in steps:
            out.write(f"$ {' '.join(step)}\n")
            out.flush()
            if subprocess.run(step, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                raise PeerSetupError(
                    f"could not set up {venv} for {peer.name}: `{' '.join(step)}` failed; the pip output is in "
                    f"{log}. Fix what it names (a pin no longer on the package index, no network), or delete "
                    f"{venv} and rerun.")
    (venv / ".peer-requirements").write_text("\n".join(peer.requirements))
    return venv_python(venv)


# --------------------------------------------------------------------------- one peer


def write_validation(params: Params, work: Path) -> Path:
    """Our validation split as JSON lines (text, label): what Olive's search is scored on."""
    split = load_prepared(Artifacts(params.base).prepared).splits[SELECTION_SPLIT]
    path = work / "validation.jsonl"
    with path.open("w") as out:
        for text, label in zip(split["text"].astype(str), split["label"].astype(int)):
            out.write(json.dumps({"text": text, "label": int(label)}) + "\n")
    return path


def run_peer(peer: Peer, params: Params) -> dict:
    """Set up, run and fold in one peer; returns its summary entry (``status`` ok or failed)."""
    paths = Artifacts(params.base)
    log = paths.peer_log(peer.name)
    # Absolute: the peer runs with its work folder as cwd, so a relative path would nest in itself.
    work = paths.checkpoints("peers", peer.name).resolve()
    started = time.perf_counter()
    entry = {"name": peer.name, "venv": str(VENVS / peer.venv), "requirements": list(peer.requirements),
             "log": str(log), "folder": str(paths.peer(peer.name))}
    try:
        python = ensure_venv(peer, paths.peer_log(f"{peer.venv}-pip"))
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        command = peer.command(python, paths.teacher.resolve(), work, write_validation(params, work),
                               params.registry.min_retention)
        with log.open("w") as out:
            out.write(f"$ {' '.join(command)}\n")
            out.flush()
            code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=work,
                                  timeout=PEER_TIMEOUT_S).returncode
        if code != 0:
            raise RuntimeError(f"{peer.script} exited {code}; its output is in {log}")
        record = json.loads((work / "peer.json").read_text())
        write_peer_folder(work / "model.onnx", paths.teacher, paths.peer(peer.name), record)
        entry.update(status="ok", tool=record.get("tool"), versions=record.get("versions"),
                     recipe=record.get("recipe"), search=record.get("search"), fallback=record.get("fallback"),
                     peer_seconds=record.get("seconds"))
    except (BertshrinkError, RuntimeError, OSError, subprocess.TimeoutExpired, json.JSONDecodeError) as err:
        entry.update(status="failed", error=f"{type(err).__name__}: {err}")
        print(f"bertshrink: peer {peer.name} failed: {err}", file=sys.stderr, flush=True)
    entry["seconds"] = round(time.perf_counter() - started, 1)
    return entry


def evaluate_peers(params_file: str, folders: list[str]) -> int:
    """Our evaluate stage on the peers' folders: accuracy on the same splits, by the same code."""
    if not folders:
        return 0
    command = [sys.executable, "-m", "flows.evaluate", "--params", params_file]
    for folder in folders:
        command += ["--model-dir", folder]
    return subprocess.run(command, cwd=ROOT).returncode


def chosen_peers(names: list[str] | None, params: Params) -> list[Peer]:
    """The peers asked for (default: all); a peer named like one of our recipes would overwrite its metrics."""
    known = {p.name: p for p in PEERS}
    unknown = [n for n in names or [] if n not in known]
    if unknown:
        raise ParamsError(f"unknown peer(s) {unknown}; benchmarks/peers.py knows: {', '.join(known)}")
    clash = [n for n in known if n in params.compress.recipes]
    if clash:
        raise ParamsError(f"compress.recipes has recipe(s) named like a peer ({clash}); rename the recipe: "
                          "peers and recipes share the metrics folder")
    return [known[n] for n in names] if names else list(PEERS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="configs/sst2.yaml")
    parser.add_argument("--peer", dest="peers", action="append", default=None,
                        help=f"peer to run (repeatable; default: all of {', '.join(p.name for p in PEERS)})")
    parser.add_argument("--no-evaluate", action="store_true", help="make the folders only")
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
        peers = chosen_peers(args.peers, params)
    except BertshrinkError as err:
        print(f"bertshrink: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    paths = Artifacts(params.base)
    if not (paths.teacher / CONFIG_FILE).is_file():
        print(f"bertshrink: no teacher at {paths.teacher}: run the pipeline on {args.params} first.", file=sys.stderr)
        return 2
    entries = [run_peer(peer, params) for peer in peers]
    done = [e["folder"] for e in entries if e["status"] == "ok"]
    evaluated = 0 if args.no_evaluate else evaluate_peers(args.params, done)
    summary = {"params_file": args.params, "teacher": str(paths.teacher), "peers": entries,
               "evaluated": None if args.no_evaluate else evaluated == 0}
    paths.peers_summary.parent.mkdir(parents=True, exist_ok=True)
    paths.peers_summary.write_text(json.dumps(summary, indent=2))
    for e in entries:
        print(f"bertshrink: peer {e['name']}: {e['status']} in {e['seconds']} s"
              + (f" ({e['error']})" if e["status"] != "ok" else ""))
    return 0 if all(e["status"] == "ok" for e in entries) and evaluated == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
