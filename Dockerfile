# syntax=docker/dockerfile:1
#
# The dbpool-operator image (the last stage, the default target) and the dbpool-client example
# service's (target client-service): static (musl) binaries on distroless, running as 65532:65532.
#
#   docker build -t ghcr.io/dbpool/dbpool-operator:0.1.0 .
#   docker build --target client-service -t ghcr.io/dbpool/dbpool-client-service:0.1.0 .
#   docker buildx build --platform linux/amd64,linux/arm64 -t ghcr.io/dbpool/dbpool-operator:0.1.0 .
#
# Not built by `make test`: the development machines have no Docker engine (and no registry access
# beyond the package registries). `make image` (hack/build-image.sh) builds the same images without
# one (umoci; glibc binaries with exactly their shared libraries, as distroless/cc), and
# hack/check-image.py checks that both describe the same user, entrypoint, cmd and ports. Each platform
# is compiled natively in its own builder stage (buildx runs arm64 under emulation), so no cross
# linker is needed; ring, the only C dependency, builds with musl-gcc.

ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS builder
ARG TARGETARCH
RUN apt-get update \
    && apt-get install -y --no-install-recommends musl-tools \
    && rm -rf /var/lib/apt/lists/*
RUN case "${TARGETARCH:-amd64}" in \
      amd64) echo x86_64-unknown-linux-musl ;; \
      arm64) echo aarch64-unknown-linux-musl ;; \
      *) echo "unsupported TARGETARCH ${TARGETARCH}" >&2; exit 1 ;; \
    esac > /rust-target \
    && rustup target add "$(cat /rust-target)"
WORKDIR /src
# The context is what .dockerignore lets through: the manifests, the lock file and the sources of
# the workspace (the root package and crates/*).
COPY . .
# The registry and target directories are BuildKit caches: a rebuild after a source change
# recompiles the crate only. --locked: exactly the dependency versions of Cargo.lock.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    target="$(cat /rust-target)" \
    && RUSTFLAGS="-C target-feature=+crt-static" \
       cargo build --release --locked --target "$target" -p dbpool-operator --bin dbpool-operator \
    && RUSTFLAGS="-C target-feature=+crt-static" \
       cargo build --release --locked --target "$target" -p dbpool-client --example client_service \
    && cp "target/$target/release/dbpool-operator" /dbpool-operator \
    && cp "target/$target/release/examples/client_service" /client_service \
    && /dbpool-operator --version

# The dbpool-client example service (crates/dbpool-client/examples/client_service.rs): listens on
# all interfaces in a pod; DBPOOL_NAMESPACE and DBPOOL_NAME name its DbPool.
FROM gcr.io/distroless/static-debian12:nonroot AS client-service
LABEL org.opencontainers.image.title="dbpool-client-service" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /client_service /client_service
ENV LISTEN_ADDR=0.0.0.0:8080
USER 65532:65532
# /orders/count, /healthz, /metrics
EXPOSE 8080
ENTRYPOINT ["/client_service"]

# distroless/static: CA certificates, /etc/passwd with nonroot (65532), tzdata; no shell.
FROM gcr.io/distroless/static-debian12:nonroot AS operator
LABEL org.opencontainers.image.title="dbpool-operator" \
      org.opencontainers.image.description="Kubernetes operator that keeps PostgreSQL connection pools out of a permanent failure state" \
      org.opencontainers.image.source="https://github.com/dbpool/dbpool-operator" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /dbpool-operator /dbpool-operator
USER 65532:65532
# /metrics, /healthz, /readyz (--metrics-addr)
EXPOSE 8080
ENTRYPOINT ["/dbpool-operator"]
CMD ["run"]
