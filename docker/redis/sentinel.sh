#!/bin/sh
# A Redis Sentinel of the Redis that fails over (docker-compose.ha.yml,
# deploy/swarm/tandem-stack.yml): the container's entrypoint.
#
# TLS to the data nodes and to the other Sentinels on 26380; plaintext on 26379, for
# clients asking where the primary is (redis-py's Sentinel client cannot do TLS to them).
# The Sentinels report host names (`redis`, `redis-replica`), which the Redis certificate
# names, so clients verify a promoted primary like the first.
#
# Sentinel rewrites its config file (what it learns: replicas, other Sentinels, the current
# primary), so it is made on the first start only, in the container's /data, from
#   SENTINEL_ANNOUNCE_HOST               the name this Sentinel is reached by
#   REDIS_SENTINEL_DOWN_AFTER_MS         how long a silent primary is down (default 1500)
#   REDIS_SENTINEL_FAILOVER_TIMEOUT_MS   Sentinel's failover-timeout (default 10000)
# and its password from /run/tandem/own/redis.password (ACL user `sentinel`).
set -eu
conf=/data/sentinel.conf
if [ ! -s "$conf" ]; then
    umask 077
    cat > "$conf.new" <<CONF
port 26379
tls-port 26380
tls-cert-file /run/tandem/own/server.crt
tls-key-file /run/tandem/own/server.key
tls-ca-cert-file /run/tandem/public/ca.crt
tls-auth-clients no
tls-replication yes
sentinel resolve-hostnames yes
sentinel announce-hostnames yes
sentinel announce-ip $SENTINEL_ANNOUNCE_HOST
sentinel announce-port 26380
sentinel monitor tandem redis 6379 2
sentinel down-after-milliseconds tandem ${REDIS_SENTINEL_DOWN_AFTER_MS:-1500}
sentinel failover-timeout tandem ${REDIS_SENTINEL_FAILOVER_TIMEOUT_MS:-10000}
sentinel parallel-syncs tandem 1
sentinel auth-user tandem sentinel
sentinel auth-pass tandem $(cat /run/tandem/own/redis.password)
CONF
    mv "$conf.new" "$conf"
fi
exec redis-server "$conf" --sentinel
