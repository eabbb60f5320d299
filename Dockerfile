# syntax=docker/dockerfile:1
#
# Tidepool's images, one target per program, all from one build:
#
#   docker build --target operator -t tidepool-operator:0.1.0 .
#   docker build --target agent    -t tidepool-agent:0.1.0 .
#   docker build --target session  -t tidepool-session:0.1.0 .
#   docker build --target gateway  -t tidepool-gateway:0.1.0 .
#
# Each image holds one release binary on distroless (glibc, CA certificates,
# no shell, no package manager) and runs as the non-root user 65532.

ARG RUST_VERSION=1.95
ARG NODE_VERSION=20

# The web UI: packages from npm at build time, nothing built committed.
FROM docker.io/library/node:${NODE_VERSION}-bookworm AS web
WORKDIR /web
COPY web/package.json web/package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY web/ ./
RUN npm run build

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
# The caches keep downloaded crates and compiled dependencies between builds.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
        --bin tidepool-operator --bin tidepool-agent --bin tidepool-session --bin tidepool-gateway \
    && mkdir /out \
    && cp target/release/tidepool-operator target/release/tidepool-agent target/release/tidepool-session \
        target/release/tidepool-gateway /out/

# Debian 12, like the build stage, so the binaries find the glibc they were linked with.
FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
USER 65532:65532

FROM runtime AS operator
COPY --from=build /out/tidepool-operator /usr/local/bin/tidepool-operator
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/tidepool-operator"]

# NVML is not in the image: the NVIDIA container runtime mounts it on GPU nodes.
FROM runtime AS agent
COPY --from=build /out/tidepool-agent /usr/local/bin/tidepool-agent
EXPOSE 9101
ENTRYPOINT ["/usr/local/bin/tidepool-agent"]

FROM runtime AS session
COPY --from=build /out/tidepool-session /usr/local/bin/tidepool-session
EXPOSE 8080/tcp 8080/udp
ENTRYPOINT ["/usr/local/bin/tidepool-session"]

# The users' port, and the admin port (/metrics, /healthz, /readyz). The
# web UI's build is where the chart's --ui-dir points.
FROM runtime AS gateway
COPY --from=build /out/tidepool-gateway /usr/local/bin/tidepool-gateway
COPY --from=web /web/dist /usr/share/tidepool/ui
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/tidepool-gateway"]
