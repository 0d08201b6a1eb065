"""The local stand-in for the service: a small web app, its worker, and an ingress.

Three kinds of process, each started with `python -P webapp.py ROLE`:

- `router`: the ingress. The main URL serves the app, or a 503 maintenance page while
  maintenance is on; the temporary URL always reaches the app (the runbook's temp ingress).
- `web`: the app. `/healthcheck` is 200 only when the database answers and holds data;
  `/` shows row counts and the latest applications.
- `worker`: a background worker that polls the database (read-only).

Each reads `apps/<key>/app.json` and the server's record in the state directory, so a
recreated server (new port) is found again, as the real app finds it by DNS name. The
database password is read from the state directory, never from argv.
"""

from __future__ import annotations

import argparse
import asyncio
import html
import json
import logging
import signal
import socket
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger("dr.local.webapp")

#: the user tables, each counted exactly by `count_rows` (one query per table: `query_to_xml` would
#: need a server built with libxml, which the embedded PostgreSQL is not)
TABLES_SQL = "SELECT schemaname, relname FROM pg_stat_user_tables ORDER BY 2, 1"

MAINTENANCE_PAGE = """<!doctype html><html><head><title>Service unavailable</title></head>
<body><h1>Sorry, the service is unavailable</h1>
<p>We are carrying out maintenance. You will be able to use the service later.</p></body></html>"""


class AppFiles:
    def __init__(self, state_dir: Path, key: str):
        self.state_dir, self.key = state_dir, key
        self.app_json = state_dir / "apps" / key / "app.json"

    def app(self) -> dict[str, Any]:
        return json.loads(self.app_json.read_text())

    def conn_kwargs(self) -> dict[str, Any]:
        app = self.app()
        sdir = self.state_dir / "servers" / app["server"]
        meta = json.loads((sdir / "server.json").read_text())
        return dict(host="127.0.0.1", port=meta["port"], user="dradmin", dbname=app["database"],
                    password=(sdir / "password").read_text().strip(), sslmode="disable", connect_timeout=3,
                    application_name=f"{self.key}-web")


def web_app(files: AppFiles):
    import psycopg
    from starlette.applications import Starlette
    from starlette.responses import HTMLResponse, JSONResponse
    from starlette.routing import Route

    def query(sql: str) -> list[tuple]:
        with psycopg.connect(**files.conn_kwargs()) as c:
            return c.execute(sql).fetchall()

    def count_rows() -> list[tuple[str, int]]:
        from psycopg.sql import SQL, Identifier

        with psycopg.connect(**files.conn_kwargs()) as c:
            return [(t, c.execute(SQL("SELECT count(*) FROM {}.{}").format(Identifier(s), Identifier(t))).fetchone()[0])
                    for s, t in c.execute(TABLES_SQL).fetchall()]

    async def healthcheck(request):
        try:
            rows = await asyncio.to_thread(
                query, "SELECT (SELECT count(*) FROM candidates), (SELECT count(*) FROM applications)")
        except Exception as exc:
            return JSONResponse({"status": "error", "database": "unreachable", "error": type(exc).__name__}, 503)
        cands, apps = rows[0]
        if cands == 0 or apps == 0:
            return JSONResponse({"status": "error", "database": "empty", "candidates": cands, "applications": apps}, 503)
        return JSONResponse({"status": "ok", "candidates": cands, "applications": apps})

    async def counts(request):
        try:
            rows = await asyncio.to_thread(count_rows)
        except Exception as exc:
            return JSONResponse({"error": type(exc).__name__}, 503)
        return JSONResponse(dict(rows))

    async def index(request):
        try:
            counts_rows = await asyncio.to_thread(count_rows)
            latest = await asyncio.to_thread(query, """
                SELECT a.id, c.first_name || ' ' || c.last_name, co.title, a.status, a.updated_at
                FROM applications a JOIN candidates c ON c.id = a.candidate_id JOIN courses co ON co.id = a.course_id
                ORDER BY a.updated_at DESC, a.id DESC LIMIT 5""")
        except Exception as exc:
            return HTMLResponse(f"<h1>Database error</h1><p>{html.escape(type(exc).__name__)}</p>", 503)
        rows = "".join(f"<tr><td>{html.escape(t)}</td><td>{n}</td></tr>" for t, n in counts_rows)
        lat = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r) + "</tr>" for r in latest)
        return HTMLResponse(
            f"<!doctype html><html><head><title>Apply for teacher training</title></head><body>"
            f"<h1>Apply for teacher training</h1><h2>Rows</h2><table id='counts'>{rows}</table>"
            f"<h2>Latest applications</h2><table id='latest'>{lat}</table></body></html>")

    return Starlette(routes=[Route("/healthcheck", healthcheck), Route("/api/counts", counts), Route("/", index)])


def router_app(files: AppFiles) -> Any:
    """The app's front door: the main URL (the maintenance page while maintenance is on) and the
    temporary URL (always the app, for checking it behind maintenance), told apart by the port."""
    import httpx
    from starlette.applications import Starlette
    from starlette.responses import HTMLResponse, Response
    from starlette.routing import Route

    client = httpx.AsyncClient(timeout=30)
    temp_port = files.app()["temp_port"]

    async def proxy(request):
        app = files.app()
        temp = request.scope["server"][1] == temp_port
        if not temp and app.get("maintenance"):
            return HTMLResponse(MAINTENANCE_PAGE, 503, headers={"x-dr-maintenance": "on", "Retry-After": "600"})
        url = f"http://127.0.0.1:{app['web_port']}{request.url.path}"
        if request.url.query:
            url += "?" + request.url.query
        try:
            r = await client.request(request.method, url, content=await request.body())
        except httpx.HTTPError:
            return HTMLResponse("<h1>502 Bad Gateway</h1><p>no app replica is running</p>", 502)
        return Response(r.content, r.status_code, media_type=r.headers.get("content-type"))

    return Starlette(routes=[Route("/{path:path}", proxy, methods=["GET", "POST", "HEAD"])])


def _serve(app: Any, ports: list[int]) -> None:
    """One uvicorn server on every port (one server per process, so a SIGTERM stops it at once)."""
    import uvicorn

    sockets = []
    for port in ports:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sockets.append(sock)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    asyncio.run(server.serve(sockets=sockets))


def _worker(files: AppFiles) -> None:
    import psycopg

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())  # ends the wait at once, not after the 2-s nap
    while not stop.is_set():
        try:
            with psycopg.connect(**files.conn_kwargs()) as c:
                c.execute("SELECT count(*) FROM applications WHERE status = 'submitted'").fetchone()
        except Exception as exc:  # the worker keeps polling until the database is back
            log.warning("worker: database unavailable: %s", type(exc).__name__)
        stop.wait(2)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="local stand-in app for dr-orchestrator")
    p.add_argument("role", choices=["router", "web", "worker"])
    p.add_argument("--state-dir", required=True, type=Path)
    p.add_argument("--key", required=True)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    files = AppFiles(a.state_dir, a.key)
    app = files.app()
    if a.role == "web":
        _serve(web_app(files), [app["web_port"]])
    elif a.role == "router":
        _serve(router_app(files), [app["main_port"], app["temp_port"]])
    else:
        _worker(files)


if __name__ == "__main__":
    main()
