# The burrow binary in a small image, running as an unprivileged user.
#
#   docker build -t burrow .
#   docker run --rm burrow --version
#
# Both roles are configured by environment alone (every flag has a BURROW_* variable): see
# docker-compose.gateway.yml and docker-compose.agent.yml.

# --- build -------------------------------------------------------------------------------
FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY crates ./crates
RUN cargo build --release --locked -p burrow-cli \
 && install -m 755 target/release/burrow /usr/local/bin/burrow \
 && burrow --version

# --- run ---------------------------------------------------------------------------------
FROM debian:bookworm-slim
# CA certificates for `--ca system` (an agent behind a CDN or a public CA's certificate).
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/burrow --shell /usr/sbin/nologin burrow \
 && install -d -m 700 -o burrow -g burrow /var/lib/burrow
COPY --from=build /usr/local/bin/burrow /usr/local/bin/burrow
USER 10001:10001
ENV BURROW_STATE_DIR=/var/lib/burrow
# The state (certificate, generated agent key): keep it, or agents must be told a new key
# and fingerprint at every start.
VOLUME ["/var/lib/burrow"]
# The tunnel port; 7444 is the admin server when BURROW_ADMIN is set.
EXPOSE 7443 7444
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/burrow"]
CMD ["gateway"]
