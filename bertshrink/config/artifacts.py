"""Where every artifact lives: the one place that turns the ``base`` section into paths.

Stages pass model names and these paths between them, never objects. A model's name is its
folder's name: ``teacher``, ``floor``, or the recipe that made the candidate.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from bertshrink.config.params import BaseParams
from bertshrink.modelfolder.files import require_writable

TEACHER = "teacher"
FLOOR = "floor"
CANDIDATES = "candidates"
PEERS = "peers"


def read_json(path: Path) -> dict | None:
    """A stage's JSON output, or None where that stage has not run (or failed)."""
    return json.loads(Path(path).read_text()) if Path(path).is_file() else None


def model_name(model_dir: Path | str) -> str:
    """The name a model folder goes by in metrics, reports and the registry: its folder's name."""
    return Path(model_dir).name


@dataclass(frozen=True)
class Artifacts:
    """Paths of every stage's inputs and outputs, under ``base``'s folders."""

    base: BaseParams

    # ------------------------------------------------------------------ data
    @property
    def prepared(self) -> Path:
        return Path(self.base.prepared_dir)

    @property
    def validation_dir(self) -> Path:
        return Path(self.base.reports_dir) / "validation"

    @property
    def validation_result(self) -> Path:
        return self.validation_dir / "validation.json"

    # ------------------------------------------------------------------ models
    @property
    def teacher(self) -> Path:
        return Path(self.base.models_dir) / TEACHER

    @property
    def floor(self) -> Path:
        return Path(self.base.models_dir) / FLOOR

    def candidate(self, recipe: str) -> Path:
        return Path(self.base.models_dir) / CANDIDATES / recipe

    @property
    def peers_dir(self) -> Path:
        """Peer tools' models (benchmarks/peers.py): timed and reported beside ours, never promoted."""
        return Path(self.base.models_dir) / PEERS

    def peer(self, name: str) -> Path:
        return self.peers_dir / name

    def is_teacher(self, model_dir: Path | str) -> bool:
        return Path(model_dir) == self.teacher

    def checkpoints(self, *parts: str) -> Path:
        """Work folders for resumable training and recipe steps (``checkpoints/teacher``, ...)."""
        return Path(self.base.checkpoints_dir).joinpath(*parts)

    # ------------------------------------------------------------------ the search (flows/search.py)
    @property
    def search_dir(self) -> Path:
        """The search's work: its default SQLite study and each trial's models."""
        return self.checkpoints("search")

    def search_storage(self, storage: str | None) -> str:
        """The Optuna storage URL: ``storage`` as given, else a SQLite file under the checkpoints."""
        return storage or f"sqlite:///{(self.search_dir / 'study.db').resolve()}"

    def search_trial(self, study: str, number: int) -> Path:
        """Where a trial's model is built (``<study>`` is ``<name>-proxy`` or ``<name>-full``)."""
        return self.search_dir / study / f"trial-{number}"

    @property
    def search_reports(self) -> Path:
        return Path(self.base.reports_dir) / "search"

    @property
    def search_front(self) -> Path:
        """The front: members, their recipes, proxy and full scores, whether it met the constraints."""
        return self.search_reports / "front.json"

    def search_recipe(self, study: str, number: int) -> Path:
        """A trial's recipe as YAML a user can paste under ``compress.recipes``."""
        return self.search_reports / "recipes" / f"{study}-{number}.yaml"

    def search_members(self) -> list[str]:
        """Names of the last search's front members (``search-1``, ...); none before a search ran."""
        front = read_json(self.search_front) or {}
        return [member["name"] for member in front.get("members", [])]

    # ------------------------------------------------------------------ before writing
    def setting_of(self, path: Path) -> str:
        """The ``base`` setting that places ``path`` (``base.models_dir``, ...), for messages; a
        setting's parent folder counts too (``data/`` holds the swap of ``data/prepared``)."""
        for name in ("prepared_dir", "models_dir", "metrics_dir", "reports_dir", "checkpoints_dir"):
            root = Path(getattr(self.base, name))
            if Path(path) in (root, root.parent) or root in Path(path).parents:
                return f"base.{name}"
        return "base"

    def require_writable(self, *folders: Path) -> None:
        """``OutputError`` now, before the long work, unless a stage can write to each of ``folders``."""
        require_writable({Path(folder): self.setting_of(folder) for folder in folders})

    # ------------------------------------------------------------------ measurements
    def metrics(self, name: str) -> Path:
        return Path(self.base.metrics_dir) / f"{name}.json"

    @property
    def comparison(self) -> Path:
        return Path(self.base.metrics_dir) / "comparison.json"

    def predictions(self, name: str) -> Path:
        """Test (and validation) class ids of one model, in split order: what agreement is computed from."""
        return Path(self.base.reports_dir) / "predictions" / f"{name}.json"

    def disagreements(self, name: str) -> Path:
        return Path(self.base.reports_dir) / "disagreements" / f"{name}.csv"

    # ------------------------------------------------------------------ records and reports
    def registry_record(self, name: str) -> Path:
        return Path(self.base.reports_dir) / "registry" / f"{name}.json"

    def compress_steps(self, recipe: str) -> Path:
        return Path(self.base.reports_dir) / "compress" / f"{recipe}.steps.json"

    @property
    def compress_summary(self) -> Path:
        return Path(self.base.reports_dir) / "compress" / "summary.json"

    @property
    def promotion(self) -> Path:
        return Path(self.base.reports_dir) / "promotion.json"

    @property
    def peers_summary(self) -> Path:
        """What benchmarks/peers.py ran: each peer's tool versions, seconds, or why it failed."""
        return Path(self.base.reports_dir) / "peers" / "summary.json"

    def peer_log(self, name: str) -> Path:
        return Path(self.base.reports_dir) / "peers" / f"{name}.log"

    @property
    def report_dir(self) -> Path:
        return Path(self.base.reports_dir) / "report"

    @property
    def pipeline_summary(self) -> Path:
        return Path(self.base.reports_dir) / "pipeline_summary.md"

    @property
    def run_log(self) -> Path:
        """Every command's log with full tracebacks (the console shows one line per error)."""
        return Path(self.base.reports_dir) / "logs" / "bertshrink.log"
