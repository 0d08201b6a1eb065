"""Bad input is refused before anything is touched, with a message that names what is wrong.

Three layers:

- property tests (Hypothesis) over the name validators: every name the configuration, the
  incident id or the backup store accepts matches its documented pattern exactly (so it can
  carry no SQL or shell metacharacter, space, unicode look-alike or newline), and every name
  it refuses is refused with the field named;
- property tests over restore times: explicit offsets and BST round-trip exactly, every
  ambiguous or skipped UK time is refused with candidates that are themselves valid answers;
- the flows, called with bad parameters on a real local platform: each refusal happens before
  any side effect (the world snapshot of tests/faults/harness.py is unchanged: no backup, no
  server, no database, the app as it was) and says what is wrong.

Cases already covered elsewhere are not repeated here: unknown environment and bad times of
data-loss (test_scenarios.py), PTR times outside the window (test_building_blocks.py,
tests/faults), production auto-approve and the typed environment name (test_scenarios.py),
alert payloads too large or malformed (test_alerts.py), bad config fields (test_config.py).
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from dr.config import DATABASE_NAME, K8S_LABEL, K8S_NAME, SERVER_NAME, SERVICE_NAME, parse_config
from dr.errors import BackupNotFound, ConfigError, DrError, InvalidInput, InvalidRestoreTime
from dr.incident import INCIDENT_ID, check_incident_id
from dr.platforms.local.store import NAME_RE as BACKUP_NAME, check_backup_name
from dr.timeparse import parse_restore_time

LONDON = ZoneInfo("Europe/London")

#: what an attacker or a slip of the keyboard types
NASTY = [
    '"; DROP DATABASE apply_production; --',
    "'; DROP TABLE candidates; --",
    "x; rm -rf /",
    "$(touch /tmp/dr-pwned)",
    "`touch /tmp/dr-pwned`",
    "a b",
    " apply",
    "apply ",
    "apply\n",
    "apply\nDROP",
    "ａｐｐｌｙ",  # full-width look-alike
    "applé",
    "apply\u200b",  # zero-width space
    "apply\x00",
    "",
    "a" * 300,
    "../../etc/passwd",
    "a/b",
    "a\\b",
    "-rf",
    "--help",
    "*",
    "a|b",
    "a&&b",
    "%(x)s",
    "{x}",
]
METACHARACTERS = set("\"'`;$()|&<>*?{}[]\\/ \t\r\n\x00")

names = st.one_of(
    st.sampled_from(NASTY),
    st.text(max_size=80),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.", max_size=70),
    st.builds(lambda a, b, c: a + b + c, st.sampled_from(["apply", "s189-apply-pd-pg", "apply_production", "ok"]),
              st.sampled_from(sorted(METACHARACTERS) + ["é", "\u200b", "\n"]), st.text(max_size=5)),
)


def toml_string(s: str) -> str:
    """A TOML basic string holding exactly `s` (JSON escapes, plus DEL, which TOML wants escaped)."""
    return json.dumps(s, ensure_ascii=False).replace("\x7f", "\\u007f")


def accepted_by(pattern: str, value: str) -> bool:
    return re.fullmatch(pattern, value) is not None


def assert_refused_naming(exc: BaseException, field: str) -> None:
    assert field in str(exc), f"the refusal does not name {field}: {exc}"


# --- 1. names in the configuration --------------------------------------------------------------


ENV_FIELDS = {
    "server": SERVER_NAME,
    "database": DATABASE_NAME,
    "admin_user": r"^[a-z_][a-z0-9_]{0,62}$",
    "storage_account": r"^[a-z0-9]{3,24}$",
    "container": r"^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$",
}


class TestConfigNames:
    @pytest.mark.parametrize("field", sorted(ENV_FIELDS))
    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(value=names)
    @example(value='x"; DROP DATABASE y; --')
    @example(value="apply\n")
    def test_an_environment_name_is_accepted_only_when_it_matches_its_pattern(self, field, value):
        text = f"[services.apply.environments.qa]\n{field} = {toml_string(value)}\n"
        pattern = ENV_FIELDS[field]
        try:
            cfg = parse_config(text, "dr.toml")
        except ConfigError as exc:
            assert not accepted_by(pattern, value), f"{value!r} is a valid {field} but was refused: {exc}"
            assert_refused_naming(exc, f"services.apply.environments.qa.{field}")
            assert str(exc).startswith("dr.toml: ")
            return
        assert accepted_by(pattern, value), f"{value!r} was accepted as {field}"
        assert not METACHARACTERS & set(value)
        assert getattr(cfg.target("apply", "qa"), field) == value

    @settings(max_examples=150, deadline=None)
    @given(value=names)
    @example(value="apply\n")
    @example(value="Apply")
    def test_a_service_name_is_accepted_only_when_it_matches_its_pattern(self, value):
        text = f"[services.{toml_string(value)}.environments.qa]\n"
        try:
            cfg = parse_config(text, "dr.toml")
        except ConfigError as exc:
            assert not accepted_by(SERVICE_NAME, value), f"{value!r} is a valid service name but was refused: {exc}"
            assert "services" in str(exc)
            return
        assert accepted_by(SERVICE_NAME, value), f"{value!r} was accepted as a service name"
        # the name goes into server, database and storage names and the recovery slot: all still valid
        t = cfg.target(value, "qa")
        assert accepted_by(SERVER_NAME, t.server) and accepted_by(DATABASE_NAME, t.database)

    @settings(max_examples=100, deadline=None)
    @given(value=names)
    def test_an_environment_key_other_than_the_known_ones_is_refused(self, value):
        assume(value not in ("development", "test", "qa", "review", "preproduction", "production"))
        with pytest.raises(ConfigError) as err:
            parse_config(f"[services.apply.environments.{toml_string(value)}]\n", "dr.toml")
        assert "unknown environment" in str(err.value) and "accepted: development" in str(err.value)

    @pytest.mark.parametrize("field, pattern", [("namespace", K8S_LABEL), ("web_deployment", K8S_NAME)])
    @settings(max_examples=100, deadline=None)
    @given(value=names)
    def test_kubernetes_names_are_accepted_only_when_valid(self, field, pattern, value):
        other = {"namespace": "bat-qa", "web_deployment": "apply-qa"}
        other[field] = value
        text = ('[services.apply.environments.qa]\napp = "kubernetes"\n'
                + "".join(f"{k} = {toml_string(v)}\n" for k, v in other.items()))
        try:
            parse_config(text, "dr.toml")
        except ConfigError as exc:
            assert not (accepted_by(pattern, value) and len(value) <= 253), f"{value!r} refused: {exc}"
            assert_refused_naming(exc, f"services.apply.environments.qa.{field}")
            return
        assert accepted_by(pattern, value), f"{value!r} was accepted as {field}"

    def test_a_name_too_long_for_postgresql_is_refused(self):
        with pytest.raises(ConfigError, match="services.apply.environments.qa.database"):
            parse_config(f'[services.apply.environments.qa]\ndatabase = "{"a" * 64}"\n', "dr.toml")

    @pytest.mark.parametrize("text, field", [
        ('prefix = 189\n[services.apply.environments.qa]\n', "prefix"),
        ('[services.apply.environments.qa]\nrpo_minutes = "soon"\n', "rpo_minutes"),
        ('[services.apply.environments.qa]\nrpo_minutes = -5\n', "rpo_minutes"),
        ('[services.apply.environments.qa]\napproval_timeout_minutes = 0\n', "approval_timeout_minutes"),
        ('[services.apply.environments.qa]\nrecovery_slot_wait_minutes = 0\n', "recovery_slot_wait_minutes"),
        ('[services.apply.environments.qa]\nproduction = "no"\n', "production"),
        ('[services.apply.environments.qa]\nchecks = "healthcheck"\n', "checks"),
        ('[services.apply.environments.qa]\nretention = { daily = 0 }\n', "retention.daily"),
        ('[services.apply.environments.qa]\nserver = ""\n', "server"),
        ('[services.apply.environments.qa]\ndatabase = ""\n', "database"),
        ('[services.apply.environments.qa]\nchecks = [{ kind = "row_count", table = "x; DROP TABLE y" }]\n',
         "checks[0].table"),
        ('[services.apply.environments.qa]\nchecks = [{ kind = "latest_record", table = "t", column = "c\\"--", '
         'max_age_hours = 1 }]\n', "checks[0].column"),
        ('[local]\narchive_timeout_seconds = 0\n[services.apply.environments.qa]\n', "local.archive_timeout_seconds"),
        ('[alerts]\ntoken_env = "my token"\n[services.apply.environments.qa]\n', "alerts.token_env"),
        ('[alerts]\nmax_body_bytes = 0\n[services.apply.environments.qa]\n', "alerts.max_body_bytes"),
        ('[notifications]\nslack_webhook_env = "https://hooks.slack.com/x"\n[services.apply.environments.qa]\n',
         "notifications.slack_webhook_env"),
        ('services = {}\n', "services"),
    ])
    def test_wrong_types_and_empty_values_are_refused_naming_the_field(self, text, field):
        with pytest.raises(ConfigError) as err:
            parse_config(text, "dr.toml")
        assert_refused_naming(err.value, field)
        assert err.value.exit_code == 2


# --- 2. names given to the flows: incident ids and backup names ---------------------------------


class TestIncidentAndBackupNames:
    @settings(max_examples=300, deadline=None)
    @given(value=names)
    @example(value="x; rm -rf /")
    def test_an_incident_id_is_accepted_only_when_it_matches_its_pattern(self, value):
        try:
            got = check_incident_id(value)
        except InvalidInput as exc:
            assert "incident id" in str(exc)
            return
        assert got == value and accepted_by(INCIDENT_ID.pattern, value)
        assert not METACHARACTERS & set(value)

    @settings(max_examples=300, deadline=None)
    @given(value=names)
    @example(value="../../etc/passwd")
    @example(value="x.meta.json")
    def test_a_backup_name_is_accepted_only_when_it_is_safe_for_a_path_and_a_shell(self, value):
        try:
            check_backup_name(value)
        except InvalidInput as exc:
            assert "invalid backup name" in str(exc)
            return
        assert accepted_by(BACKUP_NAME, value) and ".." not in value
        assert not METACHARACTERS & set(value)

    def test_a_trailing_newline_is_not_a_valid_incident_id(self):
        with pytest.raises(InvalidInput):
            check_incident_id("inc-42\n")

    def test_a_trailing_newline_is_not_a_valid_backup_name(self):
        with pytest.raises(InvalidInput):
            check_backup_name("apply_dv_2026-07-01.sql.gz\n")


# --- 3. restore times ------------------------------------------------------------------------------


aware_times = st.datetimes(min_value=datetime(1991, 1, 1), max_value=datetime(2098, 12, 31)).map(
    lambda d: d.replace(microsecond=0))
offsets = st.integers(min_value=-14 * 60, max_value=14 * 60).map(lambda m: timedelta(minutes=m))


def _offset_text(off: timedelta) -> str:
    minutes = int(off.total_seconds() // 60)
    sign = "+" if minutes >= 0 else "-"
    return f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


def _clock_change_days(year: int) -> tuple[datetime, datetime]:
    """The last Sundays of March and October (when the UK clocks change)."""
    def last_sunday(month: int) -> datetime:
        d = datetime(year, month, 31)
        return d - timedelta(days=(d.weekday() + 1) % 7)
    return last_sunday(3), last_sunday(10)


class TestRestoreTimeProperties:
    @settings(max_examples=300, deadline=None)
    @given(local=aware_times, off=offsets, sep=st.sampled_from([" ", "T"]), colon=st.booleans())
    def test_an_explicit_offset_round_trips_exactly(self, local, off, sep, colon):
        text_off = _offset_text(off) if colon else _offset_text(off).replace(":", "")
        text = f"{local:%Y-%m-%d}{sep}{local:%H:%M:%S}{text_off}"
        got = parse_restore_time(text)
        assert got.tzinfo == UTC
        assert got == local.replace(tzinfo=timezone(off))
        assert got.astimezone(timezone(off)).replace(tzinfo=None) == local

    @settings(max_examples=100, deadline=None)
    @given(local=aware_times, suffix=st.sampled_from(["BST", "bst", " BST"]))
    def test_bst_means_one_hour_ahead_of_utc_whatever_the_date(self, local, suffix):
        got = parse_restore_time(f"{local:%Y-%m-%d %H:%M:%S}{suffix}")
        assert got == (local - timedelta(hours=1)).replace(tzinfo=UTC)

    @settings(max_examples=150, deadline=None)
    @given(year=st.integers(1996, 2098), minute=st.integers(0, 59), second=st.integers(0, 59))
    def test_every_repeated_uk_time_is_refused_with_two_candidates_that_are_both_that_time(self, year, minute, second):
        _, october = _clock_change_days(year)
        naive = october.replace(hour=1, minute=minute, second=second)
        with pytest.raises(InvalidRestoreTime, match="happened twice") as err:
            parse_restore_time(f"{naive:%Y-%m-%d %H:%M:%S}")
        candidates = re.findall(r"(\d\d:\d\d:\d\d) UTC", str(err.value))
        assert len(candidates) == 2
        for c, off in zip(candidates, ("+01:00", "+00:00")):
            as_utc = datetime.fromisoformat(f"{naive:%Y-%m-%d}T{c}+00:00")
            assert as_utc.astimezone(LONDON).replace(tzinfo=None) == naive  # each is a real reading of the clock
            assert parse_restore_time(f"{naive:%Y-%m-%d %H:%M:%S}{off}") == as_utc  # and typing it so is accepted

    @settings(max_examples=150, deadline=None)
    @given(year=st.integers(1996, 2098), minute=st.integers(0, 59), second=st.integers(0, 59))
    def test_every_skipped_uk_time_is_refused_and_the_suggestions_are_accepted(self, year, minute, second):
        march, _ = _clock_change_days(year)
        naive = march.replace(hour=1, minute=minute, second=second)
        with pytest.raises(InvalidRestoreTime, match="does not exist") as err:
            parse_restore_time(f"{naive:%Y-%m-%d %H:%M:%S}")
        suggestions = re.findall(r"'(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d[+-]\d\d:\d\d)'", str(err.value))
        assert len(suggestions) == 2
        got = {parse_restore_time(s) for s in suggestions}
        assert len(got) == 2 and all(t.tzinfo == UTC for t in got)

    @pytest.mark.parametrize("text, zone, words", [
        ("1970-01-01 00:00", "Europe/London", "before 1990"),
        ("1970-01-01 00:00Z", "Europe/London", "before 1990"),
        ("0", "Europe/London", "cannot read"),
        ("1782912600", "Europe/London", "cannot read"),  # a Unix timestamp
        ("", "Europe/London", "cannot read"),
        ("   ", "Europe/London", "cannot read"),
        ("2026-02-30 10:00", "Europe/London", "not a real date"),
        ("2026-07-01 24:00", "Europe/London", "not a real date"),
        ("2026-07-01 14:30+25:00", "Europe/London", "not a real UTC offset"),
        ("2026-07-01 14:30+05:75", "Europe/London", "not a real UTC offset"),
        ("9999-12-31 23:59-01:00", "Europe/London", "out of range"),
        ("2026-07-01 14:30", "Mars/Olympus", "unknown time zone"),
        ("2026-07-01 14:30", "../../etc/passwd", "unknown time zone"),
        ("2026-07-01 14:30", "", "unknown time zone"),
        ("01/07/2026 14:30", "Europe/London", "cannot read"),
        ("2026-07-01 14:30; DROP DATABASE x", "Europe/London", "cannot read"),
        ("$(date)", "Europe/London", "cannot read"),
    ])
    def test_malformed_epoch_and_impossible_times_are_refused_clearly(self, text, zone, words):
        with pytest.raises(InvalidRestoreTime, match=re.escape(words)):
            parse_restore_time(text, zone)

    @settings(max_examples=200, deadline=None)
    @given(text=st.text(max_size=40), zone=st.one_of(st.sampled_from(["Europe/London", "UTC", "America/New_York"]),
                                                      st.text(max_size=20)))
    def test_any_text_in_any_zone_is_refused_only_with_invalid_restore_time(self, text, zone):
        try:
            parse_restore_time(text, zone)
        except InvalidRestoreTime:
            pass


# --- 4. the flows, called with bad parameters on a real local platform -----------------------------

PWNED = Path("/tmp/dr-pwned")


@pytest.fixture(scope="module")
def bad_env(base_dir, prefect_server):
    """One local platform with one good backup; every refusal must leave it exactly as it was."""
    from flows.backup import backup_database
    from tests.helpers import make_env

    env = make_env(base_dir, "bad-input")
    env.up()
    env.good_backup = backup_database(**env.kw())["name"]
    yield env
    env.discard()


class World:
    """The world before a call, to compare with after it (tests/faults/harness.py)."""

    def __init__(self, env):
        from tests.faults.harness import snapshot

        self.env, self.snapshot = env, snapshot
        self.before, self.app_before = snapshot(env), env.platform.app.get_status()

    def assert_untouched(self) -> None:
        from tests.faults.harness import assert_nothing_lost

        assert_nothing_lost(self.before, self.snapshot(self.env))
        assert self.env.platform.app.get_status() == self.app_before
        assert not PWNED.exists(), "a shell ran a name as a command"


def refused(env, flow, error, words, **kw) -> DrError | BaseException:
    world = World(env)
    with pytest.raises(error, match=words) as err:
        flow(**kw)
    world.assert_untouched()
    return err.value


class TestFlowParameters:
    @pytest.mark.parametrize("backup, error, words", [
        ("apply_dv_adhoc_20200101T000000Z.pgdump.zst", BackupNotFound, "apply_dv_adhoc_20200101T000000Z"),
        ('"; DROP DATABASE apply_development; --', InvalidInput, "invalid backup name"),
        ("$(touch /tmp/dr-pwned)", InvalidInput, "invalid backup name"),
        ("`touch /tmp/dr-pwned`", InvalidInput, "invalid backup name"),
        ("../../../etc/passwd", InvalidInput, "invalid backup name"),
        ("x.meta.json", InvalidInput, "invalid backup name"),
        ("a b", InvalidInput, "invalid backup name"),
    ])
    def test_a_backup_that_does_not_exist_or_a_bad_name_restores_nothing(self, bad_env, backup, error, words):
        from flows.restore import restore_database

        exc = refused(bad_env, restore_database, error, re.escape(words), **bad_env.kw(), backup=backup)
        assert "nothing was changed" in str(exc)

    @pytest.mark.parametrize("server", ['x"; DROP DATABASE apply_development; --', "../../../tmp", "no-such-pg"])
    def test_a_bad_or_unknown_server_restores_nothing(self, bad_env, server):
        from dr.errors import ServerNotFound
        from flows.restore import restore_database

        refused(bad_env, restore_database, (ServerNotFound, InvalidInput), "server", **bad_env.kw(),
                backup=bad_env.good_backup, server=server)

    @pytest.mark.parametrize("label", ["x; rm -rf /", "$(touch /tmp/dr-pwned)", "../up", "a b"])
    def test_a_backup_label_that_is_not_a_safe_name_stores_nothing(self, bad_env, label):
        from flows.backup import backup_database

        refused(bad_env, backup_database, InvalidInput, "invalid backup name", **bad_env.kw(), label=label)

    @pytest.mark.parametrize("flow_name, kw", [
        ("restore", {"jobs": "many"}),
        ("restore", {"safety_backup": "maybe"}),
        ("backup", {"kind": "weekly"}),
        ("backup", {"backup_format": "tar"}),
        ("data_loss", {"auto_approve": "perhaps", "restore_time": "2026-11-01 12:00"}),
    ])
    def test_wrong_types_are_refused_by_the_flow_signature_before_it_runs(self, bad_env, flow_name, kw):
        from prefect.exceptions import ParameterTypeError

        from flows.backup import backup_database
        from flows.data_loss import data_loss
        from flows.restore import restore_database

        flow = {"restore": restore_database, "backup": backup_database, "data_loss": data_loss}[flow_name]
        exc = refused(bad_env, flow, ParameterTypeError, None, **bad_env.kw(), **kw)
        assert next(iter(kw)) in str(exc), f"the refusal does not name the parameter: {exc}"

    @pytest.mark.parametrize("service, environment, words", [
        ("nosuch", "development", "unknown service 'nosuch'; configured: apply"),
        ("", "development", "unknown service ''"),
        ("apply", "", "unknown environment ''"),
        ("apply; rm -rf /", "development", "unknown service"),
        ("apply", "development\n", "unknown environment"),
    ])
    def test_an_unknown_or_empty_service_or_environment_is_refused_naming_it(self, bad_env, service, environment,
                                                                             words):
        from flows.data_loss import data_loss
        from flows.restore import restore_database

        for flow, extra in ((restore_database, {}), (data_loss, {"restore_time": "2026-11-01 12:00"})):
            exc = refused(bad_env, flow, ConfigError, re.escape(words), service=service, environment=environment,
                          config_path=bad_env.config_path, **extra)
            assert exc.field in ("service", "environment")

    @pytest.mark.parametrize("restore_time, zone, words", [
        ("1970-01-01 00:00", None, "before 1990"),
        ("0", None, "cannot read"),
        ("2026-11-01 12:00+25:00", None, "not a real UTC offset"),
        ("2026-11-01 12:00", "Mars/Olympus", "unknown time zone"),
        ("", None, "cannot read"),
    ])
    def test_an_epoch_malformed_or_zoneless_ptr_time_creates_no_server(self, bad_env, restore_time, zone, words):
        from flows.ptr import point_in_time_restore

        exc = refused(bad_env, point_in_time_restore, InvalidRestoreTime, re.escape(words), **bad_env.kw(),
                      restore_time=restore_time, timezone_name=zone)
        assert "nothing was changed" in str(exc)


class TestFlowParametersRefused:
    """Bad parameters of the building-block flows, refused before anything is touched."""

    def test_a_database_name_with_metacharacters_is_refused_before_anything(self, bad_env):
        from flows.restore import restore_database

        refused(bad_env, restore_database, InvalidInput, "database", **bad_env.kw(), backup=bad_env.good_backup,
                database='x"; DROP DATABASE apply_development; --')

    def test_an_empty_backup_name_is_refused_not_taken_as_the_newest(self, bad_env):
        from flows.restore import restore_database

        refused(bad_env, restore_database, InvalidInput, "backup", **bad_env.kw(), backup="")

    def test_zero_restore_jobs_is_refused_before_the_safety_backup(self, bad_env):
        from flows.restore import restore_database

        refused(bad_env, restore_database, InvalidInput, "jobs", **bad_env.kw(), backup=bad_env.good_backup, jobs=0)

    def test_a_negative_approval_timeout_is_refused_before_anything(self, bad_env):
        from flows.data_loss import data_loss

        refused(bad_env, data_loss, InvalidInput, "approval_timeout_minutes", **bad_env.kw(),
                restore_time=datetime.now(LONDON).strftime("%Y-%m-%d %H:%M"), approval_timeout_minutes=-1)
