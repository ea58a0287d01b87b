# syntax=docker/dockerfile:1
# sidecache image: the release binary built on Debian 12 with the locked dependencies, run from
# distroless/cc (glibc, CA roots, no shell) as a non-root user. Nothing is written to the root
# filesystem at run time, so `readOnlyRootFilesystem: true` works.
#
#   docker build -t sidecache:0.1.0 .
#   docker run --rm -p 8080:8080 -p 9090:9090 -v "$PWD/proxy.toml:/etc/sidecache/proxy.toml:ro" sidecache:0.1.0
#
# Keep RUST_VERSION at or above `rust-version` in Cargo.toml (tests/deploy.rs checks it).
ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# The registry and target directory are BuildKit caches, so a rebuild after a source change only
# recompiles sidecache itself; the binary is copied out of the cache mount into the layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin sidecache \
    && cp target/release/sidecache /usr/local/bin/sidecache

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /usr/local/bin/sidecache /usr/local/bin/sidecache
# The example configuration, so the image starts as-is; Kubernetes mounts its ConfigMap over it.
COPY proxy.toml /etc/sidecache/proxy.toml
ENV SIDECACHE_CONFIG=/etc/sidecache/proxy.toml
# distroless's nonroot user and group.
USER 65532:65532
# 8080: the proxy; 9090: admin (/healthz /readyz /status /metrics /purge).
EXPOSE 8080 9090
# SIGTERM: stop accepting, drain for at most server.shutdown_grace, exit 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/sidecache"]
