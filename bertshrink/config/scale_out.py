"""The ``scale_out`` section: recipes and search trials run as flow runs of Prefect deployments on a work pool.

bertshrink schedules nothing itself: Prefect's workers run the recipes, MLflow's tracking server
holds what they produce, and the pipeline only submits, waits and collects (``flows/fan_out.py``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from bertshrink.config.knobs import Knobs

# auto: on a Prefect server (PREFECT_API_URL) where the recipe deployment exists, fan out; else one process.
Mode = Literal["auto", "local", "deployment"]


class ScaleOutParams(Knobs):
    """Where recipes and search trials run, and how many at once."""

    mode: Mode = "auto"
    # "<flow name>/<deployment name>", as prefect.yaml's `recipe` deployment of flows/recipe.py.
    recipe_deployment: str = Field("recipe/recipe", pattern=r"^[^/\s]+/[^/\s]+$")
    # The same for one search trial (flows/search_trial.py); the study must then be on a server RDB.
    search_deployment: str = Field("search-trial/search-trial", pattern=r"^[^/\s]+/[^/\s]+$")
    # Flow runs in flight at once; the work pool's own limit (and its workers) bound it too.
    concurrency: int = Field(4, ge=1, le=1024)
    poll_seconds: float = Field(5.0, gt=0.0, le=600.0)
    # A recipe's (or a search trial's) flow run that has not finished after this long is cancelled and named (null = wait):
    # a worker killed outright leaves its flow run RUNNING on the server, unless the server has the zombie automation
    # (python -m flows.zombies), which marks it Crashed once its heartbeats stop.
    recipe_timeout_minutes: float | None = Field(None, gt=0.0)
