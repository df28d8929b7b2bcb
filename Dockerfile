# corral and the chat example in one image, corral as the entrypoint (PID 1):
# it supervises the gunicorn workers, reaps orphans, drains on SIGTERM.
#   docker build -t corral-chat --build-arg CORRAL_COMMIT=$(git rev-parse --short=12 HEAD) .
#   docker compose -f examples/chat/compose.yaml up
# (See the README: on the development machines the image is not built; its
# entrypoint is tested as it runs, as PID 1 under unshare.)

FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY src src
COPY assets assets
COPY bench bench
ARG CORRAL_COMMIT=unknown
RUN CORRAL_COMMIT=${CORRAL_COMMIT} cargo build --release --locked --bin corral

FROM python:3.11-slim-bookworm
COPY --from=build /src/target/release/corral /usr/local/bin/corral
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
