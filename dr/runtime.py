"""What a task needs to act on one service environment, built from flow parameters.

Flow and task parameters stay plain strings (service, environment, config path) so that
they show in the Prefect UI and survive a worker restart; each task rebuilds the
configuration and backends from them (cached per process).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from dr.commands import PgTools, install_redaction
from dr.config import DrConfig, Target, load_config
from dr.pginstall import client_tools
from dr.platforms import get_platform
from dr.platforms.base import Platform


@dataclass(frozen=True)
class Runtime:
    config: DrConfig
    target: Target
    platform: Platform
    tools: PgTools

    @property
    def servers(self):
        return self.platform.servers

    @property
    def store(self):
        return self.platform.store

    @property
    def app(self):
        return self.platform.app


@lru_cache(maxsize=32)
def _load(config_path: str | None) -> DrConfig:
    return load_config(config_path)


def runtime(service: str, environment: str, config_path: str | None = None) -> Runtime:
    """Resolve config, target, backends and PostgreSQL tools for one service environment.

    Raises:
        ConfigError: unknown service/environment or invalid configuration.
    """
    install_redaction()
    config = _load(config_path)
    target = config.target(service, environment)
    return Runtime(config, target, get_platform(config, target), client_tools(config, target))


def clear_cache() -> None:
    _load.cache_clear()


@dataclass(frozen=True)
class Ref:
    """Which service environment a task acts on (plain strings, safe to pass between runs)."""

    service: str
    environment: str
    config_path: str | None = None

    def rt(self) -> Runtime:
        return runtime(self.service, self.environment, self.config_path)
