# syntax=docker/dockerfile:1
# The kythera server in a container: `docker build -t kythera .`, then
# `docker run -p 8080:8080 kythera` (README.md, "Running in a container").
# tools/check-container.sh lints this file (hadolint) and validates deploy/compose.yaml.

# The toolchain the project is tested with (workspace rust-version: 1.88). Build and
# runtime stages are on the same Debian release, so the binary finds the glibc it was
# linked against.
ARG RUST_VERSION=1.95.0
ARG DEBIAN_RELEASE=trixie

FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS build
WORKDIR /src
COPY . .
# The registry and the target directory are cache mounts: a rebuild after a source
# change recompiles only the workspace crates. The target directory is not in the
# image, so the binary is copied out in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --bin kythera \
    && install -D -m 0755 target/release/kythera /out/kythera

FROM debian:${DEBIAN_RELEASE}-slim
# A fixed UID and GID (10001), so that volumes and policies (runAsUser) can name them.
RUN groupadd --gid 10001 kythera \
    && useradd --no-log-init --uid 10001 --gid kythera \
        --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin kythera
COPY --from=build /out/kythera /usr/local/bin/kythera
COPY --chmod=0755 deploy/healthcheck.sh /usr/local/bin/kythera-healthcheck
USER 10001:10001
# All interfaces of the container; the healthcheck reads the port from here.
ENV KYTHERA_LISTEN=0.0.0.0:8080
EXPOSE 8080
# GET /healthz through bash's /dev/tcp (the slim image has no curl): healthy on 200,
# unhealthy on 503 during a drain or when nothing answers.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/kythera-healthcheck"]
# SIGTERM drains: close 1001 to every connection spread over drain_window_secs (5),
# at most closing_timeout_secs (5) for the replies, then exit 0. That is up to 10 s,
# docker stop's default grace: give it more (`docker stop -t 15`, `--stop-timeout 15`).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/kythera"]
