"""`dr deploy`: put the fleet's deployments on a Prefect server through its API.

1. The work pool: created when missing (process, or kubernetes with
   deployments/kubernetes-base-job-template.json); a pool of another type is an error.
2. Its queues: `backups` and `drills` with the fleet's concurrency limits (set again when changed).
3. The deployments: every deployment of the spec whose digest (kept in the deployment's
   `version`) differs from the server's is written (an upsert, which also replaces its
   schedules); unchanged ones are not touched, so a second `dr deploy` writes nothing and
   leaves the scheduled runs alone. A deployment of the same name that another tool made is
   taken over (and reported).
4. Pruning: deployments carrying this fleet's tag that the configuration no longer names are
   deleted, never one without the tag (another tool's or a person's), and never one with a
   run in progress (Running, Paused, Pending, Cancelling): that one is kept and reported, and
   the next `dr deploy` prunes it once the run has ended.

Requests go out concurrently (8 at a time): against a local SQLite server ~1,500 deployments
take about a minute the first time and a few seconds when unchanged.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from dr.errors import ConfigError, DrError
from dr.fleet.spec import DeploymentSpec, FleetSpec

#: run states that keep a deployment from being pruned
OPEN_STATES = ("RUNNING", "PAUSED", "PENDING", "CANCELLING")
PAGE = 200


class DeployError(DrError):
    """The Prefect server refused part of the fleet's registration."""


@dataclass
class DeployReport:
    """What `register` did, deployment by deployment (`<flow>/<name>`)."""

    pool: str
    pool_created: bool = False
    queues: dict[str, int | None] = field(default_factory=dict)
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    taken_over: list[str] = field(default_factory=list)
    pruned: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)   # name -> why it was not pruned
    seconds: float = 0.0

    def lines(self) -> list[str]:
        out = [f"work pool {self.pool}" + (" created" if self.pool_created else "") + "; queues: "
               + ", ".join(f"{q} (limit {n})" if n else q for q, n in self.queues.items()),
               f"deployments: {len(self.created)} created, {len(self.updated)} updated, "
               f"{len(self.unchanged)} unchanged, {len(self.pruned)} pruned in {self.seconds:.1f} s"]
        if self.taken_over:
            out.append(f"taken over (same name, registered by other means): {', '.join(self.taken_over)}")
        for name in self.pruned:
            out.append(f"pruned {name} (no longer in the configuration)")
        for name, why in self.kept.items():
            out.append(f"kept {name}: {why}; `dr deploy` prunes it once that run has ended")
        return out


def register(spec: FleetSpec, *, prune: bool = True, concurrency: int = 8) -> DeployReport:
    """Register the fleet on the configured Prefect server (PREFECT_API_URL).

    Args:
        spec: the fleet, from `dr.fleet.spec.build`.
        prune: delete this fleet's deployments that the spec no longer has.
        concurrency: requests in flight at once.

    Returns:
        What was created, updated, left unchanged, pruned or kept.

    Raises:
        ConfigError: the work pool exists with another type.
        DeployError: the server refused a deployment (its message says which and why).
    """
    return asyncio.run(_register(spec, prune=prune, concurrency=concurrency))


async def _paged(read: Any, **kw: Any) -> list[Any]:
    out: list[Any] = []
    while True:
        page = await read(limit=PAGE, offset=len(out), **kw)
        out += page
        if len(page) < PAGE:
            return out


async def _ensure_pool(client: Any, spec: FleetSpec, report: DeployReport) -> None:
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    pool = spec.pool
    try:
        found = await client.read_work_pool(pool.name)
        if found.type != pool.type:
            raise ConfigError(f"work pool '{pool.name}' exists with type {found.type}, not {pool.type}; choose "
                              "another [fleet] work_pool or delete that pool", field="fleet.work_pool")
    except ObjectNotFound:
        create = WorkPoolCreate(name=pool.name, type=pool.type,
                                **({"base_job_template": pool.base_job_template} if pool.base_job_template else {}))
        try:
            await client.create_work_pool(create)
            report.pool_created = True
        except ObjectAlreadyExists:
            pass
    queues = {q.name: q for q in await client.read_work_queues(work_pool_name=pool.name)}
    for name, limit in pool.queues.items():
        q = queues.get(name)
        if q is None:
            await client.create_work_queue(name=name, work_pool_name=pool.name, concurrency_limit=limit)
        elif limit is not None and q.concurrency_limit != limit:
            await client.update_work_queue(q.id, concurrency_limit=limit)
        report.queues[name] = limit


def _schemas(spec: FleetSpec) -> dict[str, dict[str, Any]]:
    """Each flow's parameter schema, as `flow.to_deployment` makes it (importing the flows: 4x faster
    than Prefect's source parser `parameter_schema_from_entrypoint`)."""
    import importlib

    from prefect.utilities.callables import parameter_schema

    out: dict[str, dict[str, Any]] = {}
    for d in spec.deployments:
        if d.entrypoint not in out:
            path, fn = d.entrypoint.split(":")
            flow = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), fn)
            out[d.entrypoint] = parameter_schema(flow.fn).model_dump_for_openapi()
    return out


def locked_schema(schema: dict[str, Any], d: DeploymentSpec) -> dict[str, Any]:
    """The flow's schema with the deployment's own service, environment and config file as the only choices.

    As Prefect marks a frozen parameter (`prefect.deployments.runner.freeze`): `readOnly` and an
    `enum` of its one value; the server refuses a run whose parameters are not in the schema.
    """
    import copy

    out = copy.deepcopy(schema)
    props = out.get("properties", {})
    for key in d.locked:
        if key in props:
            props[key]["readOnly"] = True
            props[key]["enum"] = [d.parameters[key]]
            props[key]["default"] = d.parameters[key]
    return out


