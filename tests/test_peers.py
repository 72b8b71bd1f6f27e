"""Peer tools (benchmarks/peers.py): finding their folders, labelling their rows, never promoting them,
and (slow, when its venv exists) Optimum's own recipe on a tiny BERT, opened and run by our runner."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bertshrink.compression.peers import write_peer_folder
from bertshrink.modelfolder.peers import current_peers, peer_folders
from bertshrink.config.artifacts import Artifacts
from bertshrink.config.params import Params
from bertshrink.errors import ParamsError
from bertshrink.modelfolder.files import CONFIG_FILE
from bertshrink.modelfolder.meta import ModelMeta, read_meta, write_folder
from bertshrink.modelfolder.runners import open_model
from bertshrink.modelfolder.size import content_fingerprint
from bertshrink.selection.report import markdown_table, peer_label, report_rows
from conftest import build_tiny_bert, toy_corpus
from flows.compare import models_to_compare
from flows.promote import promotion_names

ROOT = Path(__file__).resolve().parent.parent
OPTIMUM_PYTHON = ROOT / "bench" / ".venvs" / "optimum" / "bin" / "python"


def _peers_script():
    """benchmarks/peers.py, loaded by path (benchmarks/peers/ holds the peer scripts themselves)."""
    if "peers_benchmark" not in sys.modules:
        spec = importlib.util.spec_from_file_location("peers_benchmark", ROOT / "benchmarks" / "peers.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclass looks its module up there
        spec.loader.exec_module(module)
    return sys.modules["peers_benchmark"]


def _folder(path: Path, **meta) -> Path:
    """A minimal model folder (a config and our metadata) written through the model-folder API."""
    def fill(tmp: Path) -> ModelMeta:
        (tmp / CONFIG_FILE).write_text("{}")
        return ModelMeta(**meta)
    return write_folder(path, fill)


def _params(tmp_path: Path, recipes: dict | None = None) -> Params:
    return Params.model_validate({"base": {"models_dir": str(tmp_path / "models")},
                                  "compress": {"recipes": recipes or {"int8": ["export_onnx"]}}})


# --------------------------------------------------------------------------- finding peer folders


def test_current_peers_are_the_peer_folders_of_this_teacher(tmp_path):
    teacher = build_tiny_bert(tmp_path / "models" / "teacher", 2)
    root = tmp_path / "models" / "peers"
    _folder(root / "optimum-ort-int8", kind="peer", format="onnx",
            peer={"tool": "optimum-onnx", "teacher_fingerprint": content_fingerprint(teacher)})
    _folder(root / "olive-search", kind="peer", format="onnx", peer={"tool": "olive-ai", "teacher_fingerprint": "old"})
    _folder(root / "not-a-peer", kind="candidate", format="onnx")
    (root / ".optimum-ort-int8.tmp123").mkdir()  # what a killed write leaves
    assert [p.name for p in peer_folders(root)] == ["olive-search", "optimum-ort-int8"]
    current, skipped = current_peers(root, teacher)
    assert [p.name for p in current] == ["optimum-ort-int8"]
    assert list(skipped) == ["olive-search"] and "another teacher" in skipped["olive-search"]
    assert current_peers(tmp_path / "nowhere", teacher) == ([], {})


def test_peers_join_the_comparison_only_when_asked_and_never_the_promotion(tmp_path):
    params = _params(tmp_path)
    paths = Artifacts(params.base)
    teacher = build_tiny_bert(paths.teacher, 2)
    _folder(paths.candidate("int8"), kind="candidate", format="onnx")
    _folder(paths.peer("optimum-ort-int8"), kind="peer", format="onnx",
            peer={"teacher_fingerprint": content_fingerprint(teacher)})
    plain = models_to_compare(params.model_copy(update={"floor": params.floor.model_copy(update={"enabled": False})}))
    assert [Path(d).name for d in plain] == ["teacher", "int8"]
    with_peers = models_to_compare(params.model_copy(update={"floor": params.floor.model_copy(update={"enabled": False})}),
                                   with_peers=True)
    assert [Path(d).name for d in with_peers] == ["teacher", "int8", "optimum-ort-int8"]
    assert "optimum-ort-int8" not in promotion_names(params)


def test_peer_names_must_not_clash_with_recipes(tmp_path):
    peers = _peers_script()
    assert [p.name for p in peers.chosen_peers(None, _params(tmp_path))] == ["optimum-ort-int8", "olive-search"]
    assert [p.name for p in peers.chosen_peers(["olive-search"], _params(tmp_path))] == ["olive-search"]
    with pytest.raises(ParamsError, match="unknown peer"):
        peers.chosen_peers(["intel-inc"], _params(tmp_path))
    with pytest.raises(ParamsError, match="named like a peer"):
        peers.chosen_peers(None, _params(tmp_path, {"optimum-ort-int8": ["export_onnx"]}))


def test_a_venv_is_reused_only_when_installed_with_the_same_pins(tmp_path):
    peers = _peers_script()
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")
    pins = ("torch==2.13.0", "optimum-onnx==0.1.0")
    assert not peers.venv_is_ready(venv, pins)  # no stamp: an interrupted install
    (venv / ".peer-requirements").write_text("\n".join(pins))
    assert peers.venv_is_ready(venv, pins)
    assert not peers.venv_is_ready(venv, (*pins[:1], "optimum-onnx==0.2.0"))


def test_olive_is_given_our_validation_split_and_accuracy_bar(tmp_path):
    peers = _peers_script()
    optimum, olive = peers.PEERS
    args = dict(python=Path("py"), teacher=tmp_path, work=tmp_path / "w", validation=tmp_path / "v.jsonl",
                min_retention=0.98)
    assert "--validation" not in optimum.command(**args)
    command = olive.command(**args)
    assert command[command.index("--min-retention") + 1] == "0.98"
    assert command[command.index("--validation") + 1] == str(tmp_path / "v.jsonl")
    assert all(peer.requirements[0] == "torch==2.13.0" for peer in peers.PEERS)


# --------------------------------------------------------------------------- report rows


def _result(name, peer=None):
    return {"model": name, "format": "onnx dynamic", "metrics": {"test": {"accuracy": 0.9, "macro_f1": 0.9}},
            "size": {"total_bytes": 1e6}, "parameters": 1e6, "latency": {"batch_1": {"p50_ms": 1.0}},
            **({"peer": peer} if peer else {})}


def test_peer_rows_are_labelled_with_their_tool_and_sit_beside_the_baseline():
    optimum = {"tool": "optimum-onnx", "versions": {"optimum-onnx": "0.1.0", "transformers": "4.57.6",
                                                    "onnxruntime": "1.23.2", "torch": "2.13.0+cpu"}}
    olive = {"tool": "olive-ai", "versions": {"olive-ai": "0.13.0"}, "fallback": "non-search quantization pass"}
    assert peer_label(optimum) == "peer: optimum-onnx 0.1.0 (transformers 4.57.6, onnxruntime 1.23.2)"
    assert peer_label(olive) == "peer: olive-ai 0.13.0; non-search quantization pass"
    assert peer_label(None) == ""
    results = [_result("tiny"), _result("floor"), _result("olive-search", olive), _result("baseline-ort-int8"),
               _result("teacher"), _result("optimum-ort-int8", optimum)]
    rows = report_rows(results, None, "baseline-ort-int8")
    assert [(r["model"], r["role"]) for r in rows] == [
        ("teacher", "teacher"), ("baseline-ort-int8", "baseline"), ("olive-search", "peer"),
        ("optimum-ort-int8", "peer"), ("floor", "floor"), ("tiny", "candidate")]
    table = markdown_table(rows).splitlines()
    assert table[4].startswith("| olive-search | peer: olive-ai 0.13.0; non-search quantization pass | onnx dynamic |")
    assert table[3].startswith("| baseline-ort-int8 | baseline |")


# --------------------------------------------------------------------------- Optimum, for real


@pytest.mark.slow
def test_optimum_peer_script_makes_a_folder_our_runner_opens(tmp_path):
    if not OPTIMUM_PYTHON.is_file():
        pytest.skip(f"no Optimum venv at {OPTIMUM_PYTHON.parent.parent}: `python benchmarks/peers.py "
                    "--peer optimum-ort-int8` makes it (minutes; CI does not)")
    teacher = build_tiny_bert(tmp_path / "teacher", 2, meta={"kind": "teacher", "label_names": ["a", "b"],
                                                             "max_length": 32})
    work = tmp_path / "work"
    done = subprocess.run([str(OPTIMUM_PYTHON), str(ROOT / "benchmarks" / "peers" / "optimum_int8.py"),
                           "--teacher", str(teacher), "--out", str(work)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads((work / "peer.json").read_text())
    assert record["tool"] == "optimum-onnx" and record["versions"]["transformers"].startswith("4.")
    assert record["quantization_config"]["per_channel"] is True and record["search"] is False
    folder = write_peer_folder(work / "model.onnx", teacher, tmp_path / "peers" / "optimum-ort-int8", record)
    meta = read_meta(folder)
    assert meta.kind == "peer" and meta.format_label == "onnx dynamic"
    assert meta.peer["teacher_fingerprint"] == content_fingerprint(teacher)
    assert meta.quantization["op_counts"].get("DynamicQuantizeLinear", 0) > 0
    texts = toy_corpus(4)["text"].tolist()
    ours, theirs = open_model(teacher), open_model(folder)
    assert theirs.predict(texts, 4, 32).shape == (len(texts),)
    # int8 of a random tiny model: close to the fp32 teacher's logits, not equal
    np.testing.assert_allclose(theirs.logits(texts, 4, 32), ours.logits(texts, 4, 32), atol=0.1)
