"""Stage flow and CLI: promotion by the rule in ``params.yaml`` ``registry:`` (``python -m flows.promote``).

Without options it is the pipeline's stage: ``challenger`` goes to the best eligible model of the
last run, ``champion`` follows only under ``registry.auto_promote`` (see ``tasks.promote``). By hand:

    python -m flows.promote --alias challenger             # make the challenger champion
    python -m flows.promote --version 7                    # make version 7 champion
    python -m flows.promote --version 7 --force --reason "needed for the demo on Friday"

A by-hand promotion passes the same rule checks; ``--force`` overrides them and records why.
"""

from __future__ import annotations

import sys

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from prefect import flow

from bertshrink.config.artifacts import TEACHER, Artifacts, read_json
from bertshrink.config.params import Params
from bertshrink.errors import MissingArtifactError, ParamsError
from bertshrink.selection.promotion import CHAMPION_ALIAS, candidate_from_tags, check_manual_promotion, constraints_of
from flows._cli import candidate_names, parse_args, run_cli, run_stage
from tasks.promote import promote_task
from tracking.registry import move_alias, version_model_name
from tracking.runs import configure_tracking, log_artifact, set_tags, stage_run


def promotion_names(params: Params) -> list[str]:
    """The teacher, every recipe and the search's front members: what the rule chooses among."""
    return [TEACHER, *candidate_names(params)]


def failed_recipes(params: Params) -> dict[str, str]:
    return (read_json(Artifacts(params.base).compress_summary) or {}).get("failed", {})


@flow(name="promote")
def promote_flow(params: Params, parent_run_id: str | None = None, failed: dict[str, str] | None = None) -> dict:
    """The rule's choice becomes ``challenger``; ``champion`` moves only as the rule allows."""
    with stage_run("promote", params.registry, parent_run_id) as run_id:
        paths = Artifacts(params.base)
        record = promote_task(params.registry, paths, promotion_names(params),
                              failed if failed is not None else failed_recipes(params))
        set_tags(run_id, {"challenger": (record["challenger"] or {}).get("name", "none"),
                          "champion_moved": record["champion_moved"]})
        log_artifact(run_id, paths.promotion)
    print(f"bertshrink: challenger: {record['reason']}\nbertshrink: champion: {record['champion_reason']}")
    return record


def resolve_version(client: MlflowClient, model_name: str, version: str | None, alias: str | None):
    """The model version named by ``--version`` or ``--alias``, or a clear error."""
    try:
        if version:
            return client.get_model_version(model_name, version)
        return client.get_model_version_by_alias(model_name, alias)
    except MlflowException:
        what = f"version {version}" if version else f"alias @{alias}"
        raise MissingArtifactError(f"registered model {model_name} has no {what}: see the MLflow UI "
                                   "(`make mlflow-ui`) or run the pipeline first.") from None


def promote_by_hand(params: Params, version: str | None, alias: str | None, force: bool, reason: str | None) -> str:
    """Make a version champion after the rule's checks (or ``force`` with a ``reason``); returns the recorded reason."""
    configure_tracking(params.registry)
    client = MlflowClient()
    target = resolve_version(client, params.registry.model_name, version, alias)
    candidate = candidate_from_tags(version_model_name(target), target.version, target.tags)
    try:
        why = check_manual_promotion(candidate, constraints_of(params.registry), force, reason)
    except ValueError as err:
        raise ParamsError(str(err)) from None
    move_alias(client, params.registry.model_name, CHAMPION_ALIAS, str(target.version), why, "hand")
    print(f"bertshrink: {params.registry.model_name} v{target.version} is now @{CHAMPION_ALIAS}: {why}")
    return why


def _options(parser) -> None:
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--version", help="promote this registered version to champion by hand")
    which.add_argument("--alias", help="promote the version behind this alias (e.g. challenger) to champion")
    parser.add_argument("--force", action="store_true", help="promote even if the rule's checks fail")
    parser.add_argument("--reason", help="why (required with --force; recorded on the version)")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv, _options)
    if not (args.version or args.alias):
        if args.force or args.reason:
            sys.exit("bertshrink: --force/--reason go with --version or --alias (a promotion by hand).")
        run_stage(promote_flow, __doc__, argv)
        return
    run_cli(lambda params: promote_by_hand(params, args.version, args.alias, args.force, args.reason),
            args.params, args.debug)


if __name__ == "__main__":
    main()
