# syntax=docker/dockerfile:1
#
# Container image of the identity service.
#   docker build -t identity:0.1.0 .
#   docker run --rm -p 50051:50051 \
#     -e IDENTITY_LISTEN_ADDR=0.0.0.0:50051 \
#     -e IDENTITY_DATABASE_URL=postgres://user:password@db:5432/identity \
#     -e IDENTITY_API_KEYS="$(cat api-keys.txt)" \
#     identity:0.1.0            # runs `identity serve`
#   docker run --rm -e IDENTITY_DATABASE_URL=... identity:0.1.0 migrate
#
# The runtime image has no shell and no package manager; it runs as the
# non-root user 65532. The binary is the entrypoint, so any subcommand
# (serve, migrate, import-users FILE, gen-api-key ...) can be given as the
# arguments.

ARG RUST_VERSION=1.95.0

FROM rust:${RUST_VERSION}-slim-bookworm AS builder
ARG RUST_VERSION
# Use the image's toolchain as is (rust-toolchain.toml would add lint components).
ENV RUSTUP_TOOLCHAIN=${RUST_VERSION} \
    CARGO_TERM_COLOR=never \
    CARGO_INCREMENTAL=0
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --bin identity \
 && install -D -m 0755 target/release/identity /out/identity \
 && mkdir -p /out/data

FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
LABEL org.opencontainers.image.title="identity" \
      org.opencontainers.image.description="gRPC identity service: legacy JWT and Clerk session verification, user mapping and migration to Clerk" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0"
COPY --from=builder /out/identity /usr/local/bin/identity
# Working directory for a development SQLite file (sqlite://identity.db);
# in Kubernetes the chart mounts a writable emptyDir here.
COPY --from=builder --chown=65532:65532 /out/data /var/lib/identity
WORKDIR /var/lib/identity
USER 65532:65532
# gRPC (grpc.health.v1 health checks on the same port)
EXPOSE 50051
ENTRYPOINT ["/usr/local/bin/identity"]
CMD ["serve"]
