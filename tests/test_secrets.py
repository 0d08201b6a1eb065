"""Secrets stay in their files: never on a command line, in a log, an artifact, a report, a sidecar or an error.

The live server's admin password is set to a known sentinel, and a Slack webhook (a local
receiver whose URL carries a second sentinel) is configured through the environment. A whole
data-loss scenario runs while a thread samples every process's command line (and the
environment of our own children) every 50 ms; afterwards every place a person or a tool can
read is searched for both sentinels.
"""

from __future__ import annotations

import http.server
import os
import stat
import subprocess
import sys
import tempfile
import threading
import traceback
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from dr.errors import DrError
from flows.backup import backup_database
from flows.data_loss import data_loss
from flows.restore import restore_database
from tests.faults.harness import descendants
from tests.helpers import make_env, utc_now, wait_a_second

pytestmark = pytest.mark.usefixtures("prefect_server")

PASSWORD = "DrSentinel-7f3c9a1e5b-NeverShown"
WEBHOOK_TOKEN = "HookSentinel-2b8d4e6f0a-NeverShown"
SENTINELS = (PASSWORD, WEBHOOK_TOKEN)
REPO = Path(__file__).resolve().parents[1]

#: what the password-file test needs from the scenario run (filled by the scenario test)
OBSERVED: dict = {}


@pytest.fixture(scope="module")
def secrets_env(base_dir):
    """A local platform whose config sends notifications to a Slack webhook named by an env variable."""
    env = make_env(base_dir, "secrets")
    with open(env.config_path, "a") as fh:
        fh.write('\n[notifications]\nslack_webhook_env = "DR_TEST_SLACK_WEBHOOK"\n')
    yield env
    env.discard()


class ProcWatcher(threading.Thread):
    """Samples /proc every `interval` seconds for the sentinels; also checks every passfile's mode."""

    def __init__(self, needles: tuple[str, ...], passfile_dir: Path, interval: float = 0.05):
        super().__init__(daemon=True, name="proc-watcher")
        self.needles = [n.encode() for n in needles]
        self.passfile_dir = passfile_dir
        self.interval = interval
        self.stop = threading.Event()
        self.samples = 0
        self.leaks: list[tuple[str, str, str]] = []  # (argv | environment, needle, which process)
        self.passfiles: dict[str, int] = {}

    def run(self) -> None:
        while not self.stop.is_set():
            self.scan()
            self.samples += 1
            self.stop.wait(self.interval)

    def scan(self) -> None:
        for p in Path("/proc").iterdir():
            if not p.name.isdigit():
                continue
            try:
                cmdline = (p / "cmdline").read_bytes()
            except OSError:
                continue
            for n in self.needles:
                if n in cmdline:
                    argv = cmdline.replace(b"\0", b" ")[:200].decode(errors="replace")
                    self.leaks.append(("argv", n.decode(), f"pid {p.name}: {argv}"))
        for pid, comm in descendants().items():
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes()
            except OSError:
                continue
            for n in self.needles:
                if n in environ:
                    self.leaks.append(("environment", n.decode(), f"pid {pid} ({comm})"))
        for f in self.passfile_dir.glob("dr-pass-*/pgpass"):
            try:
                self.passfiles[str(f)] = stat.S_IMODE(f.stat().st_mode)
            except OSError:
                pass

    def found(self, where: str, needle: str) -> list[str]:
        return sorted({who for w, n, who in self.leaks if w == where and n == needle})


class Webhook(http.server.ThreadingHTTPServer):
    """A local Slack: accepts every POST and keeps its body."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                outer.bodies.append(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}/services/T000/{WEBHOOK_TOKEN}"


@pytest.fixture
def webhook():
    hook = Webhook()
    th = threading.Thread(target=hook.serve_forever, daemon=True)
    th.start()
    yield hook
    hook.shutdown()
    hook.server_close()


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """This process's temporary directory (where passfiles are made), private to the test."""
    d = tmp_path / "tmp"
    d.mkdir()
    monkeypatch.setenv("TMPDIR", str(d))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    return d


