"""Stage flow: log model folders to MLflow's registry (``python -m flows.register``).

The teacher gets the ``teacher`` alias (``registry.teacher_alias``); each candidate
``models/candidates/<recipe>`` gets its recipe's name as alias, so ``models:/<name>@<recipe>``
always points at the newest version of that recipe. A candidate whose test accuracy fell more than
``compress.max_accuracy_drop`` below the teacher's is kept on disk but not registered.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from prefect import flow

from bertshrink.params import Params
from bertshrink.rules import collapse_reason
from flows._cli import model_dir_option, run_stage
from tasks.evaluate import metrics_path
from tasks.registry import register_model
from tasks.tracking import set_tags, stage_run


def registration_record(params: Params, model_name: str) -> Path:
    return Path(params.base.reports_dir) / "registry" / f"{model_name}.json"


def alias_for(params: Params, model_dir: Path) -> str:
    """``teacher`` for the teacher, the recipe name for a candidate."""
    return params.registry.teacher_alias if Path(model_dir) == params.base.teacher_dir else Path(model_dir).name


def collapsed(params: Params, model_dir: Path) -> str | None:
    """Why a candidate's accuracy collapsed against the teacher's (from their metrics files), or None."""
    if Path(model_dir) == params.base.teacher_dir:
        return None
    files = [metrics_path(params.base, Path(model_dir).name), metrics_path(params.base, params.base.teacher_dir.name)]
    if not all(f.is_file() for f in files):
        return None  # register_model reports the missing evaluation
    candidate, teacher = (json.loads(f.read_text()) for f in files)
    return collapse_reason(candidate, teacher, params.compress.max_accuracy_drop)


def keep_unregistered(params: Params, model_dir: Path, reason: str) -> dict:
    """Record (and tag on its evaluation run) why a collapsed candidate was not registered."""
    result = json.loads(metrics_path(params.base, model_dir.name).read_text())
    if result.get("evaluation_run_id"):
        set_tags(result["evaluation_run_id"], {"collapsed": "true", "collapse_reason": reason})
    record = {"name": params.registry.model_name, "alias": model_dir.name, "registered": False, "collapsed": True,
              "reason": reason, "model_dir": str(model_dir)}
    out = registration_record(params, model_dir.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(f"bertshrink: not registering {model_dir} (kept for inspection): {reason}", file=sys.stderr)
    return record


@flow(name="register")
def register_flow(params: Params, parent_run_id: str | None = None, model_dirs: list[str] | None = None) -> list[dict]:
    """Register each model folder (default: the teacher); one nested MLflow run each.

    A candidate whose accuracy collapsed is not registered: its record says why (``registered: false``).
    """
    records = []
    for model_dir in [Path(d) for d in model_dirs or [params.base.teacher_dir]]:
        reason = collapsed(params, model_dir)
        if reason:
            records.append(keep_unregistered(params, model_dir, reason))
            continue
        with stage_run("register", params.registry, parent_run_id) as run_id:
            records.append(register_model(
                str(model_dir),
                str(metrics_path(params.base, model_dir.name)),
                params.registry,
                alias_for(params, model_dir),
                run_id,
                str(registration_record(params, model_dir.name)),
            ))
    return records


if __name__ == "__main__":
    run_stage(register_flow, __doc__, extra=model_dir_option("register"), cli_args=("model_dirs",))
