"""Extensions on a server: `dr allow-extensions` (Azure's allow-list, `azure.extensions`)."""

from __future__ import annotations

from typing import Optional

import typer

from dr import output
from dr.cli.core import ConfigOpt, EnvOpt, ServiceOpt, _ctx, _run, app, use_prefect


@app.command("allow-extensions")
def allow_extensions_cmd(extensions: str = typer.Option(..., "--extensions", metavar="NAMES", help="Comma-separated, e.g. citext,pgcrypto."),
                         service: Optional[str] = ServiceOpt, env: Optional[str] = EnvOpt,
                         server: Optional[str] = typer.Option(None, "--server", metavar="NAME", help="The server (default: the environment's)."),
                         auto_approve: bool = typer.Option(False, "--auto-approve", help="Approve the gate yourself, now (refused for production)."),
                         config: Optional[str] = ConfigOpt) -> None:
    """Allow-list extensions on the server (Azure), so backups that use them restore; production asks for approval.

    Example: dr allow-extensions --env production --extensions citext,pgcrypto
    """

    def body() -> None:
        _, s, e, path = _ctx(config, service, env)
        use_prefect()  # before Prefect is imported: the run belongs on the command's server
        from flows.extensions import allow_extensions

        r = allow_extensions(s, e, extensions=extensions.split(","), server=server, auto_approve=auto_approve,
                             config_path=path)
        output.kv({"server": r["server"], "added": ", ".join(r["added"]) or "nothing (already allowed)",
                   "allow-list": ", ".join(r["allow_list"])})

    _run(body)
