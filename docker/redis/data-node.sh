#!/bin/sh
# A Redis data node that can be primary or replica, for a Redis that fails over
# (docker-compose.ha.yml, deploy/swarm/tandem-stack.yml): the container's entrypoint, with
# the Redis command (redis-server and its TLS, ACL and persistence flags) as arguments.
#
# The node runs with a config file of its own in its data volume: Sentinel rewrites it
# (CONFIG REWRITE) when it promotes or demotes the node, so a node that restarts keeps the
# role it last had. It is made on the first start only, from
#   REDIS_ANNOUNCE_HOST  the name the node is reached by (what the Sentinels report to clients)
#   REDIS_FIRST_PRIMARY  the primary to replicate at first; empty on the first primary.
# The replication password is given on every start, so a renewed one is in force at once.
set -eu
conf=/data/tandem-node.conf
if [ ! -s "$conf" ]; then
    {
        echo "replica-announce-ip $REDIS_ANNOUNCE_HOST"
        if [ -n "${REDIS_FIRST_PRIMARY:-}" ]; then echo "replicaof $REDIS_FIRST_PRIMARY 6379"; fi
    } > "$conf.new"
    mv "$conf.new" "$conf"
fi
server=$1
shift
exec "$server" "$conf" "$@" \
    --tls-replication yes \
    --masteruser replication \
    --masterauth "$(cat /run/tandem/own/replication.password)"
