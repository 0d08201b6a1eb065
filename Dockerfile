# The image of a Kubernetes work pool's flow runs (deployments/kubernetes.prefect.yaml).
# PostgreSQL client programs with SSL, at least the servers' major version, from apt.postgresql.org.
FROM python:3.11-slim-bookworm
ARG PG_MAJOR=16
RUN apt-get update && apt-get install -y --no-install-recommends curl ca-certificates gnupg zstd \
 && install -d /usr/share/postgresql-common/pgdg \
 && curl -fsSL https://www.postgresql.org/media/keys/ACCC4CF8.asc -o /usr/share/postgresql-common/pgdg/apt.postgresql.org.asc \
 && echo "deb [signed-by=/usr/share/postgresql-common/pgdg/apt.postgresql.org.asc] https://apt.postgresql.org/pub/repos/apt bookworm-pgdg main" \
      > /etc/apt/sources.list.d/pgdg.list \
 && apt-get update && apt-get install -y --no-install-recommends postgresql-client-${PG_MAJOR} \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/dr
COPY pyproject.toml README.md ./
COPY dr dr
COPY flows flows
COPY tasks tasks
COPY deployments deployments
RUN pip install --no-cache-dir '.[kubernetes-worker]'
RUN useradd --system --uid 10001 dr && install -d -o dr /var/lib/dr
USER dr
ENV DR_CONFIG=/etc/dr/dr.toml DR_AZURE_STATE_DIR=/var/lib/dr PREFECT_SERVER_ANALYTICS_ENABLED=false
# dr.toml must set [local] pg_bin_dir = "/usr/lib/postgresql/16/bin" (the client with SSL)
