# Multi-stage build: compile with the Rust toolchain, run on a slim image as a
# non-root user. Image names are fully qualified so that podman and buildah
# need no short-name resolution. See docs/deployment.md.
# Build:  docker build -t localhost/portcullis .
# Run:    docker run --rm -p 8080:8080 -p 127.0.0.1:9090:9090 \
#           -v $PWD/my-config:/etc/portcullis:ro \
#           -e PORTCULLIS_BACKEND_KEY=… -e PORTCULLIS_WEB_KEY=… -e PORTCULLIS_PARAM_KEY=… \
#           localhost/portcullis
FROM docker.io/library/rust:1.95-slim-bookworm AS build
# make: jemalloc, the binary's allocator, is built from source.
RUN apt-get update \
 && apt-get install -y --no-install-recommends make \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --release --locked && strip target/release/portcullis

FROM docker.io/library/debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin portcullis \
 && install -d -o portcullis -g portcullis -m 0750 /var/lib/portcullis /var/log/portcullis
COPY --from=build /src/target/release/portcullis /usr/local/bin/portcullis
USER 10001:10001
EXPOSE 8080 9090
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/portcullis"]
CMD ["run", "--config", "/etc/portcullis/portcullis.toml"]
