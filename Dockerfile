# One image with every troupe binary: the `troupe` program and one binary
# per service crate (troupe-sampler, troupe-ranking-intake, ...). Build it
# from the repository root:
#
#     docker build -t troupe:latest .
#
# docker-compose.yml and k8s/ run this image and choose the binary with the
# entrypoint (compose) or `command` (Kubernetes). Only classic Dockerfile
# instructions are used, so the legacy builder and BuildKit both build it.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# --workspace: without it cargo builds only the root package's binary.
# Every troupe* executable is copied out in the same step, so the image does
# not need to know the list of service binaries.
RUN cargo build --release --locked --workspace --bins \
    && mkdir -p /out \
    && find target/release -maxdepth 1 -type f -executable -name 'troupe*' -exec cp {} /out/ \; \
    && ls -l /out

FROM debian:bookworm-slim
# curl is for the health checks in docker-compose.yml.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 troupe \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /var/lib/troupe troupe
COPY --from=build /out/ /usr/local/bin/
COPY data /usr/share/troupe/data
# Settings such as the pretraining corpus default to paths relative to the
# working directory (`data/corpus`), so the shipped data is linked there.
RUN ln -s /usr/share/troupe/data /var/lib/troupe/data
ENV TROUPE_LOG_FORMAT=json \
    TROUPE_HTTP_ADDR=0.0.0.0:8080
WORKDIR /var/lib/troupe
USER 10001:10001
# 8080: /healthz, /readyz and /metrics of every service.
# 8090: the ranking intake's labeling page (TROUPE_INTAKE_WEB_ADDR).
EXPOSE 8080 8090
ENTRYPOINT ["troupe"]
CMD ["--help"]
