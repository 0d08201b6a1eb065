"""Automations: a run whose worker died is marked Crashed, so it does not stay Running forever.

Flow runs of deployments send heartbeats when workers run with
`PREFECT_FLOWS_HEARTBEAT_FREQUENCY` (seconds, above 30). This automation expects another
heartbeat (or a final state) within three beats; when none comes, it marks the run
Crashed. The recovery slot `dr-<service>-<env>` is leased, so it is freed by then too, and
the same incident can be resumed with its incident id.
"""

from __future__ import annotations

from datetime import timedelta

ZOMBIE_AUTOMATION = "dr: crash flow runs that stopped sending heartbeats"


def zombie_automation(heartbeat_seconds: int = 60):
    """The automation, as Prefect's documentation for zombie flows describes it."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    return Automation(
        name=ZOMBIE_AUTOMATION,
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=heartbeat_seconds * 3),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message="no heartbeat from the worker: it died; re-run the incident with its id")],
    )


def ensure_automations(heartbeat_seconds: int = 60) -> list[str]:
    """Create the automations that are missing; returns the names created."""
    from prefect.automations import Automation

    try:
        Automation.read(name=ZOMBIE_AUTOMATION)
        return []
    except ValueError:
        zombie_automation(heartbeat_seconds).create()
        return [ZOMBIE_AUTOMATION]
