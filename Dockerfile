# syntax=docker/dockerfile:1
#
# chokepoint container image.
#
#   docker build -t chokepoint:dev .
#   docker build --build-arg VERSION=0.1.0 --build-arg REVISION="$(git rev-parse HEAD)" \
#     --build-arg CREATED="$(date -u +%Y-%m-%dT%H:%M:%SZ)" -t REGISTRY/chokepoint:0.1.0 .
#
# The runtime image is distroless (glibc, CA certificates, no shell, no package manager) and runs
# as UID/GID 65532. The config is mounted at /etc/chokepoint/chokepoint.toml (deploy/base).
#
# checkov:skip=CKV_DOCKER_2:No HEALTHCHECK: the image is distroless (no shell or curl to run one) and Kubernetes ignores HEALTHCHECK; the Deployment probes /healthz and /readyz on the admin port instead.

############################ build ############################
FROM rust:1-bookworm AS builder
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /src

# Dependency layer: build every dependency against placeholder sources, so this layer is
# rebuilt only when Cargo.toml or Cargo.lock change. benches/ is copied because Cargo.toml names
# its bench targets and cargo refuses a manifest whose targets are missing; the load tool's
# manifest (a workspace member, not built here) gets a placeholder source for the same reason.
COPY Cargo.toml Cargo.lock ./
COPY benches ./benches
COPY tools/loadbench/Cargo.toml ./tools/loadbench/
RUN mkdir src tools/loadbench/src \
    && echo 'fn main() {}' > tools/loadbench/src/main.rs \
    && echo 'fn main() {}' > src/main.rs \
    && echo '//! placeholder' > src/lib.rs \
    && cargo build --release --locked --bin chokepoint \
    && rm -rf src

# The real sources. Touch them so cargo never takes the placeholder build as up to date
# (COPY keeps the files' own modification times, which can be older than the placeholder's).
COPY src ./src
RUN find src -name '*.rs' -exec touch {} + \
    && cargo build --release --locked --bin chokepoint \
    && ./target/release/chokepoint --version | grep -q '^chokepoint ' \
    && install -D -m 0755 target/release/chokepoint /out/chokepoint

############################ runtime ############################
FROM gcr.io/distroless/cc-debian12:nonroot

ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="chokepoint" \
      org.opencontainers.image.description="Egress gateway for AI agents: an HTTP forward proxy with per-agent allowlists, SSRF vetting and audit" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="chokepoint" \
      org.opencontainers.image.base.name="gcr.io/distroless/cc-debian12:nonroot"

COPY --from=builder /out/chokepoint /usr/local/bin/chokepoint

# 65532 is the distroless "nonroot" user; numeric, so runAsNonRoot can verify it.
USER 65532:65532
# 3128: the proxy. 9090: admin (GET /metrics, /healthz, /readyz).
EXPOSE 3128 9090
ENTRYPOINT ["/usr/local/bin/chokepoint"]
CMD ["--config", "/etc/chokepoint/chokepoint.toml"]
