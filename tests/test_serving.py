"""Registered versions serve text through a real ``mlflow models serve`` on localhost: a PyTorch
(head-pruned) version and an ONNX version answer ``{"inputs": [texts]}`` with label and score, and
bad requests get a 4xx with a readable message (issue 14, item 5)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from bertshrink.compression import prune
from bertshrink.compression.onnx_export import export_onnx
from bertshrink.modelfolder.load import load_classifier, load_tokenizer
from bertshrink.modelfolder.meta import ModelMeta, save_model_folder
from conftest import build_tiny_bert, toy_corpus
from tracking.pyfunc_model import MAX_TEXT_CHARS, texts_of

LABELS = ["film", "money", "sport"]
SHAPE = {"hidden": 64, "heads": 4, "intermediate": 128}


@pytest.mark.parametrize("request_input, fragment", [
    ([], "No texts to classify"),
    (pd.DataFrame({"text": []}), "No texts to classify"),
    (["fine", 3], "inputs[1] is of type int, not a string"),
    (["x" * (MAX_TEXT_CHARS + 1)], f"inputs[0] has {MAX_TEXT_CHARS + 1:,} characters"),
])
def test_bad_requests_are_refused_with_a_readable_message(request_input, fragment):
    with pytest.raises(MlflowException, match=fragment.replace("[", r"\[").replace("]", r"\]")) as err:
        texts_of(request_input)
    assert err.value.get_http_status_code() == 400


def test_texts_come_from_a_list_or_a_text_column():
    assert texts_of(["a", "b"]) == ["a", "b"]
    assert texts_of(pd.DataFrame({"other": [1], "text": ["t"]})) == ["t"]
    assert texts_of(pd.DataFrame({0: ["only column"]})) == ["only column"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(port: int, body: bytes) -> tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def _wait_until_up(port: int, server: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"mlflow models serve exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError("mlflow models serve did not answer /ping in time")


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A head-pruned PyTorch version and an ONNX version, registered as the register stage does."""
    import mlflow

    from bertshrink.config.params import RegistryParams
    from tracking.registry import log_model_version
    from tracking.runs import configure_tracking

    root = tmp_path_factory.mktemp("serving")
    # configure_tracking, as the stages do: the environment and MLflow's process-wide URI (which
    # an earlier test may have pointed elsewhere) both name this store
    previous = (os.environ.get("MLFLOW_TRACKING_URI"), mlflow.get_tracking_uri())
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    meta = {"kind": "candidate", "recipe": "r", "label_names": LABELS, "max_length": 32}
    teacher = build_tiny_bert(root / "teacher", num_labels=3, meta=meta, **SHAPE)
    pruned_model = load_classifier(teacher)
    prune.prune_heads(pruned_model, {0: [0, 1]})
    pruned = save_model_folder(pruned_model, load_tokenizer(teacher), ModelMeta(**meta), root / "heads")
    onnx_dir = root / "onnx-int8"
    export_onnx(teacher, onnx_dir, toy_corpus(10)["text"].tolist(), 32)
    registry = RegistryParams(experiment="serving", model_name="served")
    mlflow.set_experiment(experiment_id=configure_tracking(registry))
    uris = {}
    for name, folder in (("pytorch", pruned), ("onnx", onnx_dir)):
        run = mlflow.start_run()
        mlflow.end_run()
        from bertshrink.modelfolder.meta import read_meta

        info, flavour = log_model_version(str(folder), read_meta(folder), {}, registry, run.info.run_id)
        assert flavour == "pyfunc"
        uris[name] = info.model_uri
    yield root, uris
    if previous[0] is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = previous[0]
    mlflow.set_tracking_uri(previous[1])


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.parametrize("kind", ["pytorch", "onnx"])
def test_a_registered_version_serves_text_over_http(registered, kind):
    root, uris = registered
    port = _free_port()
    # the server runs `uvicorn` from PATH: this interpreter's scripts first, as in an activated venv
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", uris[kind], "--env-manager",
                               "local", "--host", "127.0.0.1", "--port", str(port)], cwd=root, env=env,
                              stdout=(root / f"serve-{kind}.log").open("w"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        _wait_until_up(port, server, root / f"serve-{kind}.log")
        status, body = _post(port, json.dumps({"inputs": ["goal match team", "market stock price bank"]}).encode())
        assert status == 200, body
        predictions = json.loads(body)["predictions"]
        assert len(predictions) == 2 and all(p["label"] in LABELS and 0 < p["score"] <= 1 for p in predictions)
        # refused by MLflow's schema check (the signature: one or more strings) or by ours
        for bad, fragments in ((json.dumps({"inputs": []}), ("missing inputs", "No texts to classify")),
                               (json.dumps({"inputs": [1, 2]}), ("string",)),
                               (json.dumps({"inputs": ["x" * 1_000_000]}), ("1,000,000 characters; at most",)),
                               ("{}", ("inputs",))):
            status, body = _post(port, bad.encode())
            assert 400 <= status < 500, (bad[:40], status, body[:500])
            message = json.loads(body)["message"]
            assert any(f in message for f in fragments) and "Traceback" not in body, message[:500]
            print(f"{kind} {bad[:30]!r} -> {status}: {message[:160]}")
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)


def test_a_file_is_streamed_in_batches_of_the_asked_size(tmp_path):
    from bertshrink.data.stream import count_rows, text_batches

    frame = pd.DataFrame({"id": range(100), "text": [f"text {i}" for i in range(100)]})
    for suffix, write in ((".csv", lambda p: frame.to_csv(p, index=False)),
                          (".tsv", lambda p: frame.to_csv(p, sep="\t", index=False)),
                          (".jsonl", lambda p: frame.to_json(p, orient="records", lines=True)),
                          (".parquet", lambda p: frame.to_parquet(p, index=False))):
        path = tmp_path / f"texts{suffix}"
        write(path)
        sizes = [len(batch) for batch in text_batches(path, "text", 16)]
        assert sizes == [16] * 6 + [4] and count_rows(path) == 100, suffix
    with pytest.raises(Exception, match=r"has no column 'sentence'; it has \['id', 'text'\]"):
        next(text_batches(tmp_path / "texts.csv", "sentence", 16))


@pytest.mark.slow
def test_batch_scoring_labels_every_row_as_the_model_does_and_keeps_an_old_output_on_failure(registered, tmp_path):
    from bertshrink.errors import DataSourceError
    from bertshrink.modelfolder.runners import open_model
    from flows.predict import score_file
    from tracking.serving import load_registered

    root, uris = registered
    texts = toy_corpus(40)["text"].tolist()
    source, output = tmp_path / "in.csv", tmp_path / "out.csv"
    pd.DataFrame({"id": range(len(texts)), "text": texts}).to_csv(source, index=False)
    assert score_file(load_registered(uris["onnx"]), source, "text", output, batch_size=16) == len(texts)
    scored = pd.read_csv(output)
    assert list(scored.columns) == ["id", "text", "label", "score"] and scored["id"].tolist() == list(range(len(texts)))
    expected = open_model(root / "onnx-int8").predict(texts, 16, 32)
    assert scored["label"].tolist() == [LABELS[i] for i in expected]
    before = output.read_bytes()
    with pytest.raises(DataSourceError, match="has no column 'sentence'"):
        score_file(load_registered(uris["onnx"]), source, "sentence", output, batch_size=16)
    assert output.read_bytes() == before and not list(tmp_path.glob(".out.csv.partial"))
