# Redis, PostgreSQL and Prometheus for docker-compose.yml, from Debian's own packages (one
# target each): the same software a Debian host runs, on a base any machine can build.
#   docker build -f deploy/compose/infra.Dockerfile --target redis -t narthex/redis:<tag> .
# INFRA_BASE_IMAGE: debian:bookworm-slim by default; deploy/compose/make-base.sh makes one with
# the three packages already in it for machines that reach neither Docker Hub nor, from a build,
# Debian's mirror (the apt-get steps then install nothing).
ARG INFRA_BASE_IMAGE=debian:bookworm-slim

FROM ${INFRA_BASE_IMAGE} AS redis
RUN command -v redis-server >/dev/null || { apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server \
        && rm -rf /var/lib/apt/lists/*; } \
    && install -d -o redis -g redis -m 0700 /data
COPY deploy/compose/redis-start.sh /usr/local/bin/redis-start
USER redis
WORKDIR /data
EXPOSE 6379
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=2s --timeout=3s --start-period=10s --retries=5 \
    CMD ["sh", "-c", "REDISCLI_AUTH=\"$REDIS_PASSWORD\" redis-cli ping | grep -q PONG"]
CMD ["/usr/local/bin/redis-start"]

FROM ${INFRA_BASE_IMAGE} AS postgres
RUN command -v pg_isready >/dev/null || { apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql \
        && rm -rf /var/lib/apt/lists/*; } \
    && install -d -o postgres -g postgres -m 0700 /var/lib/postgresql/data
COPY deploy/compose/postgres-start.sh /usr/local/bin/postgres-start
ENV PGDATA=/var/lib/postgresql/data
USER postgres
EXPOSE 5432
# Smart shutdown would wait for every client to go; fast shutdown ends sessions cleanly.
STOPSIGNAL SIGINT
HEALTHCHECK --interval=2s --timeout=3s --start-period=20s --retries=5 \
    CMD ["pg_isready", "-h", "127.0.0.1", "-U", "postgres", "-q"]
CMD ["/usr/local/bin/postgres-start"]

FROM ${INFRA_BASE_IMAGE} AS prometheus
RUN command -v prometheus >/dev/null || { apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus \
        && rm -rf /var/lib/apt/lists/*; } \
    && install -d -o prometheus -g prometheus -m 0700 /prometheus \
    && install -d -m 0755 /etc/prometheus/rules
COPY deploy/compose/prometheus.yml /etc/prometheus/prometheus.yml
USER prometheus
EXPOSE 9090
STOPSIGNAL SIGTERM
# No HTTP client in the image: bash's /dev/tcp asks /-/ready.
HEALTHCHECK --interval=2s --timeout=3s --start-period=10s --retries=5 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/9090 && printf 'GET /-/ready HTTP/1.0\\r\\n\\r\\n' >&3 && head -n1 <&3 | grep -q ' 200 '"]
ENTRYPOINT ["prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus", \
     "--web.listen-address=:9090", "--storage.tsdb.retention.time=7d"]
