"""`dr deploy` for a fleet: every flow of every environment from dr.toml, schedules, limits, pruning, the pools."""

from __future__ import annotations

import asyncio
import json
import pytest
import yaml

from dr.config import load_config, parse_config
from dr.fleet.register import remove_fleet
from dr.fleet.spec import CATALOGUE, build, to_yaml
from tests.fleet_support import REPO, deployments_of, dr, write_fleet_config

pytestmark = pytest.mark.usefixtures("prefect_server")

SERVICES = {
    "alpha": {"development": "", "qa": "", "production": "backup_offset_minutes = 20\n"},
    "beta": {"development": "", "qa": "drill = false\n", "production": ""},
    "gamma": {"development": "backup_offset_minutes = 95\n", "qa": "", "production": ""},
}
FLEET = 'name = "t33"\nwork_pool = "fleet33"\nmax_parallel_backups = 3\nmax_parallel_drills = 1\n'
TAG = "dr-fleet:t33"
FLOWS = [e.flow for e in CATALOGUE]
#: 3 services x 3 environments, every flow, no drill for the 3 production environments, one fleet-check
EXPECTED = 9 * len(FLOWS) - 3 + 1


def expected_names(services: dict[str, dict[str, str]]) -> set[str]:
    names = {"fleet-check/t33"}
    for s, envs in services.items():
        for e in envs:
            names |= {f"{f}/{s}-{e}" for f in FLOWS if not (f == "dr-drill" and e == "production")}
    return names


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    root = tmp_path_factory.mktemp("fleet33")
    path = write_fleet_config(root, SERVICES, FLEET)
    r = dr("deploy", "--config", str(path))
    assert r.returncode == 0, r.stdout + r.stderr
    yield path, r
    remove_fleet(TAG)


