"""The monthly DR drill on the local platform."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dr.commands import PgTools
from dr.errors import InvalidInput, ValidationFailed
from flows.drill import dr_drill
from tests.helpers import make_env

pytestmark = pytest.mark.usefixtures("prefect_server")


def test_drill_runs_both_scenarios_and_reports_rto_rpo(live_env):
    r = dr_drill(**live_env.kw())
    assert r["passed"] and [x["scenario"] for x in r["results"]] == ["data-loss", "server-loss"]
    for x in r["results"]:
        assert x["ok"] and x["markers"] == {"keep": 25}
        assert isinstance(x["rto_seconds"], float) and x["rto_seconds"] > 0
        assert isinstance(x["rpo_seconds"], float) and x["rpo_seconds"] >= 0
    history = [json.loads(line) for line in Path(r["history"]).read_text().splitlines()]
    assert history[-1]["drill"] == r["drill"] and history[-1]["passed"]
    report = Path(r["report"]).read_text()
    assert "PASSED" in report and "Trend" in report


def test_a_broken_restore_fails_the_drill_and_says_why(live_env, tmp_path):
    # a PostgreSQL installation whose pg_restore is broken
    real = PgTools.default().bin_dir
    broken = live_env.root / "broken-bin"
    broken.mkdir()
    for p in real.iterdir():
        os.symlink(p, broken / p.name)
    (broken / "pg_restore").unlink()
    (broken / "pg_restore").write_text('#!/bin/sh\nif [ "$1" = "--version" ]; then echo "pg_restore (PostgreSQL) 18.1"; exit 0; fi\n'
                                       'echo "pg_restore: error: simulated failure" >&2\nexit 1\n')
    (broken / "pg_restore").chmod(0o755)
    cfg = Path(live_env.config_path)
    cfg.write_text(cfg.read_text().replace("[local]\n", f'[local]\npg_bin_dir = "{broken}"\n'))
    from dr.runtime import clear_cache

    clear_cache()
    try:
        with pytest.raises(ValidationFailed) as err:
            dr_drill(**live_env.kw(), scenario="data-loss")
        assert "simulated failure" in str(err.value) and "restore" in str(err.value)
        # nothing was half-applied: the damaged state is what the live database still holds
        assert live_env.scalar("SELECT count(*) FROM audit_events") == 0
    finally:
        clear_cache()


def test_drills_are_refused_for_production(base_dir):
    env = make_env(base_dir, "drill-prod", environment="production")
    with pytest.raises(InvalidInput, match="refused for production"):
        dr_drill(**env.kw())
    assert env.platform.servers.list_servers() == []
