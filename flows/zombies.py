"""Prefect's zombie detection for the work pool: a flow run whose heartbeats stop is marked Crashed.

A worker that dies outright (its machine lost, the OOM killer, a spot eviction) leaves its flow runs
RUNNING on the server, since nobody is left to report them. Flow runs send a heartbeat event every
``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` seconds (180 by default); the automation in
``deploy/prefect/crash-zombies.yaml`` marks a run Crashed when neither a heartbeat nor a final state
came from it within its window, and the pipeline and the search then name it like any crashed run.

``python -m flows.zombies [--within SECONDS]`` creates the automation on the server at
``PREFECT_API_URL`` unless one of that name is there (``prefect automation create --from-file`` would
add a second copy on every call).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml
from prefect.client.orchestration import get_client
from prefect.events.schemas.automations import AutomationCore
from prefect.settings import PREFECT_API_URL

from bertshrink.config.scale_out import ScaleOutParams
from bertshrink.errors import BertshrinkError, ScaleOutError
from flows._prefect_server import require_prefect_server

AUTOMATION_FILE = Path(__file__).resolve().parents[1] / "deploy" / "prefect" / "crash-zombies.yaml"
# The file's `name` (tests/test_fan_out.py checks they agree): what the pipeline looks for.
ZOMBIE_AUTOMATION = "bertshrink: crash flow runs whose heartbeats stopped"


def zombie_automation(within_s: float | None = None) -> AutomationCore:
    """The automation of ``AUTOMATION_FILE``, its window shortened to ``within_s`` if given (tests)."""
    spec = yaml.safe_load(AUTOMATION_FILE.read_text())
    if within_s is not None:
        spec["trigger"]["within"] = within_s
    return AutomationCore.model_validate(spec)


def _has_zombie_automation(client) -> bool:
    return bool(client.read_automations_by_name(ZOMBIE_AUTOMATION))


def ensure_zombie_automation(within_s: float | None = None) -> bool:
    """Create the automation on the current Prefect server unless it exists; True if created."""
    with get_client(sync_client=True) as client:
        if _has_zombie_automation(client):
            return False
        client.create_automation(zombie_automation(within_s))
    return True


def note_missing_zombie_automation(scale: ScaleOutParams) -> None:
    """Say so when the server has no zombie automation: a flow run whose worker dies then stays
    RUNNING, and only ``scale_out.recipe_timeout_minutes`` ends the wait."""
    with get_client(sync_client=True) as client:
        if _has_zombie_automation(client):
            return
    waits = (f"is cancelled after scale_out.recipe_timeout_minutes ({scale.recipe_timeout_minutes:g} min)"
             if scale.recipe_timeout_minutes else "is waited for without end (scale_out.recipe_timeout_minutes: null)")
    print(f"bertshrink: note: the Prefect server has no automation '{ZOMBIE_AUTOMATION}', so a flow run whose "
          f"worker dies outright stays RUNNING and {waits}. Create it once: python -m flows.zombies", file=sys.stderr)


# Two heartbeats at Prefect's shortest interval (30 s): a shorter window would crash healthy runs.
MIN_WINDOW_S = 60.0


def window_seconds(text: str) -> float:
    """``--within``: seconds, at least ``MIN_WINDOW_S``."""
    seconds = float(text)
    if seconds < MIN_WINDOW_S:
        raise argparse.ArgumentTypeError(f"{text} s is shorter than two heartbeats at Prefect's shortest interval "
                                         f"(30 s): use at least {MIN_WINDOW_S:g}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--within", type=window_seconds, default=None, metavar="SECONDS",
                        help="the window without heartbeats (default: the file's, 600; set it above 2 x "
                             "PREFECT_FLOWS_HEARTBEAT_FREQUENCY of the workers)")
    args = parser.parse_args(argv)
    try:
        if not PREFECT_API_URL.value():
            raise ScaleOutError("PREFECT_API_URL is not set: point it at the Prefect server whose work pool runs "
                                "the recipes.")
        require_prefect_server()
        created = ensure_zombie_automation(args.within)
    except BertshrinkError as err:
        print(f"bertshrink: error: {err}", file=sys.stderr)
        return err.exit_code
    print(f"bertshrink: automation '{ZOMBIE_AUTOMATION}' {'created' if created else 'already there'}.", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
