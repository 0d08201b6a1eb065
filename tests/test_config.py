"""Configuration: good files load with conventions applied; bad ones fail naming the field."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dr.config import load_config, parse_config
from dr.errors import ConfigError

GOOD = """
prefix = "s189"
[services.apply.environments.production]
platform = "azure"
subscription_id = "00000000-0000-0000-0000-000000000001"
resource_group = "s189p01-att-pd-rg"
[services.apply.environments.qa]
server = "custom-qa-pg"
"""


class TestGoodConfig:
    def test_conventions_fill_the_names(self):
        cfg = parse_config(GOOD, "dr.toml")
        t = cfg.target("apply", "production")
        assert t.server == "s189-apply-pd-pg"
        assert t.database == "apply_production"
        assert t.storage_account == "s189applydbbkppdsa"
        assert t.container == "database-backup"
        assert t.production is True
        assert t.sources["server"] == "default"

    def test_explicit_values_win_and_are_marked_from_file(self):
        t = parse_config(GOOD).target("apply", "qa")
        assert t.server == "custom-qa-pg"
        assert t.sources["server"] == "file"
        assert t.production is False

    def test_nightly_name_matches_existing_tooling(self):
        from datetime import date

        t = parse_config(GOOD).target("apply", "production")
        assert t.nightly_backup_name(date(2026, 11, 25)) == "apply_pd_2026-11-25.sql.gz"

    def test_builtin_config_without_file(self, tmp_path, monkeypatch):
        monkeypatch.chdir(tmp_path)
        cfg = load_config()
        assert cfg.source == "<built-in>"
        assert cfg.target("apply", "development").platform == "local"


class TestBadConfig:
    @pytest.mark.parametrize("text, field, words", [
        ('[services.apply.environments.prod]\n', "services.apply.environments", "unknown environment 'prod'"),
        ('[services.apply.environments.qa]\nserver = "Bad_Name"\n', "services.apply.environments.qa.server", "pattern"),
        ('[services.apply.environments.qa]\nsever = "x-pg"\n', "services.apply.environments.qa.sever", "unknown key"),
        ('[services.apply.environments.qa]\nplatform = "aws"\n', "services.apply.environments.qa.platform", "'local' or 'azure'"),
        ('[services.apply.environments.production]\nplatform = "azure"\n', "", "needs subscription_id and resource_group"),
        ('prefix = "s189"\n', "services", "required field is missing"),
        ('timezone = "Mars/Olympus"\n[services.apply.environments.qa]\n', "timezone", "unknown time zone"),
        ('[services.apply.environments.qa]\nchecks = [{kind = "row_count"}]\n',
         "services.apply.environments.qa.checks[0].table", "missing"),
        ('[local]\nwal_segment_mb = 3\n[services.apply.environments.qa]\n', "local.wal_segment_mb", "power of 2"),
    ])
    def test_fails_naming_the_field(self, text, field, words):
        with pytest.raises(ConfigError) as err:
            parse_config(text, "dr.toml")
        msg = str(err.value)
        assert msg.startswith("dr.toml: ")
        assert field in msg
        assert words in msg

    @pytest.mark.parametrize("name", ["ab", "a" * 64, "a--b", "-ab", "ab-", "a.b"])
    def test_server_names_azure_refuses_are_refused_at_load(self, name):
        # Azure: 3-63 letters, digits and single hyphens, neither first nor last
        with pytest.raises(ConfigError, match=r"services\.apply\.environments\.qa\.server.*pattern"):
            parse_config(f'[services.apply.environments.qa]\nserver = "{name}"\n', "dr.toml")

    @pytest.mark.parametrize("name", ["abc", "a" * 63, "Apply-PD-1", "s189-apply-pd-pg"])
    def test_server_names_azure_accepts_load(self, name):
        assert parse_config(f'[services.apply.environments.qa]\nserver = "{name}"\n').target("apply", "qa").server == name

    def test_unknown_environment_at_lookup(self):
        with pytest.raises(ConfigError, match="unknown environment 'staging'.*configured: production, qa"):
            parse_config(GOOD).target("apply", "staging")

    def test_unknown_service_at_lookup(self):
        with pytest.raises(ConfigError, match="unknown service 'find'"):
            parse_config(GOOD).target("find", "qa")

    def test_not_toml(self):
        with pytest.raises(ConfigError, match="not valid TOML"):
            parse_config("services = [", "dr.toml")


class TestConfigCheckCommand:
    def test_bad_config_prints_one_line_naming_the_field(self, tmp_path):
        p = tmp_path / "dr.toml"
        p.write_text('[services.apply.environments.qa]\nserver = "Bad_Name"\n')
        r = subprocess.run([sys.executable, "-m", "dr.cli", "config", "check", "--config", str(p)],
                           capture_output=True, text=True)
        assert r.returncode == 2
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1, r.stderr
        assert "services.apply.environments.qa.server" in lines[0]

    def test_good_config_shows_resolved_values_and_sources(self, tmp_path):
        p = tmp_path / "dr.toml"
        p.write_text(GOOD + '\n[notifications]\nslack_webhook_env = "DR_TEST_SLACK"\n')
        env = {"DR_TEST_SLACK": "https://hooks.slack.example/T000/SECRET-TOKEN-123", "PATH": "/usr/bin:/bin"}
        r = subprocess.run([sys.executable, "-m", "dr.cli", "config", "check", "--config", str(p)],
                           capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr
        assert "s189-apply-pd-pg" in r.stdout and "default" in r.stdout and "custom-qa-pg" in r.stdout
        assert "SECRET-TOKEN-123" not in r.stdout
        assert "set, redacted" in r.stdout
