"""The monthly DR drill: rehearse a scenario on a non-production environment and measure it.

For data loss: marker rows, the restore time T, more rows, then the damage; the data-loss
scenario runs with T and must bring back the markers and not the rows after T.
For server loss: marker rows, a backup, more rows, then the server is dropped; the
server-loss scenario recreates it from that backup and must bring back the markers only.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from dr.errors import DrError, InvalidInput, ValidationFailed
from dr.fleet.runs import refresh_readiness, tag_this_run
from dr.runtime import Ref
from flows.common import run_logger
from flows.data_loss import data_loss
from flows.server_loss import server_loss
from tasks.backups import backup_database_task
from tasks.drill import corrupt_data, count_markers, drop_live_server, ensure_local_platform, insert_markers
from tasks.reports import publish_report

MARKER_ROWS = 25


def _sleep_past_resolution() -> None:
    time.sleep(1.2)  # restore times have 1 s resolution


def _drill_data_loss(ref: Ref, drill: str) -> dict:
    zone = ref.rt().target.timezone
    insert_markers(ref, drill, "keep", MARKER_ROWS)
    _sleep_past_resolution()
    target = datetime.now(timezone.utc).replace(microsecond=0)
    _sleep_past_resolution()
    insert_markers(ref, drill, "lost", 5)
    damage_at = corrupt_data(ref, drill)
    local = target.astimezone(ZoneInfo(zone)).strftime("%Y-%m-%d %H:%M:%S")
    r = data_loss(ref.service, ref.environment, restore_time=local, incident=drill, auto_approve=True,
                  config_path=ref.config_path)
    markers = count_markers(ref, drill)
    return {"scenario": "data-loss", "rto_seconds": r["rto_seconds"],
            "rpo_seconds": (damage_at - target).total_seconds(), "markers": markers,
            "ok": markers.get("keep") == MARKER_ROWS and not markers.get("lost"),
            "steps": r["timeline"], "report": r["report"]}


def _drill_server_loss(ref: Ref, drill: str) -> dict:
    insert_markers(ref, drill, "keep", MARKER_ROWS)
    backup = backup_database_task(ref, kind="drill", label=drill).info
    insert_markers(ref, drill, "lost", 5)
    damage_at = drop_live_server(ref)
    r = server_loss(ref.service, ref.environment, recovery="recreate", backup=backup.name, incident=drill,
                    auto_approve=True, config_path=ref.config_path)
    markers = count_markers(ref, drill)
    return {"scenario": "server-loss", "rto_seconds": r["rto_seconds"],
            "rpo_seconds": (damage_at - backup.finished_at).total_seconds() if backup.finished_at else None,
            "markers": markers, "ok": markers.get("keep") == MARKER_ROWS and not markers.get("lost"),
            "backup_bytes": backup.size, "steps": r["timeline"], "report": r["report"]}


def _history_path(ref: Ref) -> Path:
    rdir = Path(ref.rt().config.reports_dir)
    if not rdir.is_absolute() and ref.config_path:
        rdir = Path(ref.config_path).parent / rdir
    return rdir / "drill-history.jsonl"


@flow(name="dr-drill", log_prints=True, on_completion=[refresh_readiness], on_failure=[refresh_readiness])
def dr_drill(
    service: str,
    environment: str,
    scenario: Literal["data-loss", "server-loss", "both"] = "both",
    fail_on_objectives: bool = True,
    config_path: str | None = None,
) -> dict:
    """Rehearse the runbook on a non-production environment, measure RTO and RPO, and report.

    Damages the environment on purpose (deletes rows, drops the server) and recovers it with
    the real scenario flows, auto-approved. Refused for production.

    Args:
        service: the service short name.
        environment: a non-production environment (the local platform by default).
        scenario: which scenario to rehearse, or both.
        fail_on_objectives: fail the drill when RTO or RPO exceed the configured objectives.
        config_path: the configuration file.
    """
    ref = Ref(service, environment, config_path)
    tag_this_run(service, environment)
    t = ref.rt().target
    if t.production:
        raise InvalidInput(f"drills damage data on purpose and are refused for production ({service} {environment})")
    log = run_logger()
    started = datetime.now(timezone.utc)
    drill = f"drill-{started:%Y%m%d-%H%M%S}"
    log.info("drill %s: %s", drill, ensure_local_platform(ref))
    results = []
    for name in (["data-loss", "server-loss"] if scenario == "both" else [scenario]):
        try:
            tag = f"{drill}-{'dl' if name == 'data-loss' else 'sl'}"
            results.append(_drill_data_loss(ref, tag) if name == "data-loss" else _drill_server_loss(ref, tag))
        except DrError as exc:
            results.append({"scenario": name, "ok": False, "error": str(exc), "rto_seconds": None, "rpo_seconds": None})
    problems = []
    for r in results:
        if not r["ok"]:
            problems.append(f"{r['scenario']}: " + (r.get("error") or f"markers after recovery {r['markers']}, "
                                                   f"expected keep={MARKER_ROWS} and no lost rows"))
        elif fail_on_objectives and r["rto_seconds"] and r["rto_seconds"] > t.rto_minutes * 60:
            problems.append(f"{r['scenario']}: RTO {r['rto_seconds']:.0f} s over the objective {t.rto_minutes} min")
        elif fail_on_objectives and r["rpo_seconds"] and r["rpo_seconds"] > t.rpo_minutes * 60:
            problems.append(f"{r['scenario']}: RPO {r['rpo_seconds']:.0f} s over the objective {t.rpo_minutes} min")

    # history and trend
    hist = _history_path(ref)
    previous = []
    if hist.exists():
        previous = [json.loads(line) for line in hist.read_text().splitlines() if line.strip()]
    entry = {"drill": drill, "service": service, "environment": environment, "started": started.isoformat(),
             "results": [{k: v for k, v in r.items() if k != "steps"} for r in results], "passed": not problems}
    hist.parent.mkdir(parents=True, exist_ok=True)
    with hist.open("a") as fh:
        fh.write(json.dumps(entry, default=str) + "\n")

    def fmt(s: float | None) -> str:
        return "—" if s is None else f"{s:.0f} s"

    rows = [{"scenario": r["scenario"], "result": "PASS" if r["ok"] else "FAIL", "RTO": fmt(r["rto_seconds"]),
             "RPO": fmt(r["rpo_seconds"]), "objective RTO": f"{t.rto_minutes} min", "objective RPO": f"{t.rpo_minutes} min",
             "marker rows after recovery": str(r.get("markers", r.get("error", "")))}
            for r in results]
    trend = ["| drill | scenario | RTO | RPO | passed |", "|---|---|---|---|---|"]
    for e in (previous + [entry])[-12:]:
        for r in e["results"]:
            trend.append(f"| {e['drill']} | {r['scenario']} | {fmt(r.get('rto_seconds'))} | {fmt(r.get('rpo_seconds'))} | "
                         f"{'yes' if e['passed'] else 'NO'} |")
    md = "\n".join([f"# DR drill {drill}: {service} {environment}", "",
                    "**PASSED**" if not problems else "**FAILED**: " + "; ".join(problems), "",
                    "| scenario | result | RTO | RPO |", "|---|---|---|---|",
                    *[f"| {r['scenario']} | {r['result']} | {r['RTO']} | {r['RPO']} |" for r in rows],
                    "", "## Trend (last 12 drills)", "", *trend])
    create_markdown_artifact(key=f"drill-report-{service}-{environment}", markdown=md, description=f"drill {drill}")
    path = publish_report(ref, drill, md)
    # read back by `dr drill --on-worker`: the rows, and "DR drill <id>; report <path>"
    create_table_artifact(key=f"drill-{service}-{environment}", table=rows, description=f"DR drill {drill}; report {path}")
    out = {"drill": drill, "passed": not problems, "problems": problems, "results": results, "report": path,
           "history": str(hist)}
    if problems:
        raise ValidationFailed("drill failed: " + "; ".join(problems), failed=problems)
    return out