async def _write(client: Any, d: DeploymentSpec, flow_id: UUID, schema: dict[str, Any]) -> None:
    from prefect.client.schemas.actions import DeploymentScheduleCreate
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy, ConcurrencyOptions
    from prefect.client.schemas.schedules import CronSchedule

    schedules = [DeploymentScheduleCreate(schedule=CronSchedule(cron=s.cron, timezone=s.timezone, day_or=s.day_or),
                                          active=True) for s in d.schedules]
    try:
        await client.create_deployment(
            flow_id=flow_id, name=d.name, version=d.version(), description=d.description, tags=list(d.tags),
            parameters=d.parameters, parameter_openapi_schema=locked_schema(schema, d), enforce_parameter_schema=True,
            entrypoint=d.entrypoint, work_pool_name=d.work_pool, work_queue_name=d.work_queue,
            job_variables=d.job_variables, pull_steps=d.pull_steps, schedules=schedules,
            concurrency_limit=1 if d.one_at_a_time else None,
            concurrency_options=(ConcurrencyOptions(collision_strategy=ConcurrencyLimitStrategy(d.collision_strategy))
                                 if d.one_at_a_time else None))
    except Exception as exc:
        detail = getattr(getattr(exc, "response", None), "text", "") or str(exc)
        raise DeployError(f"the Prefect server refused deployment {d.full_name}: {detail[:500]}") from exc


async def _register(spec: FleetSpec, *, prune: bool, concurrency: int) -> DeployReport:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        DeploymentFilterName,
        DeploymentFilterTags,
        FlowFilter,
        FlowFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    started = time.monotonic()
    report = DeployReport(spec.pool.name)
    schemas = _schemas(spec)
    gate = asyncio.Semaphore(concurrency)

    async def limited(coro: Any) -> Any:
        async with gate:
            return await coro

    async with get_client() as client:
        await _ensure_pool(client, spec, report)
        flow_names = sorted({d.flow for d in spec.deployments})
        ids = await asyncio.gather(*(limited(client.create_flow_from_name(n)) for n in flow_names))
        flow_ids: dict[str, UUID] = dict(zip(flow_names, ids))
        names: dict[UUID, str] = {v: k for k, v in flow_ids.items()}

        ours = await _paged(client.read_deployments,
                            deployment_filter=DeploymentFilter(tags=DeploymentFilterTags(all_=[spec.tag])))
        same_name = await _paged(client.read_deployments, flow_filter=FlowFilter(id=FlowFilterId(any_=list(ids))),
                                 deployment_filter=DeploymentFilter(name=DeploymentFilterName(
                                     any_=sorted({d.name for d in spec.deployments}))))
        for dep in ours:
            if dep.flow_id not in names:  # a flow the catalogue no longer has
                names[dep.flow_id] = (await client.read_flow(dep.flow_id)).name
        existing = {f"{names.get(dep.flow_id, '?')}/{dep.name}": dep for dep in [*same_name, *ours]}
        our_names = {f"{names[dep.flow_id]}/{dep.name}" for dep in ours}

        todo = []
        for d in spec.deployments:
            dep = existing.get(d.full_name)
            if dep is None:
                report.created.append(d.full_name)
            elif d.full_name not in our_names:
                report.taken_over.append(d.full_name)
            elif dep.version == d.version():
                report.unchanged.append(d.full_name)
                continue
            else:
                report.updated.append(d.full_name)
            todo.append(d)
        await asyncio.gather(*(limited(_write(client, d, flow_ids[d.flow], schemas[d.entrypoint])) for d in todo))

        if prune:
            wanted = {d.full_name for d in spec.deployments}
            stale = {name: existing[name] for name in sorted(our_names - wanted)}
            if stale:
                open_runs = await _paged(client.read_flow_runs, deployment_filter=DeploymentFilter(
                    id=DeploymentFilterId(any_=[d.id for d in stale.values()])),
                    flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
                        any_=[StateType(s) for s in OPEN_STATES]))))
                busy = {r.deployment_id: r for r in open_runs}
                for name, dep in stale.items():
                    run = busy.get(dep.id)
                    if run is not None:
                        report.kept[name] = (f"its run {run.name} ({run.id}) is "
                                             f"{run.state.name if run.state else 'in progress'}")
                await _delete(client, [dep.id for name, dep in stale.items() if name not in report.kept])
                report.pruned = [n for n in stale if n not in report.kept]
    report.seconds = time.monotonic() - started
    return report


async def _delete(client: Any, ids: list[UUID]) -> None:
    """Delete deployments, 50 a request (the server's bulk limit)."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    for i in range(0, len(ids), 50):
        body = DeploymentFilter(id=DeploymentFilterId(any_=ids[i:i + 50])).model_dump(mode="json", exclude_unset=True)
        await client.request("POST", "/deployments/bulk_delete", json={"deployments": body, "limit": 50})


def remove_fleet(tag: str) -> list[str]:
    """Delete every deployment carrying a fleet's tag (tests and `dr deploy --remove`); returns their ids."""

    async def go() -> list[str]:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterTags

        async with get_client() as client:
            deps = await _paged(client.read_deployments,
                                deployment_filter=DeploymentFilter(tags=DeploymentFilterTags(all_=[tag])))
            await _delete(client, [d.id for d in deps])
            return [str(d.id) for d in deps]

    return asyncio.run(go())
