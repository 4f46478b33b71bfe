# syntax=docker/dockerfile:1
# The rr-consumer image: the relay (`run`, the default), `config check`, `replay` and `dlq`.
#
#   docker build -t rr-consumer .                  # the production image (target `runtime`, the default)
#   docker build --target dev -t rr-consumer-dev .  # plus the development tools: `emulator`, `produce-sample`
#   docker run --rm -v "$PWD/config.example.toml:/etc/rr-consumer/config.toml:ro" \
#       -e RR_KAFKA__BOOTSTRAP_SERVERS=kafka:9092 -e RR_API_KEY_DEMO=... rr-consumer
#
# The first stage builds wheels (the project's and every pinned dependency's; the development tools' apart),
# `base` installs the runtime's from that local directory only, so an image carries no build tools, no
# sources and no pip cache, and installs exactly what the first stage resolved. `dev` adds the development
# tools (rr-consumer-dev) for the Compose stack's emulator and traffic generator; `runtime`, the last stage
# and so the default, is `base` as it is: the production image has no development module in it.

# ---------------------------------------------------------------------------------------------------------
FROM python:3.11-slim-bookworm AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /src
# Only what the wheels are built from: pyproject.toml names README.md as the long description, so the build
# fails without it. Tests, tools and local state stay out (see .dockerignore).
COPY pyproject.toml README.md ./
COPY consumer/ ./consumer/
COPY dev/ ./dev/
RUN --mount=type=cache,target=/root/.cache/pip \
    pip wheel --wheel-dir /wheels . \
    && pip wheel --no-deps --wheel-dir /wheels-dev ./dev

# ---------------------------------------------------------------------------------------------------------
FROM python:3.11-slim-bookworm AS base

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
    && mkdir -p /etc/rr-consumer \
    && rr-consumer --version
# The Avro reader schemas are package data in the wheel (consumer/schemas/): nothing to copy or point at.

# Metrics and health are served on this port (ObservabilityConfig.port); unset would turn them off and the
# HEALTHCHECK below would fail, so the image turns them on.
ENV RR_OBSERVABILITY__PORT=9100
EXPOSE 9100

WORKDIR /app
USER 10001:10001

# Shell form so ${RR_OBSERVABILITY__PORT} is read when the check runs: an override at `docker run -e` moves
# the check with the port. urllib raises (exit 1) on a refused connection, a timeout or a non-2xx answer.
# Containers started with another command (the dev image's emulator, produce-sample) should override or
# disable this.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:${RR_OBSERVABILITY__PORT}/healthz', timeout=4)" || exit 1

# The relay stops on SIGTERM (the default stop signal): it drains in-flight records for up to
# delivery.shutdown_grace_s (20 s by default) and commits, so give `docker stop -t` more than that.
ENTRYPOINT ["rr-consumer"]
CMD ["run", "--config", "/etc/rr-consumer/config.toml"]

# ---------------------------------------------------------------------------------------------------------
# The development tools on top (docker compose's emulator and sample-producer build this target).
FROM base AS dev

USER root
RUN --mount=type=bind,from=build,source=/wheels-dev,target=/wheels-dev \
    pip install --no-cache-dir --no-index --no-deps /wheels-dev/*.whl \
    && rr-consumer emulator --help >/dev/null
USER 10001:10001

# ---------------------------------------------------------------------------------------------------------
# The production image, and the default target: the runtime package alone.
FROM base AS runtime
