# syntax=docker/dockerfile:1
# The rr-consumer image: the relay (`run`, the default), plus `config check`, `emulator` and `produce-sample`.
#
#   docker build -t rr-consumer .
#   docker run --rm -v "$PWD/config.example.toml:/etc/rr-consumer/config.toml:ro" \
#       -e RR_KAFKA__BOOTSTRAP_SERVERS=kafka:9092 -e RR_API_KEY_DEMO=... rr-consumer
#
# Two stages: the first builds wheels (the project's and every pinned dependency's), the second installs
# them from that local directory only, so the runtime image carries no build tools, no sources and no
# pip cache, and installs exactly what the first stage resolved.

# ---------------------------------------------------------------------------------------------------------
FROM python:3.11-slim-bookworm AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /src
# Only what the wheel is built from: pyproject.toml names README.md as the long description, so the build
# fails without it. Tests, tools and local state stay out (see .dockerignore).
COPY pyproject.toml README.md ./
COPY consumer/ ./consumer/
RUN --mount=type=cache,target=/root/.cache/pip \
    pip wheel --wheel-dir /wheels .

# ---------------------------------------------------------------------------------------------------------
FROM python:3.11-slim-bookworm AS runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# The wheels are bind-mounted from the build stage rather than copied, so they never become a layer.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m venv /opt/venv \
    && pip install --no-cache-dir --no-index --find-links /wheels rr-consumer \
    && groupadd --system --gid 10001 rr \
    && useradd --system --uid 10001 --gid rr --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin rr \
    && mkdir -p /etc/rr-consumer

# The Avro reader schemas are read at run time; they are data next to the package, not inside the wheel.
# The relay finds them through RR_SCHEMAS_DIR (Settings.schemas_dir). Commands that do not read the
# configuration fall back to consumer.decode.SCHEMAS_DIR (<site-packages>/schemas for an installed
# package), so that path is linked to the same folder.
COPY schemas/ /app/schemas/
ENV RR_SCHEMAS_DIR=/app/schemas
RUN ln -s /app/schemas "$(python -c 'from consumer.decode import SCHEMAS_DIR; print(SCHEMAS_DIR)')" \
    && rr-consumer --version

# Metrics and health are served on this port (ObservabilityConfig.port); unset would turn them off and the
# HEALTHCHECK below would fail, so the image turns them on.
ENV RR_OBSERVABILITY__PORT=9100
EXPOSE 9100

WORKDIR /app
USER 10001:10001

# Shell form so ${RR_OBSERVABILITY__PORT} is read when the check runs: an override at `docker run -e` moves
# the check with the port. urllib raises (exit 1) on a refused connection, a timeout or a non-2xx answer.
# Containers started with another command (emulator, produce-sample) should override or disable this.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:${RR_OBSERVABILITY__PORT}/healthz', timeout=4)" || exit 1

# The relay stops on SIGTERM (the default stop signal): it drains in-flight records for up to
# delivery.shutdown_grace_s (20 s by default) and commits, so give `docker stop -t` more than that.
ENTRYPOINT ["rr-consumer"]
CMD ["run", "--config", "/etc/rr-consumer/config.toml"]
