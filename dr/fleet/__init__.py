"""The fleet: every service and environment of one `dr.toml`, deployed, scheduled and watched.

- `spec`: the deployments the configuration asks for (`<flow>/<service>-<environment>`), with
  their parameters, run forms, schedules, queues and concurrency; also as a prefect.yaml.
- `register`: puts them on a Prefect server through its API (`dr deploy`): the work pool and
  its queues, unchanged deployments skipped, what an earlier `dr deploy` registered and the
  configuration no longer names pruned.
- `board`: the DR readiness board (`dr status`, the `dr-readiness` artifact), read from the
  backup stores, the servers and Prefect's API, one query per kind of fact.
- `alerts`: what the hourly `fleet-check` flow notifies, once per problem and once when it clears.
"""

#: the tag of every deployment `dr deploy` registered for a fleet: `dr-fleet:<fleet name>`
FLEET_TAG_PREFIX = "dr-fleet:"
#: the work queues whose concurrency limits are the fleet's limits
BACKUP_QUEUE = "backups"
DRILL_QUEUE = "drills"
#: the key of the board artifact
READINESS_KEY = "dr-readiness"


def fleet_name(config: "object") -> str:
    """`[fleet] name`, default the naming prefix."""
    return getattr(config.fleet, "name", None) or config.prefix  # type: ignore[attr-defined]


def fleet_tag(config: "object") -> str:
    return FLEET_TAG_PREFIX + fleet_name(config)