class TestGeneratedDeployments:
    def test_every_runbook_flow_of_every_environment_is_registered_once(self, fleet):
        path, r = fleet
        deps = deployments_of(TAG)
        assert set(deps) == expected_names(SERVICES)
        assert len(deps) == 9 * len(FLOWS) - 3 + 1  # no drill button for production
        assert f"deployments: {EXPECTED} created, 0 updated, 0 unchanged, 0 pruned" in r.stdout, r.stdout
        dl = deps["data-loss/alpha-production"]
        assert dl.parameters == {"service": "alpha", "environment": "production", "config_path": str(path)}
        assert set(dl.tags) == {TAG, "alpha", "production", "scenario"} and dl.work_pool_name == "fleet33"
        assert dl.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": "{{ $DR_HOME }}"}}]
        assert deps["nightly-backup/beta-qa"].parameters["verify"] == "never"  # the weekly verify proves restores

    def test_a_run_form_offers_only_its_own_service_and_environment(self, fleet):
        from prefect.client.orchestration import get_client

        deps = deployments_of(TAG)
        dl = deps["data-loss/alpha-production"]
        props = dl.parameter_openapi_schema["properties"]
        assert props["service"]["enum"] == ["alpha"] and props["environment"]["enum"] == ["production"]
        assert props["service"]["readOnly"] and props["environment"]["readOnly"]
        assert props["restore_time"].get("enum") is None  # the rest of the form is free
        with get_client(sync_client=True) as client:
            with pytest.raises(Exception, match="(?i)validation"):
                client.create_flow_run_from_deployment(dl.id, parameters={"environment": "staging"})
            with pytest.raises(Exception, match="(?i)validation"):
                client.create_flow_run_from_deployment(dl.id, parameters={"environment": "development"})
            ok = client.create_flow_run_from_deployment(dl.id, parameters={"restore_time": "2026-01-01 10:00"})
            assert ok.parameters["environment"] == "production"
            client.delete_flow_run(ok.id)

    def test_schedules_come_from_the_configuration_in_its_time_zone(self, fleet):
        deps = deployments_of(TAG)

        def crons(name: str) -> list[tuple[str, str, bool]]:
            return [(s.schedule.cron, s.schedule.timezone, s.schedule.day_or) for s in deps[name].schedules]

        assert crons("nightly-backup/alpha-development") == [("0 4 * * *", "Europe/London", True)]
        assert crons("nightly-backup/alpha-production") == [("20 4 * * *", "Europe/London", True)]  # + 20 min
        assert crons("nightly-backup/gamma-development") == [("35 5 * * *", "Europe/London", True)]  # + 95 min
        assert crons("verify-backup/beta-production") == [("0 6 * * 0", "Europe/London", False)]  # Sundays
        # the monthly drill: non-production only, and not where an environment opts out
        assert crons("dr-drill/alpha-qa") == [("0 10 1-7 * 2", "Europe/London", False)]
        assert crons("dr-drill/beta-qa") == []
        assert not [n for n in deps if n.startswith("dr-drill/") and n.endswith("-production")]
        assert crons("fleet-check/t33") == [("7 * * * *", "UTC", True)]
        assert crons("data-loss/alpha-qa") == []

    def test_recoveries_run_one_at_a_time_and_backups_within_the_fleet_limit(self, fleet):
        from prefect.client.orchestration import get_client

        deps = deployments_of(TAG)
        for name in ("data-loss/beta-qa", "server-loss/beta-qa", "restore-database/beta-qa", "dr-drill/beta-qa"):
            d = deps[name]
            assert d.concurrency_limit == 1 or d.global_concurrency_limit.limit == 1, name
            assert d.concurrency_options.collision_strategy.value == "ENQUEUE", name
        assert deps["fleet-check/t33"].concurrency_options.collision_strategy.value == "CANCEL_NEW"
        assert not deps["backup-database/beta-qa"].concurrency_limit
        assert deps["nightly-backup/beta-qa"].work_queue_name == "backups"
        assert deps["verify-backup/beta-qa"].work_queue_name == "backups"
        assert deps["dr-drill/beta-qa"].work_queue_name == "drills"
        with get_client(sync_client=True) as client:
            queues = {q.name: q.concurrency_limit for q in client.read_work_queues(work_pool_name="fleet33")}
            assert client.read_work_pool("fleet33").type == "process"
        assert queues["backups"] == 3 and queues["drills"] == 1 and queues["default"] is None

    def test_a_second_deploy_writes_nothing(self, fleet):
        path, _ = fleet
        before = {n: d.updated for n, d in deployments_of(TAG).items()}
        r = dr("deploy", "--config", str(path))
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"deployments: 0 created, 0 updated, {EXPECTED} unchanged, 0 pruned" in r.stdout, r.stdout
        assert {n: d.updated for n, d in deployments_of(TAG).items()} == before

    def test_a_changed_limit_and_offset_are_applied_to_what_changed_only(self, fleet):
        from prefect.client.orchestration import get_client

        path, _ = fleet
        original = path.read_text()
        path.write_text(original.replace("max_parallel_backups = 3", "max_parallel_backups = 2")
                        .replace("backup_offset_minutes = 20", "backup_offset_minutes = 30"))
        try:
            r = dr("deploy", "--config", str(path))
            assert r.returncode == 0, r.stdout + r.stderr
            assert f"deployments: 0 created, 1 updated, {EXPECTED - 1} unchanged, 0 pruned" in r.stdout, r.stdout
            deps = deployments_of(TAG)
            assert [s.schedule.cron for s in deps["nightly-backup/alpha-production"].schedules] == ["30 4 * * *"]
            with get_client(sync_client=True) as client:
                queues = {q.name: q.concurrency_limit for q in client.read_work_queues(work_pool_name="fleet33")}
            assert queues["backups"] == 2
        finally:
            path.write_text(original)
            r = dr("deploy", "--config", str(path))  # back as the module's fixture registered it
            assert r.returncode == 0 and "1 updated" in r.stdout, r.stdout + r.stderr


    def test_only_the_named_deployments_are_registered_and_nothing_is_pruned(self, fleet):
        path, _ = fleet
        r = dr("deploy", "--config", str(path), "--name", "data-loss/alpha-qa", "--name", "nightly-backup/beta-qa")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "0 pruned" in r.stdout and "deployments: data-loss/alpha-qa, nightly-backup/beta-qa" in r.stdout
        assert len(deployments_of(TAG)) == EXPECTED
        r = dr("deploy", "--config", str(path), "--name", "data-loss/alpha-staging")
        assert r.returncode == 2 and "no deployment data-loss/alpha-staging in this configuration" in r.stderr


