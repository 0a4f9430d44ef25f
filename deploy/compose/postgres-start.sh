#!/bin/sh
# PostgreSQL for the compose stack. The first start makes the cluster (scram-sha-256 over the
# network) and one database per service that has one, each owned by its own role: auth
# (AUTH_DB_PASSWORD) and analytics (ANALYTICS_DB_PASSWORD). Every start then runs postgres.
set -eu
bin=$(find /usr/lib/postgresql -maxdepth 2 -name bin | sort -V | tail -n1)
PGDATA=${PGDATA:-/var/lib/postgresql/data}

quote() { printf "'%s'" "$(printf '%s' "$1" | sed "s/'/''/g")"; }

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    umask 077
    pwfile=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
    "$bin/initdb" -D "$PGDATA" -U postgres --pwfile="$pwfile" -E UTF8 --locale=C.UTF-8 \
        --auth-local=peer --auth-host=scram-sha-256 >/dev/null
    rm -f "$pwfile"
    echo "listen_addresses = '*'" >>"$PGDATA/postgresql.conf"
    echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
    # Single-user mode: no socket, no network, one statement a line.
    "$bin/postgres" --single -D "$PGDATA" postgres >/dev/null <<SQL
CREATE ROLE narthex_auth LOGIN PASSWORD $(quote "$AUTH_DB_PASSWORD");
CREATE ROLE narthex_analytics LOGIN PASSWORD $(quote "$ANALYTICS_DB_PASSWORD");
CREATE DATABASE auth OWNER narthex_auth;
CREATE DATABASE analytics OWNER narthex_analytics;
SQL
    echo "postgres-start: created the cluster and the auth and analytics databases"
fi
# The socket on tmpfs: the root filesystem may be read-only.
exec "$bin/postgres" -D "$PGDATA" -c unix_socket_directories=/tmp
