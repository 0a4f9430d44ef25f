#!/bin/sh
# Redis for the compose stack: append-only, password from REDIS_PASSWORD. The password goes in
# a config file on tmpfs, not on the command line, where `ps` would show it.
set -eu
conf=/tmp/redis.conf
umask 077
cat >"$conf" <<CONF
bind 0.0.0.0
protected-mode no
dir /data
appendonly yes
appendfsync everysec
requirepass "$REDIS_PASSWORD"
CONF
exec redis-server "$conf"