class TestConfiguration:
    def test_schedule_keys_are_checked_at_load(self):
        from dr.errors import ConfigError

        base = "[services.apply.environments.{env}]\n{lines}\n"
        with pytest.raises(ConfigError, match=r"fleet.nightly_backup_at: .*01:30 does not exist on .* in Europe/London"):
            parse_config('[fleet]\nnightly_backup_at = "01:30"\n' + base.format(env="qa", lines=""))
        with pytest.raises(ConfigError, match=r"backup_offset_minutes: .*01:10 does not exist"):
            parse_config(base.format(env="qa", lines="backup_offset_minutes = 1270"))  # 04:00 + 21 h 10 min
        with pytest.raises(ConfigError, match=r"production.drill: drills damage data on purpose"):
            parse_config(base.format(env="production", lines="drill = true"))
        with pytest.raises(ConfigError, match=r"fleet.drill_cron: '0 10 1-7 \*' is not a cron expression"):
            parse_config('[fleet]\ndrill_cron = "0 10 1-7 *"\n' + base.format(env="qa", lines=""))
        with pytest.raises(ConfigError, match=r"fleet.max_parallel_backups"):
            parse_config("[fleet]\nmax_parallel_backups = 0\n" + base.format(env="qa", lines=""))
        cfg = parse_config('[fleet]\nnightly_backup_at = "23:30"\n' + base.format(env="qa", lines="backup_offset_minutes = 60"))
        assert cfg.target("apply", "qa").nightly_backup_at == "00:30" and cfg.target("apply", "qa").drill is True


class TestPrefectYaml:
    def test_the_committed_prefect_yaml_is_what_dr_deploy_writes_for_the_built_in_configuration(self, tmp_path):
        out = tmp_path / "prefect.yaml"
        r = dr("deploy", "--write", str(out))  # no dr.toml here: the built-in demo configuration
        assert r.returncode == 0, r.stdout + r.stderr
        written = out.read_text().replace(str(out), "prefect.yaml")
        assert written == (REPO / "prefect.yaml").read_text(), "prefect.yaml is stale: run `dr deploy --write prefect.yaml`"

    def test_the_kubernetes_pool_is_one_key_away(self):
        cfg = parse_config('[fleet]\nwork_pool_type = "kubernetes"\n[services.apply.environments.production]\n')
        spec = build(cfg, resolve_image=False)
        doc = yaml.safe_load(to_yaml(spec, path="k.yaml", source="test"))
        k8s = yaml.safe_load((REPO / "deployments" / "kubernetes.prefect.yaml").read_text())
        assert doc["pull"] == k8s["pull"] and doc["definitions"] == k8s["definitions"]
        for d in doc["deployments"]:
            assert d["work_pool"]["name"] == "dr-kubernetes"
            assert d["work_pool"]["job_variables"] == k8s["definitions"]["work_pool"]["job_variables"]
            assert "config_path" not in d["parameters"]  # the Jobs read DR_CONFIG from the ConfigMap


