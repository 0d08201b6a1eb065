"""Notifications: the log always, plus Slack and Microsoft Teams incoming webhooks when configured.

Webhook URLs come from environment variables named in the configuration (or Prefect
Secret blocks loaded into them); they are secrets and never logged. A failed
notification is logged and never fails a recovery.
"""

from __future__ import annotations

import logging
import os

import httpx

from dr.commands import register_secret
from dr.config import DrConfig

log = logging.getLogger("dr.notify")


def webhook_urls(config: DrConfig) -> dict[str, str]:
    urls = {}
    for kind, var in (("slack", config.notifications.slack_webhook_env), ("teams", config.notifications.teams_webhook_env)):
        if var and os.environ.get(var):
            urls[kind] = os.environ[var]
            register_secret(urls[kind])
    return urls


def send(config: DrConfig, title: str, text: str, link: str | None = None) -> list[str]:
    """Send one message everywhere configured; returns the channels that accepted it."""
    body = f"{title}\n{text}" + (f"\n{link}" if link else "")
    log.warning("NOTIFY %s: %s%s", title, text, f" ({link})" if link else "")
    sent = ["log"]
    for kind, url in webhook_urls(config).items():
        payload = ({"text": body} if kind == "slack" else
                   {"@type": "MessageCard", "@context": "https://schema.org/extensions", "title": title,
                    "text": text + (f"\n\n[{link}]({link})" if link else "")})
        try:
            r = httpx.post(url, json=payload, timeout=10)
            r.raise_for_status()
            sent.append(kind)
        except httpx.HTTPError as exc:
            log.warning("could not notify %s: %s", kind, type(exc).__name__)
    return sent
