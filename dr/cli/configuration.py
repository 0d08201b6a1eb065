"""`dr config`: check the configuration."""

from __future__ import annotations

import os
from typing import Optional


from dr import output
from dr.cli.core import ConfigOpt, _run, config_app
from dr.config import load_config


@config_app.command("check")
def config_check(config: Optional[str] = ConfigOpt) -> None:
    """Validate the configuration and print every resolved value and where it came from."""

    def body() -> None:
        cfg = load_config(config)
        output.say(f"configuration: {cfg.source} (valid)")
        output.say(f"prefix {cfg.prefix}, timezone {cfg.timezone}, local state {cfg.local.state_dir.absolute()}")
        for t in cfg.targets():
            output.say(f"\n{t.service} / {t.environment} ({t.env_short}){'  PRODUCTION' if t.production else ''}")
            rows = []
            for k, v in t.model_dump(exclude={"checks", "retention"}).items():
                src = t.sources.get(k, "derived")
                rows.append((k, "" if v is None else v, src))
            rows.append(("checks", ", ".join(c.kind + (f":{getattr(c, 'table', '')}" if hasattr(c, "table") else "")
                                             for c in t.checks), t.sources.get("checks", "default")))
            rows.append(("retention", f"{t.retention.daily}d/{t.retention.weekly}w/{t.retention.monthly}m",
                         t.sources.get("retention", "default")))
            output.table(rows, ["setting", "value", "from"])
        n = cfg.notifications
        for name, var in (("slack webhook", n.slack_webhook_env), ("teams webhook", n.teams_webhook_env)):
            if var:
                output.say(f"{name}: from ${var} ({'set, redacted' if os.environ.get(var) else 'NOT SET'})")

    _run(body)