def set_admin_password(env, password: str) -> None:
    """Give the live server's admin a known password, and the tool the file it reads it from."""
    env.query(f"ALTER ROLE dradmin PASSWORD '{password}'")
    path = env.platform.servers.servers_dir / env.target.server / "password"
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    with os.fdopen(fd, "w") as fh:
        fh.write(password + "\n")
    os.chmod(path, 0o600)


def prefect_records() -> list[str]:
    """Every artifact and every log line the Prefect server holds."""
    from prefect.client.orchestration import get_client

    out: list[str] = []
    with get_client(sync_client=True) as client:
        offset = 0
        while batch := client.read_artifacts(limit=200, offset=offset):
            out += [f"artifact {a.key}: {a.description} {a.data}" for a in batch]
            offset += len(batch)
        offset = 0
        while batch := client.read_logs(limit=200, offset=offset):
            out += [f"log {r.name}: {r.message}" for r in batch]
            offset += len(batch)
    return out


def prefect_database_bytes() -> bytes:
    """The Prefect server's SQLite database (and its WAL), where states, parameters and logs are kept."""
    import prefect.settings

    url = prefect.settings.PREFECT_SERVER_DATABASE_CONNECTION_URL.value() or ""
    if "sqlite" not in str(url):
        return b""
    path = Path(str(url).split(":///", 1)[1])
    return b"".join(p.read_bytes() for p in (path, Path(f"{path}-wal")) if p.exists())


def files_with(root: Path, needles: tuple[str, ...], *, skip=lambda p: False) -> list[str]:
    """Files under `root` that contain a needle (binary search; PostgreSQL data directories skipped)."""
    hits = []
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in ("data", "basebackups", "archive")]
        for f in files:
            p = Path(dirpath) / f
            if skip(p):
                continue
            try:
                raw = p.read_bytes()
            except OSError:
                continue
            if any(n.encode() in raw for n in needles):
                hits.append(str(p))
    return hits


def error_text(exc: BaseException) -> str:
    """The error as every reader sees it: str, repr, and the whole chained traceback."""
    return f"{exc}\n{exc!r}\n" + "".join(traceback.format_exception(exc))


def london(t) -> str:
    return t.astimezone(ZoneInfo("Europe/London")).strftime("%Y-%m-%d %H:%M:%S")


