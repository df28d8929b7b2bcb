# Redis for examples/chat/compose.yaml, from Debian's redis-server package (on a
# machine that cannot pull, BASE names a Debian base made by scripts/container-bases).
ARG BASE=debian:bookworm-slim
FROM ${BASE}
RUN apt-get update -q && apt-get install -y -q --no-install-recommends redis-server \
 && rm -rf /var/lib/apt/lists/*
USER redis
EXPOSE 6380
CMD ["redis-server", "--port", "6380", "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