class TestKubernetesWorkPool:
    """`[fleet] work_pool_type = "kubernetes"`: the fleet's flows as Kubernetes Jobs (prefect-kubernetes)."""

    def test_deploy_creates_the_pool_and_renders_a_job_with_secrets_only_by_reference(self, tmp_path, monkeypatch):
        from prefect.client.orchestration import get_client
        from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

        from dr.errors import ConfigError
        from dr.fleet.register import register

        cfg = load_config(write_fleet_config(tmp_path, {"kube": {"production": ""}},
                                             'name = "tk8s"\nwork_pool_type = "kubernetes"\nwork_pool = "dr-k8s-test"\n'))
        # without an image the pool cannot be used: refused before anything is registered
        monkeypatch.delenv("DR_IMAGE", raising=False)
        with pytest.raises(ConfigError, match=r"needs the worker image: set DR_IMAGE or \[fleet\] image"):
            build(cfg)
        monkeypatch.setenv("DR_IMAGE", "registry.example/dr-orchestrator:1.2.3")
        spec = build(cfg)
        assert {d.work_pool for d in spec.deployments} == {"dr-k8s-test"} and len(spec.deployments) == len(FLOWS)
        try:
            # one deployment is enough to see the pool and the Job it renders (each write costs ~1 s here)
            one = [d for d in spec.deployments if d.full_name == "data-loss/kube-production"]
            report = register(type(spec)(spec.fleet, spec.tag, spec.pool, tuple(one)), prune=False)
            assert report.pool_created and report.created == ["data-loss/kube-production"]
            deps = deployments_of("dr-fleet:tk8s")
            with get_client(sync_client=True) as client:
                pool = client.read_work_pool("dr-k8s-test")
            assert pool.type == "kubernetes"
            dl = deps["data-loss/kube-production"]
            assert dl.work_pool_name == "dr-k8s-test" and dl.parameters == {"service": "kube",
                                                                             "environment": "production"}
            vars_ = dl.job_variables
            assert vars_["image"] == "registry.example/dr-orchestrator:1.2.3" and vars_["backoff_limit"] == 0
            config = asyncio.run(KubernetesWorkerJobConfiguration.from_template_and_values(
                pool.base_job_template, vars_))
            manifest = config.job_manifest
            pod = manifest["spec"]["template"]["spec"]
            container = pod["containers"][0]
            assert manifest["metadata"]["namespace"] == "dr" and pod["serviceAccountName"] == "dr-orchestrator"
            assert container["image"] == "registry.example/dr-orchestrator:1.2.3"
            assert container["envFrom"] == [{"secretRef": {"name": "dr-orchestrator"}}]
            assert config.env["DR_CONFIG"] == "/etc/dr/dr.toml" and config.env["DR_AZURE_STATE_DIR"] == "/var/lib/dr"
            assert {v["name"]: v for v in pod["volumes"]}["dr-state"]["persistentVolumeClaim"]["claimName"] == "dr-state"
            assert manifest["spec"]["backoffLimit"] == 0
            stored = json.dumps(pool.base_job_template) + json.dumps(vars_)
            assert "PASSWORD" not in stored.replace("DR_AZURE_PG_PASSWORD, webhook URLs", "")
        finally:
            remove_fleet("dr-fleet:tk8s")


class TestPruning:
    def test_removing_a_service_removes_its_deployments_and_nothing_it_did_not_register(self, fleet):
        """Last in the module: it leaves the fleet without gamma."""
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.objects import StateType
        from prefect.states import Cancelled, State

        path, _ = fleet
        deps = deployments_of(TAG)
        with get_client(sync_client=True) as client:
            # a deployment a person made by hand for the same flow: not ours, never pruned
            handmade = client.create_deployment(flow_id=deps["data-loss/gamma-qa"].flow_id, name="gamma-handmade",
                                                entrypoint="flows/data_loss.py:data_loss", tags=["gamma"],
                                                work_pool_name="fleet33")
            # a recovery of gamma qa in progress: its deployment stays until the run has ended
            busy = client.create_flow_run_from_deployment(deps["restore-database/gamma-qa"].id)
            client.set_flow_run_state(busy.id, State(type=StateType.RUNNING), force=True)
        text = path.read_text()
        path.write_text(text[:text.index("[services.gamma.")])
        assert "gamma" not in load_config(path).services
        try:
            r = dr("deploy", "--config", str(path))
            assert r.returncode == 0, r.stdout + r.stderr
            left = set(deployments_of(TAG))
            gamma = {n for n in expected_names(SERVICES) if "/gamma-" in n}
            assert left & gamma == {"restore-database/gamma-qa"}
            assert f"kept restore-database/gamma-qa: its run {busy.name}" in r.stdout
            assert "pruned data-loss/gamma-production (no longer in the configuration)" in r.stdout
            assert {n for n in expected_names(SERVICES) if "/gamma-" not in n} <= left
            with get_client(sync_client=True) as client:
                assert client.read_deployment(handmade).name == "gamma-handmade"
                client.set_flow_run_state(busy.id, Cancelled(), force=True)
            # once the run has ended, the next deploy prunes it
            r = dr("deploy", "--config", str(path))
            assert "pruned restore-database/gamma-qa" in r.stdout, r.stdout
            assert not {n for n in deployments_of(TAG) if "/gamma-" in n}
        finally:
            with get_client(sync_client=True) as client:
                client.delete_deployment(handmade)
