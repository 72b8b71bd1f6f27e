"""Stage flow: log model folders to MLflow's registry (``python -m flows.register``).

The teacher gets the ``teacher`` alias (``registry.teacher_alias``); each candidate
``models/candidates/<recipe>`` gets its recipe's name as alias, so ``models:/<name>@<recipe>``
always points at the newest version of that recipe. A candidate whose test accuracy fell more than
``compress.max_accuracy_drop`` below the teacher's is kept on disk but not registered.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

from prefect import flow

from bertshrink.config.artifacts import Artifacts, model_name
from bertshrink.config.params import Params
from bertshrink.selection.rules import collapse_reason
from flows._cli import model_dir_option, run_stage
from tasks.registry import register_model
from tracking.runs import set_tags, stage_run
from tracking.transfer import bundle_files


def alias_for(params: Params, model_dir: Path) -> str:
    """``teacher`` for the teacher, the recipe name for a candidate."""
    return params.registry.teacher_alias if Artifacts(params.base).is_teacher(model_dir) else model_name(model_dir)


def collapsed(params: Params, model_dir: Path) -> str | None:
    """Why a candidate's accuracy collapsed against the teacher's (from their metrics files), or None."""
    paths = Artifacts(params.base)
    if paths.is_teacher(model_dir):
        return None
    files = [paths.metrics(model_name(model_dir)), paths.metrics(model_name(paths.teacher))]
    if not all(f.is_file() for f in files):
        return None  # register_model reports the missing evaluation
    candidate, teacher = (json.loads(f.read_text()) for f in files)
    return collapse_reason(candidate, teacher, params.compress.max_accuracy_drop)


def keep_unregistered(params: Params, model_dir: Path, reason: str) -> dict:
    """Record (and tag on its evaluation run) why a collapsed candidate was not registered."""
    paths = Artifacts(params.base)
    result = json.loads(paths.metrics(model_name(model_dir)).read_text())
    if result.get("evaluation_run_id"):
        set_tags(result["evaluation_run_id"], {"collapsed": "true", "collapse_reason": reason})
    record = {"name": params.registry.model_name, "alias": model_dir.name, "registered": False, "collapsed": True,
              "reason": reason, "model_dir": str(model_dir)}
    out = paths.registry_record(model_name(model_dir))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(f"bertshrink: not registering {model_dir} (kept for inspection): {reason}", file=sys.stderr)
    return record


@flow(name="register")
def register_flow(params: Params, parent_run_id: str | None = None, model_dirs: list[str] | None = None) -> list[dict]:
    """Register each model folder (default: the teacher); one nested MLflow run each.

    A candidate whose accuracy collapsed is not registered: its record says why (``registered: false``).
    """
    paths, records = Artifacts(params.base), []
    for model_dir in [Path(d) for d in model_dirs or [paths.teacher]]:
        reason = collapsed(params, model_dir)
        if reason:
            records.append(keep_unregistered(params, model_dir, reason))
            continue
        with stage_run("register", params.registry, parent_run_id) as run_id:
            records.append(register_model(
                str(model_dir),
                str(paths.metrics(model_name(model_dir))),
                params.registry,
                alias_for(params, model_dir),
                run_id,
                str(paths.registry_record(model_name(model_dir))),
                bundle_files(paths, model_name(model_dir), model_dir),
            ))
    return records


def evaluate_and_register(params: Params, parent_run_id: str | None, model_dirs: dict[str, str],
                          evaluate: Callable[[str, str], list]) -> tuple[list, list, dict]:
    """Each ``name -> model_dir`` through ``evaluate(name, model_dir)`` then this stage; a failure skips
    only that model. Returns (evaluation results, registration records, {name: why it failed})."""
    results, registered, failed = [], [], {}
    for name, model_dir in model_dirs.items():
        try:
            results += evaluate(name, model_dir)
            registered += register_flow(params, parent_run_id, [model_dir])
        except Exception as err:  # one broken model must not stop the others
            failed[name] = f"evaluate/register: {type(err).__name__}: {err}"
    return results, registered, failed


if __name__ == "__main__":
    run_stage(register_flow, __doc__, extra=model_dir_option("register"), cli_args=("model_dirs",))
