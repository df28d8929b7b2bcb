# corral and the chat example in one image, corral as the entrypoint (PID 1):
# it supervises the gunicorn workers, reaps orphans, drains on SIGTERM.
#   docker build -t corral-chat --build-arg CORRAL_COMMIT=$(git rev-parse --short=12 HEAD) .
#   docker compose -f examples/chat/compose.yaml up
# `make image` builds it with docker or podman; where no image can be pulled it
# first makes the two bases from Debian's packages (scripts/container-bases) and
# names them with RUST_IMAGE and PYTHON_IMAGE.

ARG RUST_IMAGE=rust:1-slim-bookworm
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY src src
COPY assets assets
COPY bench bench
ARG CORRAL_COMMIT=unknown
RUN CORRAL_COMMIT=${CORRAL_COMMIT} cargo build --release --locked --bin corral

FROM ${PYTHON_IMAGE}
COPY --from=build /src/target/release/corral /usr/local/bin/corral
# The example's own requirements, in a virtualenv (Debian's Python refuses
# system-wide pip installs; the official image takes either).
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
COPY examples/chat/requirements.txt ./
RUN pip install --no-cache-dir -r requirements.txt
COPY examples/chat/ ./
RUN useradd --system --uid 10001 --home-dir /app corral
USER corral
EXPOSE 8443 8000 9000
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD ["python3", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:9000/readyz', timeout=2).status != 200)"]
ENTRYPOINT ["corral"]
CMD ["run", "-c", "/app/corral.container.toml"]
