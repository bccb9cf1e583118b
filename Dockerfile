# syntax=docker/dockerfile:1
# ctct-relay image: `docker build -t ctct-relay .` then
#   docker run -e CTCT_API_KEY=... -e CTCT_ACCESS_TOKEN=... -e CTCT_RELAY_ADMIN_TOKEN=... \
#     -p 127.0.0.1:8081:8081 -v ctct-relay-state:/var/lib/ctct-relay ctct-relay
# The runtime stage holds the venv with the runtime dependencies only (no dev extras, no compilers,
# no curl): the health check is the stdlib script deploy/healthcheck.py.

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# Build stage: ctct-relay and its runtime dependencies, pinned by constraints.txt, into a venv.
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY relay ./relay
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --constraint constraints.txt /src

# Runtime stage: the same base, the venv, the health check, the container config, a non-root user.
FROM ${PYTHON_IMAGE} AS runtime
ARG UID=10001
RUN groupadd --system --gid "${UID}" ctct-relay \
 && useradd --system --uid "${UID}" --gid ctct-relay --no-create-home \
      --home-dir /var/lib/ctct-relay --shell /usr/sbin/nologin ctct-relay \
 && mkdir -p /var/lib/ctct-relay /etc/ctct-relay /opt/ctct-relay \
 && chown ctct-relay:ctct-relay /var/lib/ctct-relay
COPY --from=build /opt/venv /opt/venv
COPY deploy/healthcheck.py /opt/ctct-relay/healthcheck.py
COPY config/relay.container.yaml /etc/ctct-relay/relay.yaml
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
WORKDIR /var/lib/ctct-relay
# State (SQLite by default) and config; mount your own relay.yaml over /etc/ctct-relay.
VOLUME ["/var/lib/ctct-relay", "/etc/ctct-relay"]
# The admin API: /healthz, /readyz, /metrics, /v1 (bearer token).
EXPOSE 8081
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["/opt/venv/bin/python", "/opt/ctct-relay/healthcheck.py", "--url", "http://127.0.0.1:8081/healthz"]
ENTRYPOINT ["ctct-relay"]
CMD ["run", "--config", "/etc/ctct-relay/relay.yaml"]
