# syntax=docker/dockerfile:1
# event-exporter container image: the release binary on distroless (glibc, CA certificates,
# no shell), running as non-root. The Helm chart passes only arguments, so the ENTRYPOINT is the
# binary itself:
#   docker build -t event-exporter:0.1.0 .
#   docker run --rm event-exporter:0.1.0 --help

FROM rust:1-bookworm AS build
WORKDIR /src
# The workspace manifest names tools/ as a member, and cargo loads every member's manifest and
# targets before building; only the product package is compiled (`-p event-exporter`), and the
# final image holds nothing but its binary.
COPY Cargo.toml Cargo.lock ./
COPY tools/Cargo.toml ./tools/Cargo.toml
COPY tools/src ./tools/src
COPY src ./src
COPY sql ./sql
# Cache mounts keep the crate registry and target/ between builds; the binary is copied out of
# the cache in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p event-exporter \
    && install -m 0755 target/release/event-exporter /event-exporter

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /event-exporter /event-exporter
# distroless's nonroot user; the chart runs the pod as 1001:1001 (runAsNonRoot needs a numeric
# user here, which this is).
USER 65532:65532
EXPOSE 2112
ENTRYPOINT ["/event-exporter"]
