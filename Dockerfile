# syntax=docker/dockerfile:1
#
# Image for the MLflow -> Pushgateway / Pramathus exporter.
#
# Two stages:
#   builder  creates a virtualenv in /opt/venv, installs the image's locked
#            runtime dependencies from requirements-image.txt (every package
#            pinned with its hashes: pip refuses anything else), then the
#            project itself with --no-deps so nothing unpinned can sneak in.
#            The lock carries MLflow's client distribution, mlflow-skinny (the
#            version requirements.txt pins for the full mlflow), not the full
#            mlflow with its server, pyarrow, pandas, scipy and scikit-learn:
#            about 150 MB of venv instead of 860 MB. See requirements-image.in
#            for how to regenerate the lock.
#   runtime  copies only that virtualenv onto a clean python:3.11-slim and runs
#            it as an unprivileged user with a fixed UID (10001), so volume
#            ownership is predictable on every host.
#
# Both stages must use the same base image: the venv's interpreter symlink
# points at the base image's /usr/local/bin/python3.11.

FROM python:3.11-slim AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH="/opt/venv/bin:${PATH}"

WORKDIR /src

# Dependencies first: this layer is reused as long as the lock is unchanged.
COPY requirements-image.txt ./
RUN pip install --no-cache-dir --require-hashes -r requirements-image.txt

# Then the package (pyproject.toml declares readme = "README.md").
COPY pyproject.toml README.md ./
COPY exporter/ ./exporter/
RUN pip install --no-cache-dir --no-deps . \
    && pip check


FROM python:3.11-slim AS runtime

LABEL org.opencontainers.image.title="mlflow-monitoring exporter" \
      org.opencontainers.image.description="Polls MLflow, pushes Prometheus metrics to a Pushgateway and JSON to Pramathus" \
      org.opencontainers.image.licenses="MIT"

# Fixed UID/GID so the state volume can be pre-created or chowned on the host.
RUN groupadd --system --gid 10001 exporter \
    && useradd --system --uid 10001 --gid exporter \
        --home-dir /var/lib/exporter --no-create-home \
        --shell /usr/sbin/nologin exporter \
    && mkdir -p /var/lib/exporter /app \
    && chown exporter:exporter /var/lib/exporter \
    && chmod 0750 /var/lib/exporter

COPY --from=builder /opt/venv /opt/venv

ENV PATH="/opt/venv/bin:${PATH}" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    EXPORTER_STATE_DIR=/var/lib/exporter \
    EXPORTER_HOST=0.0.0.0 \
    EXPORTER_PORT=9877 \
    LOG_FORMAT=json

WORKDIR /app

# Spool, dead letters and cursors live here; mount a named volume over it.
VOLUME ["/var/lib/exporter"]

USER 10001:10001

# /metrics (exporter self-metrics) and /healthz.
EXPOSE 9877

# The slim image has no curl or wget: a stdlib check asks /healthz on loopback, over HTTPS
# when the web config turns TLS on (exporter/healthcheck.py).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-m", "exporter.healthcheck"]

ENTRYPOINT ["exporter"]
CMD ["continuous"]
