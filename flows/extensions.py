"""Allow-list extensions on a server, so that backups of databases that use them restore there.

On Azure, `CREATE EXTENSION` accepts only what the server parameter `azure.extensions` lists;
a restore of a database that uses another fails. This flow adds extensions to that list
through the configurations API, one change, behind the approval gate in production. The
local platform has no allow-list (an extension is there when its package is installed).
"""

from __future__ import annotations

import re
from datetime import datetime, timezone

from prefect import flow

from dr.errors import InvalidInput
from dr.runtime import Ref
from flows.approval import approve, check_approval_timeout, check_auto_approve
from flows.common import Timeline, run_logger
from tasks.servers import extension_support_task, set_server_parameters_task

#: the server parameter that holds Azure's allow-list
ALLOW_LIST = "azure.extensions"
EXTENSION_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


@flow(name="allow-extensions", log_prints=True)
def allow_extensions(service: str, environment: str, extensions: list[str], server: str | None = None,
                     auto_approve: bool = False, approval_timeout_minutes: int | None = None,
                     config_path: str | None = None) -> dict:
    """Add extensions to a server's allow-list (Azure: `azure.extensions`), keeping those already on it.

    Changes the world: one server parameter, set through Azure's configurations API (no restart);
    in production only after a person approves it. Nothing is removed from the list.

    Args:
        service: the service short name.
        environment: the environment.
        extensions: the extensions to allow, e.g. ["citext", "pgcrypto"].
        server: the server (default: the environment's).
        auto_approve: approve the gate (non-production only; refused for production).
        approval_timeout_minutes: how long the gate waits for a person (default from config).
        config_path: the configuration file.

    Raises:
        InvalidInput: a malformed name, a platform without an allow-list, or an extension the
            server does not offer at all (checked before anything changes).
    """
    check_approval_timeout(approval_timeout_minutes)
    ref = Ref(service, environment, config_path)
    t = ref.rt().target
    check_auto_approve(ref, auto_approve)
    names = sorted({e.strip().lower() for e in extensions if e.strip()})
    bad = [n for n in names if not EXTENSION_NAME.match(n)]
    if not names or bad:
        raise InvalidInput(f"give extension names (letters, digits, '_', '-'): {', '.join(bad) or 'none given'}")
    name = server or t.server
    support = extension_support_task(ref, name)
    if support.allow_list is None:
        raise InvalidInput(f"the {t.platform} platform has no extension allow-list: an extension is there when its "
                           "package is installed")
    unknown = support.missing(names)
    if unknown:
        raise InvalidInput(f"server {name} does not offer {', '.join(unknown)}: {support.install_fix}")
    adding = [n for n in names if n not in support.allow_list]
    if not adding:
        return {"server": name, "allow_list": sorted(support.allow_list), "added": []}
    value = ",".join(sorted(support.allow_list | set(adding))).upper()  # as Azure lists them
    if t.production:
        timeline = Timeline(f"allow-list extensions on {name}", f"allow-extensions-{service}-{environment}", t.timezone)
        approve(ref, timeline, gate="allow-list extensions", auto_approve=auto_approve,
                timeout_minutes=approval_timeout_minutes or t.approval_timeout_minutes,
                resume=f"dr allow-extensions --service {service} --env {environment} --extensions {','.join(names)}",
                what=f"set {ALLOW_LIST} on {name} to {value} (adds {', '.join(adding)})")
    change = set_server_parameters_task(ref, {ALLOW_LIST: value}, server=name)
    run_logger().info("%s on %s is now %s (added %s) at %s", ALLOW_LIST, name, value, ", ".join(adding),
                      datetime.now(timezone.utc).isoformat())
    return {"server": name, "allow_list": sorted(support.allow_list | set(adding)), "added": adding,
            "restarted": change.restarted}
