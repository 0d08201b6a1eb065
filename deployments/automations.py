"""Automations: a run whose worker died is marked Crashed, and on-call hears about crashed runs.

Flow runs send heartbeats every `PREFECT_FLOWS_HEARTBEAT_FREQUENCY` seconds (Prefect 3.9:
on by default, every 180 s, at least 30; workers started by `dr worker start` use 60).
The zombie automation expects another heartbeat (or a final state) within three beats;
when none comes, it marks the run Crashed. The recovery slot `dr-<service>-<env>` is
leased, so the Prefect server's repossessor frees it once the lease runs out, and the
same incident can be resumed with its incident id.

A killed worker runs no `on_crashed` hook of its own, so the notice is sent by the server:
a second automation reacts to `prefect.flow-run.Crashed` with a notification through the
Slack / Teams incoming webhooks configured in `[notifications]` (saved as Prefect
Custom Webhook blocks `dr-oncall-slack` / `dr-oncall-teams`, the URL kept as a block secret).
"""

from __future__ import annotations

from contextlib import nullcontext
from datetime import timedelta
from typing import Optional

ZOMBIE_AUTOMATION = "dr: crash flow runs that stopped sending heartbeats"
CRASH_NOTICE_AUTOMATION = "dr: tell on-call about crashed flow runs"
ZOMBIE_MESSAGE = "no heartbeat from the worker: it died; re-run the incident with its id"
BLOCK_PREFIX = "dr-oncall-"

CRASH_SUBJECT = "[dr] flow run {{ flow_run.name }} of {{ flow.name }} CRASHED"
CRASH_BODY = ("Flow run {{ flow.name }}/{{ flow_run.name }} ({{ flow_run.id }}) crashed: {{ flow_run.state.message }}\n"
              "Parameters: {{ flow_run.parameters }}\n"
              "Nothing was half-applied; re-run it with the same incident id to resume.")

#: incoming-webhook payloads, with the URL as a block secret
WEBHOOK_PAYLOADS = {
    "slack": {"text": "{{subject}}\n{{body}}"},
    "teams": {"@type": "MessageCard", "@context": "https://schema.org/extensions", "title": "{{subject}}",
              "text": "{{body}}"},
}


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
        actions=[ChangeFlowRunState(state=StateType.CRASHED, message=ZOMBIE_MESSAGE)],
    )


def save_webhook_blocks(webhooks: dict[str, str]) -> dict[str, object]:
    """Save one Custom Webhook block per channel (`slack`, `teams`); returns channel -> block document id."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    ids = {}
    for kind, url in sorted(webhooks.items()):
        block = CustomWebhookNotificationBlock(name=f"dr on-call ({kind})", url="{{webhook_url}}",
                                               json_data=WEBHOOK_PAYLOADS[kind], secrets={"webhook_url": url})
        ids[kind] = block.save(f"{BLOCK_PREFIX}{kind}", overwrite=True)
    return ids


def crash_notice_automation(block_ids: list):
    """Reactive: every flow run that enters Crashed sends one notification per channel."""
    from prefect.automations import Automation
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    return Automation(
        name=CRASH_NOTICE_AUTOMATION,
        trigger=EventTrigger(
            expect={"prefect.flow-run.Crashed"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            posture=Posture.Reactive,
            threshold=1,
            within=timedelta(0),
        ),
        actions=[SendNotification(block_document_id=b, subject=CRASH_SUBJECT, body=CRASH_BODY) for b in block_ids],
    )


def _exists(name: str) -> bool:
    from prefect.automations import Automation

    try:
        Automation.read(name=name)
        return True
    except ValueError:
        return False


def ensure_automations(heartbeat_seconds: int = 60, *, webhooks: Optional[dict[str, str]] = None,
                       api_url: Optional[str] = None) -> list[str]:
    """Create the automations that are missing; returns the names created.

    Args:
        heartbeat_seconds: the workers' PREFECT_FLOWS_HEARTBEAT_FREQUENCY.
        webhooks: on-call incoming webhooks by channel (`slack`, `teams`); with none, no
            crash notice is set up (the flows' own notifications still go out).
        api_url: the Prefect API (default: the configured one).
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    made = []
    with temporary_settings({PREFECT_API_URL: api_url}) if api_url else nullcontext():
        if not _exists(ZOMBIE_AUTOMATION):
            zombie_automation(heartbeat_seconds).create()
            made.append(ZOMBIE_AUTOMATION)
        if webhooks:
            ids = save_webhook_blocks(webhooks)  # always: a changed URL is picked up
            if not _exists(CRASH_NOTICE_AUTOMATION):
                crash_notice_automation(list(ids.values())).create()
                made.append(CRASH_NOTICE_AUTOMATION)
    return made
