"""Runs waiting for a person, and following a run: `dr pending`, `dr approve`/`reject`/`answer-time`/`choose`, `dr watch`."""

from __future__ import annotations

import os
from typing import Any, Optional

import typer

from dr import output
from dr.cli.core import _run, app, use_prefect

RunArg = typer.Argument(None, metavar="RUN", show_default=False, help=(
    "The flow run's name (as `dr pending` and the UI show it) or id; default: the only run waiting for this answer."))
ApproverOpt = typer.Option(None, "--approver", metavar="NAME", show_default=False, help=(
    "Your name, recorded with the decision (default: $DR_APPROVER, else your login name)."))


def _approver(name: Optional[str]) -> str:
    from dr.errors import InvalidInput

    if not name:
        import getpass

        name = os.environ.get("DR_APPROVER") or getpass.getuser()
    name = name.strip()
    if not 2 <= len(name) <= 80:
        raise InvalidInput(f"--approver {name!r}: a name of 2 to 80 characters is recorded with the decision",
                           world_state="nothing was changed")
    return name


def _client() -> Any:
    """Prefect's REST API on this command's server (no Prefect import: these commands answer in ~1 s)."""
    from dr.prefect_api import Api

    resolved = use_prefect()
    if resolved.api_url is None:
        from dr.errors import ConfigError

        raise ConfigError("no Prefect server to ask: set PREFECT_API_URL, or start the local one with `dr local up`",
                          world_state="nothing was changed")
    return Api(resolved.api_url)


def _resume(api: Any, gate: Any, run_input: dict) -> None:
    api.resume(gate.run_id, run_input)


def _next(gate: Any) -> str:
    return f"follow it with `dr watch {gate.run_name}`"


@app.command("pending")
def pending_cmd() -> None:
    """List every run waiting for a person: what it will do, how long it has waited, and how to answer."""

    def body() -> None:
        from dr.gates import list_pending

        with _client() as api:
            gates = list_pending(api)
        if not gates:
            output.say("no run is waiting for a person")
            return
        for g in gates:
            output.say(f"{g.service} {g.environment}: {g.gate}  ({g.flow} run {g.run_name}"
                       + (f", incident {g.incident}" if g.incident else "") + ")")
            for line in (g.text.split("\n", 2)[-1] if g.text.startswith("**") else g.text).strip().splitlines():
                if line.strip():
                    output.say(f"  {line.strip()}")
            output.say(f"  waiting {g.waited()}, times out {g.times_out()}")
            output.say("  answer: " + "   or   ".join(g.commands()))
            output.say()

    _run(body)


@app.command("approve")
def approve_cmd(run: Optional[str] = RunArg, approver: Optional[str] = ApproverOpt,
                reason: str = typer.Option("", "--reason", metavar="TEXT", help="Why (recorded)."),
                confirm_environment: str = typer.Option("", "--confirm-environment", metavar="ENV", help=(
                    "Production: type the environment's name to approve."))) -> None:
    """Approve the gate a paused run is waiting at (the only one, unless you name the run).

    Example: dr approve --confirm-environment production
    """

    def body() -> None:
        from dr.errors import InvalidInput
        from dr.gates import pick_gate

        who = _approver(approver)
        with _client() as api:
            gate = pick_gate(api, run, ("Approval",))
            need = gate.confirm_environment
            if need and confirm_environment.strip() != need:
                raise InvalidInput(f"'{gate.gate}' of {gate.service} {gate.environment} (run {gate.run_name}) needs the "
                                   f"environment's name typed: add --confirm-environment {need}",
                                   world_state="nothing was changed; the run still waits")
            _resume(api, gate, {"approve": True, "approver": who, "reason": reason,
                                "confirm_environment": confirm_environment})
        output.say(f"approved '{gate.gate}' of {gate.service} {gate.environment} as {who} (run {gate.run_name}); "
                   + _next(gate))

    _run(body)


@app.command("reject")
def reject_cmd(run: Optional[str] = RunArg, approver: Optional[str] = ApproverOpt,
               reason: str = typer.Option(..., "--reason", metavar="TEXT", help="Why (recorded and sent to on-call).")) -> None:
    """Reject the gate a paused run is waiting at: nothing destructive is done, and the run ends.

    Example: dr reject --reason 'wrong restore time'
    """

    def body() -> None:
        from dr.gates import pick_gate

        who = _approver(approver)
        with _client() as api:
            gate = pick_gate(api, run, ("Approval",))
            _resume(api, gate, {"approve": False, "approver": who, "reason": reason})
        output.say(f"rejected '{gate.gate}' of {gate.service} {gate.environment} as {who} (run {gate.run_name})")

    _run(body)


