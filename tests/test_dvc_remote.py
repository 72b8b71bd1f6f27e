"""The DVC remote (README "Scaling out"): the prepared data and the teacher go up with ``dvc push``
and come back byte for byte with ``dvc pull``, in the same repository with its cache gone and on a
fresh git clone (a worker). The real ``dvc`` CLI on a local-folder remote; S3 is the same with dvc-s3."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bertshrink.data.prepare import load_prepared, write_prepared
from bertshrink.modelfolder.size import content_fingerprint
from conftest import build_tiny_bert
from flows.pipeline import record_in_dvc

ROOT = Path(__file__).resolve().parent.parent
PREPARED, TEACHER = Path("data/prepared"), Path("models/teacher")
SHARED_STAGES = ("prepare", "teacher")   # what a worker pulls (README: `dvc pull prepare teacher`)


def shared_stages_dvc_yaml() -> dict:
    """The project's prepare and teacher stages with their real ``outs``; deps and params are left
    out, since this repository holds no code to hash (the teacher still depends on the data)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    minimal = {name: {"cmd": stages[name]["cmd"], "outs": stages[name]["outs"]} for name in SHARED_STAGES}
    minimal["teacher"]["deps"] = [str(PREPARED)]
    return {"stages": minimal}


def run(args: list[str], cwd: Path) -> str:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{' '.join(args)} failed in {cwd}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def dvc(*args: str, cwd: Path) -> str:
    return run([sys.executable, "-m", "dvc", *args], cwd)


def git(*args: str, cwd: Path) -> str:
    return run(["git", "-c", "user.name=bertshrink-test", "-c", "user.email=test@localhost", *args], cwd)


def file_digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``, by relative path: equal dicts mean byte-identical trees."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def dvc_isolated(tmp_path, monkeypatch):
    """DVC's global, system and site-cache folders in ``tmp_path``: no user config (a cache elsewhere,
    another default remote) leaks in, nothing is left in /var/tmp/dvc."""
    for var, folder in (("DVC_GLOBAL_CONFIG_DIR", "dvc-global"), ("DVC_SYSTEM_CONFIG_DIR", "dvc-system"),
                        ("DVC_SITE_CACHE_DIR", "dvc-site-cache")):
        monkeypatch.setenv(var, str(tmp_path / folder))
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    return tmp_path


@pytest.fixture
def pipeline_repo(dvc_isolated, prepared, monkeypatch):
    """A git + DVC repository whose prepare and teacher outputs exist and are committed to the DVC
    cache the way the pipeline does it (``flows.pipeline.record_in_dvc``)."""
    repo = dvc_isolated / "repo"
    repo.mkdir()
    git("init", "--quiet", cwd=repo)
    dvc("init", "--quiet", cwd=repo)
    (repo / "dvc.yaml").write_text(yaml.safe_dump(shared_stages_dvc_yaml(), sort_keys=False))
    write_prepared(prepared, repo / PREPARED)
    build_tiny_bert(repo / TEACHER, num_labels=len(prepared.label_names),
                    meta={"kind": "teacher", "label_names": prepared.label_names, "max_length": 32})
    monkeypatch.chdir(repo)
    record_in_dvc(list(SHARED_STAGES))
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert {out["path"] for stage in SHARED_STAGES for out in lock[stage]["outs"]} == {str(PREPARED), str(TEACHER)}
    return repo


@pytest.mark.slow
def test_push_then_pull_brings_back_the_prepared_data_and_the_teacher_byte_for_byte(pipeline_repo, prepared):
    repo, remote = pipeline_repo, pipeline_repo.parent / "remote"
    before = {out: file_digests(repo / out) for out in (PREPARED, TEACHER)}
    teacher_fingerprint = content_fingerprint(repo / TEACHER)

    dvc("remote", "add", "-d", "storage", str(remote), cwd=repo)
    dvc("push", *SHARED_STAGES, cwd=repo)
    assert any(p.is_file() for p in remote.rglob("*"))  # the objects are on the remote now
    git("add", "--all", cwd=repo)  # DVC's .gitignore files keep the outputs themselves out of git
    git("commit", "--quiet", "-m", "pipeline results", cwd=repo)
    tracked = git("ls-files", cwd=repo).split()
    assert "dvc.lock" in tracked and not [t for t in tracked if t.startswith((f"{PREPARED}/", f"{TEACHER}/"))]

    # This machine loses its outputs and its cache: only the remote holds them.
    for gone in (repo / PREPARED, repo / TEACHER, repo / ".dvc" / "cache"):
        shutil.rmtree(gone)
    dvc("pull", *SHARED_STAGES, cwd=repo)
    assert {out: file_digests(repo / out) for out in (PREPARED, TEACHER)} == before

    # A worker on a fresh checkout: the clone brings dvc.lock and the remote's address, no data.
    worker = repo.parent / "worker"
    git("clone", "--quiet", str(repo), str(worker), cwd=repo.parent)
    assert not (worker / PREPARED).exists() and not (worker / TEACHER).exists()
    dvc("pull", *SHARED_STAGES, cwd=worker)
    assert {out: file_digests(worker / out) for out in (PREPARED, TEACHER)} == before
    assert content_fingerprint(worker / TEACHER) == teacher_fingerprint
    assert load_prepared(worker / PREPARED).content_hash == prepared.content_hash
    # the pulled outputs match dvc.lock: the worker's `dvc repro` would not rerun prepare or teacher
    assert "up to date" in dvc("status", *SHARED_STAGES, cwd=worker)


def test_the_shared_stages_keep_the_outs_a_worker_pulls():
    """`dvc pull prepare teacher` (README) fetches data/prepared and models/teacher: those stages
    must keep them as cached outs (``cache: false`` would leave them off the remote)."""
    outs = {}
    for stage in shared_stages_dvc_yaml()["stages"].values():
        for out in stage["outs"]:  # a path, or {path: {persist: ..., cache: ...}}
            outs.update(out if isinstance(out, dict) else {out: {}})
    assert set(outs) == {str(PREPARED), str(TEACHER)}
    assert all(spec.get("cache", True) for spec in outs.values())
