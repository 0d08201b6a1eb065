"""Tasks that publish the post-incident report (artifact + file)."""

from __future__ import annotations

import os
from pathlib import Path

from prefect.artifacts import create_markdown_artifact

from dr.runtime import Ref
from tasks.common import dr_task


@dr_task(retries=1)
def publish_report(ref: Ref, incident: str, markdown: str) -> str:
    """Publish the report as a markdown artifact and write it to the reports directory; returns the file."""
    create_markdown_artifact(key=f"report-{incident}", markdown=markdown, description=f"post-incident report {incident}")
    rdir = Path(ref.rt().config.reports_dir)
    if not rdir.is_absolute() and ref.config_path:
        rdir = Path(ref.config_path).parent / rdir
    rdir.mkdir(parents=True, exist_ok=True)
    path = rdir / f"{incident}.md"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(markdown)
    os.replace(tmp, path)
    return str(path)