@app.command("answer-time")
def answer_time_cmd(run: Optional[str] = RunArg,
                    time: str = typer.Option(..., "--time", "-t", metavar="TIME", help=(
                        "The time BEFORE the damage, 'YYYY-MM-DD HH:MM[:SS]' in UK time, or with an offset.")),
                    approver: Optional[str] = ApproverOpt,
                    tz: str = typer.Option("Europe/London", "--timezone", metavar="ZONE", help="Zone of --time.")) -> None:
    """Give the restore time a paused data-loss run is asking for.

    Example: dr answer-time --time '2026-07-01 14:30'
    """

    def body() -> None:
        from dr.gates import pick_gate
        from dr.timeparse import fmt_both, parse_restore_time

        when = parse_restore_time(time, tz)  # refused here, before the run sees it
        who = _approver(approver)
        with _client() as api:
            gate = pick_gate(api, run, ("RestoreTimeInput",))
            _resume(api, gate, {"restore_time": time, "timezone_name": tz, "approver": who})
        output.say(f"sent {fmt_both(when, tz)} to run {gate.run_name} ({gate.service} {gate.environment}); "
                   "it checks the time against the restore window and asks again if it is outside; " + _next(gate))

    _run(body)


@app.command("choose")
def choose_cmd(choice: str = typer.Argument(..., metavar="revive|recreate", help=(
                   "revive: the dropped server with all its data; recreate: an empty server and the newest nightly backup.")),
               run: Optional[str] = RunArg, approver: Optional[str] = ApproverOpt,
               reason: str = typer.Option("", "--reason", metavar="TEXT", help="Why (recorded).")) -> None:
    """Answer a paused server-loss run: revive the dropped server, or recreate it from the nightly backup.

    Example: dr choose revive
    """

    def body() -> None:
        from dr.errors import InvalidInput
        from dr.gates import pick_gate

        if choice not in ("revive", "recreate"):
            raise InvalidInput(f"choose revive or recreate, not {choice!r}", world_state="nothing was changed")
        who = _approver(approver)
        with _client() as api:
            gate = pick_gate(api, run, ("RecoveryChoice",))
            _resume(api, gate, {"choice": choice, "approver": who, "reason": reason})
        output.say(f"sent '{choice}' to run {gate.run_name} ({gate.service} {gate.environment}); " + _next(gate))

    _run(body)


@app.command("watch")
def watch_cmd(run: Optional[str] = typer.Argument(None, metavar="RUN", show_default=False, help=(
                  "The flow run's name or id; default: the only run that is running or paused."))) -> None:
    """Follow a run live: its timeline and backup/restore progress, until it ends or waits for a person.

    Example: dr watch brave-fox
    """

    def body() -> None:
        import sys

        from dr.errors import DrError
        from dr.gates import find_run, gate_of
        from dr.watch import follow, terminal_bar

        with _client() as api:
            target = find_run(api, run) if run else _only_live_run(api)
            params = target.get("parameters") or {}
            output.say(f"{api.flow_name(target['flow_id'])} run {target['name']} ({target['id']}) of "
                       f"{params.get('service', '?')} {params.get('environment', '?')}")
            last = follow(api, target["id"], say=output.say, bar=terminal_bar() if sys.stderr.isatty() else None)
            state = last.get("state") or {}
            if state.get("type") == "PAUSED":
                gate = gate_of(api, last)
                output.say(f"waiting for a person: {gate.gate}; answer: " + "   or   ".join(gate.commands()))
                return
        if state.get("type") != "COMPLETED":
            raise DrError(f"the run ended {state.get('name', 'without a state')}"
                          + (f": {state['message']}" if state.get("message") else ""))

    _run(body)


def _only_live_run(api: Any) -> dict:
    from dr.errors import InvalidInput

    runs = api.flow_runs(states=("RUNNING", "PAUSED"), limit=20)
    if len(runs) == 1:
        return runs[0]
    if not runs:
        raise InvalidInput("no run is running or paused; name the run to follow (`dr watch <name>`)")
    raise InvalidInput(f"{len(runs)} runs are running or paused: name one ("
                       + ", ".join(r["name"] for r in runs) + ")")
