# syntax=docker/dockerfile:1
# Build stage: install ctct-relay and its runtime dependencies (pinned by constraints.txt) into a venv.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY relay ./relay
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check -c constraints.txt .

# Runtime stage: the venv, the example configs, a non-root user.
FROM python:3.11-slim
RUN useradd --system --uid 10001 --create-home --home-dir /var/lib/ctct-relay relay \
 && mkdir -p /etc/ctct-relay
COPY --from=build /opt/venv /opt/venv
COPY config/ /etc/ctct-relay/
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER relay
WORKDIR /var/lib/ctct-relay
VOLUME ["/var/lib/ctct-relay", "/etc/ctct-relay"]
EXPOSE 8080
ENTRYPOINT ["ctct-relay"]
CMD ["sim", "--config", "/etc/ctct-relay/sim.example.yaml", "--host", "0.0.0.0", "--port", "8080"]
