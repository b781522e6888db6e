# One image with every daemon: sc-master, sc-balancer, sc-worker, sc-broker (and the example
# chat worker). Multi-stage: a Rust build stage, then a small Debian runtime as a non-root user.
#   docker build -t sc-rs .
#   docker compose up        (see docker-compose.yml and docs/deploy.md)

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bins \
 && mkdir -p /out \
 && cp target/release/sc-master target/release/sc-balancer target/release/sc-worker \
       target/release/sc-broker target/release/sc-chat-worker /out/

# The chat page's browser client: the stock socketcluster-client, pinned by the example's
# package-lock.json (node_modules is not in the repository).
FROM node:20-bookworm-slim AS chat-client
WORKDIR /chat
COPY examples/chat/package.json examples/chat/package-lock.json ./
RUN npm ci --no-audit --no-fund --loglevel=error

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin sc
COPY --from=build /out/ /usr/local/bin/
COPY deploy/sc.example.toml /etc/sc/sc.example.toml
# The chat example's page and its client, where sc-chat-worker looks beside itself.
COPY examples/chat/public /usr/local/share/sc-rs/chat/public
COPY --from=chat-client /chat/node_modules/socketcluster-client/socketcluster-client.min.js /usr/local/share/sc-rs/chat/client/
USER sc
# The balancer's public port; the master's gRPC and admin ports are internal.
EXPOSE 8000
ENTRYPOINT []
CMD ["sc-master"]