class TestAdminPasswordAndWebhook:
    def test_appear_nowhere_during_a_whole_data_loss_scenario_and_a_failed_restore(
            self, secrets_env, caplog, capsys, webhook, private_tmp, monkeypatch):
        import logging

        caplog.set_level(logging.INFO)
        caplog.set_level(logging.DEBUG, logger="dr")
        env = secrets_env
        monkeypatch.setenv("DR_TEST_SLACK_WEBHOOK", webhook.url)
        watcher = ProcWatcher(SENTINELS, private_tmp)
        try:
            env.up()
            set_admin_password(env, PASSWORD)
            env.query("CREATE TABLE markers (id int PRIMARY KEY)")
            env.query("INSERT INTO markers SELECT generate_series(1, 20)")
            wait_a_second()
            t = utc_now().replace(microsecond=0)
            wait_a_second()
            env.query("DELETE FROM markers WHERE id <= 10")

            watcher.start()
            r = data_loss(**env.kw(), restore_time=london(t), auto_approve=True, incident="inc-secrets")
            assert env.scalar("SELECT count(*) FROM markers") == 20  # the scenario really ran, with the sentinel

            # a deliberately failed run: restore a corrupted backup
            name = backup_database(**env.kw())["name"]
            path = env.platform.store.root / name
            raw = bytearray(path.read_bytes())
            raw[len(raw) // 2] ^= 0x40
            path.write_bytes(bytes(raw))
            with pytest.raises(DrError) as failed:
                restore_database(**env.kw(), backup=name, safety_backup=False)
        finally:
            watcher.stop.set()
            if watcher.is_alive():
                watcher.join(10)
            OBSERVED["ptr_server"] = locals().get("r", {}).get("ptr_server")

        assert webhook.bodies, "no notification reached the webhook: its URL was never exercised"
        assert watcher.samples > 20 and watcher.passfiles, "the watcher saw no passfile: it sampled nothing useful"
        OBSERVED["webhook in child environments"] = watcher.found("environment", WEBHOOK_TOKEN)
        on_argv = {s: watcher.found("argv", s) for s in SENTINELS if watcher.found("argv", s)}
        assert not on_argv, f"a secret was on a command line: {on_argv}"
        assert not watcher.found("environment", PASSWORD), "the password was in a child's environment"
        captured = capsys.readouterr()
        places = {
            "captured log records": caplog.text + "\n".join(rec.getMessage() for rec in caplog.records),
            "captured stdout/stderr": captured.out + captured.err,
            "Prefect artifacts and logs": "\n".join(prefect_records()),
            "the failed run's error": error_text(failed.value),
            "the report": Path(r["report"]).read_text(),
        }
        leaks = {where: [s for s in SENTINELS if s in text] for where, text in places.items()}
        db = prefect_database_bytes()
        leaks["the Prefect database"] = [s for s in SENTINELS if s.encode() in db]
        leaks["the backup store (sidecars and dumps)"] = files_with(env.platform.store.root, SENTINELS)
        leaks["the state directory (but the password files)"] = files_with(
            Path(env.config.local.state_dir), SENTINELS, skip=lambda p: p.name == "password")
        leaks["the reports directory"] = files_with(Path(r["report"]).parent, SENTINELS)
        leaks["PREFECT_HOME"] = files_with(Path(os.environ["PREFECT_HOME"]), SENTINELS)
        leaks = {k: v for k, v in leaks.items() if v}
        assert not leaks, f"a secret leaked: {leaks}"
        # passfiles were private while they existed, and none outlived its command
        assert all(mode == 0o600 for mode in watcher.passfiles.values()), watcher.passfiles
        assert not list(private_tmp.glob("dr-pass-*"))

    def test_password_files_stay_owned_by_the_tools_user(self, secrets_env):
        env = secrets_env
        if not OBSERVED.get("ptr_server"):
            pytest.skip("needs the scenario test's run")
        state = Path(env.config.local.state_dir).absolute()
        files = list(state.glob("servers/*/password")) + list(state.glob("dropped/*/*/password"))
        assert any(OBSERVED["ptr_server"] in str(f) for f in files), files
        wrong = {str(f): (f.stat().st_uid, oct(stat.S_IMODE(f.stat().st_mode))) for f in files
                 if f.stat().st_uid != os.geteuid() or stat.S_IMODE(f.stat().st_mode) != 0o600}
        assert not wrong, f"password files readable by someone else than uid {os.geteuid()}: {wrong}"

    def test_children_do_not_inherit_the_webhook_url(self):
        if "webhook in child environments" not in OBSERVED:
            pytest.skip("needs the scenario test's run")
        assert OBSERVED["webhook in child environments"] == []


class TestConfigCheck:
    def test_never_shows_a_webhook_url_set_in_the_environment(self, tmp_path):
        cfg = tmp_path / "dr.toml"
        cfg.write_text('[services.apply.environments.development]\nplatform = "local"\n'
                       '[notifications]\nslack_webhook_env = "DR_TEST_SLACK"\nteams_webhook_env = "DR_TEST_TEAMS"\n')
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path),
               "DR_TEST_SLACK": f"https://hooks.slack.example/services/T000/{WEBHOOK_TOKEN}",
               "DR_TEST_TEAMS": f"https://example.webhook.office.com/webhookb2/{WEBHOOK_TOKEN}-teams"}
        r = subprocess.run([sys.executable, "-m", "dr.cli", "config", "check", "--config", str(cfg)],
                           capture_output=True, text=True, env=env, cwd=REPO, timeout=120, check=False)
        assert r.returncode == 0, r.stderr
        assert WEBHOOK_TOKEN not in r.stdout + r.stderr
        assert "hooks.slack.example" not in r.stdout + r.stderr and "webhook.office.com" not in r.stdout + r.stderr
        assert r.stdout.count("set, redacted") == 2
