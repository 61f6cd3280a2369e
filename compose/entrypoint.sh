#!/bin/sh
# Entrypoint of the p2pnode image: assembles the `p2pnode run` command line of a compose node.
#
#   entrypoint.sh bootstrap [FLAGS...]   the first node: starts a new swarm, then writes its full
#                                        multiaddr /ip4/IP/tcp/PORT/p2p/PEERID to $P2PNODE_SHARED/bootstrap.maddr
#   entrypoint.sh node [FLAGS...]        any other node: waits for that file and joins through it
#   entrypoint.sh chaos [FLAGS...]       the fault injector (compose/chaos.py)
#   entrypoint.sh COMMAND...             anything else is run as it is (e.g. `p2pnode --help`)
#
# FLAGS are appended to `p2pnode run` (or chaos.py) and win over the defaults below. Environment:
#   P2PNODE_TASK (digits)          P2PNODE_SWARM (compose)         P2PNODE_PORT (31337)
#   P2PNODE_ANNOUNCE_IP            this container's address as /etc/hosts gives it (Docker writes it)
#   P2PNODE_MQTT                   mqtt://broker:1883 (empty: no telemetry)
#   P2PNODE_SHARD                  this node's shard index; default: a hash of the hostname (the
#                                  container id) modulo P2PNODE_NUM_SHARDS (8). Two nodes whose hashes
#                                  collide train on the same shard; nothing else changes.
#   P2PNODE_ATTACK                 an attack NAME[:ARGS] (test and benchmark only; empty = honest)
#   P2PNODE_DEFENSE (mean)         P2PNODE_THREADS (1)             P2PNODE_INITIAL_PEERS (bootstrap file)
#   P2PNODE_WAIT_PEERS (1)         P2PNODE_WAIT_PEERS_S (600): a node starts round 1 once it sees this
#                                  many peers (or after that long), so the first node does not train alone
#   P2PNODE_ARGS                   more `p2pnode run` flags, split on white space (e.g. "--lr 0.01")
#   P2PNODE_SHARED (/shared)       P2PNODE_DATA (/data: identity.key, checkpoints/, metrics, ready file)
#   P2PNODE_BOOTSTRAP_WAIT_S (300) how long a node waits for the bootstrap multiaddr file
set -eu

ROLE="${1:-node}"
[ "$#" -gt 0 ] && shift

TASK="${P2PNODE_TASK:-digits}"
SWARM="${P2PNODE_SWARM:-compose}"
PORT="${P2PNODE_PORT:-31337}"
MQTT="${P2PNODE_MQTT-mqtt://broker:1883}"
NUM_SHARDS="${P2PNODE_NUM_SHARDS:-8}"
DEFENSE="${P2PNODE_DEFENSE:-mean}"
THREADS="${P2PNODE_THREADS:-1}"
WAIT_PEERS="${P2PNODE_WAIT_PEERS:-1}"
WAIT_PEERS_S="${P2PNODE_WAIT_PEERS_S:-600}"
SHARED="${P2PNODE_SHARED:-/shared}"
DATA="${P2PNODE_DATA:-/data}"
WAIT_S="${P2PNODE_BOOTSTRAP_WAIT_S:-300}"
MADDR_FILE="$SHARED/bootstrap.maddr"
READY_FILE="$DATA/ready.json"

log() { printf 'entrypoint[%s]: %s\n' "$ROLE" "$*" >&2; }

container_ip() {
    # The address Docker put in /etc/hosts for this container's hostname (its first network).
    python3 -c 'import socket; print(socket.gethostbyname(socket.gethostname()))'
}

shard_index() {
    if [ -n "${P2PNODE_SHARD:-}" ]; then
        printf '%s\n' "$P2PNODE_SHARD"
        return
    fi
    sum="$(hostname | cksum | cut -d' ' -f1)"
    printf '%s\n' "$((sum % NUM_SHARDS))"
}

case "$ROLE" in
bootstrap | node) ;;
chaos) exec python3 /opt/p2pnode/chaos.py "$@" ;;
*) exec "$ROLE" "$@" ;;
esac

initial="${P2PNODE_INITIAL_PEERS:-}"
if [ "$ROLE" = bootstrap ]; then
    # A stale address from an earlier run: no node may join through it before this one is up.
    rm -f "$MADDR_FILE"
elif [ -z "$initial" ]; then
    waited=0
    while [ ! -s "$MADDR_FILE" ]; do
        if [ "$waited" -ge "$WAIT_S" ]; then
            log "no bootstrap multiaddr in $MADDR_FILE after ${WAIT_S}s"
            exit 1
        fi
        [ "$waited" -eq 0 ] && log "waiting for $MADDR_FILE"
        sleep 1
        waited=$((waited + 1))
    done
    initial="$(cat "$MADDR_FILE")"
fi

ip="${P2PNODE_ANNOUNCE_IP:-$(container_ip)}"
shard="$(shard_index)"
mkdir -p "$DATA/checkpoints"
rm -f "$READY_FILE"

# The flags given to the container come last, so they win over these defaults.
extra_count=$#
set -- "$@" p2pnode run \
    --task "$TASK" --rounds 0 --swarm "$SWARM" --threads "$THREADS" --defense "$DEFENSE" \
    --shard "$shard/$NUM_SHARDS" --wait-peers "$WAIT_PEERS" --wait-peers-s "$WAIT_PEERS_S" \
    --identity "$DATA/identity.key" \
    --host-maddrs "/ip4/0.0.0.0/tcp/$PORT" --announce-maddrs "/ip4/$ip/tcp/$PORT" \
    --ready-file "$READY_FILE" --metrics-file "$DATA/metrics.jsonl" \
    --checkpoint-dir "$DATA/checkpoints"
[ -n "$initial" ] && set -- "$@" --initial-peers "$initial"
[ -n "$MQTT" ] && set -- "$@" --mqtt "$MQTT"
[ -n "${P2PNODE_ATTACK:-}" ] && set -- "$@" --attack "$P2PNODE_ATTACK"
if [ -n "${P2PNODE_ARGS:-}" ]; then
    set -f  # split on white space, no globbing
    # shellcheck disable=SC2086
    set -- "$@" $P2PNODE_ARGS
    set +f
fi
# Rotate the extra flags (the first $extra_count parameters) to the end.
while [ "$extra_count" -gt 0 ]; do
    set -- "$@" "$1"
    shift
    extra_count=$((extra_count - 1))
done
log "shard $shard/$NUM_SHARDS, announcing /ip4/$ip/tcp/$PORT"
log "$*"

if [ "$ROLE" = node ]; then
    exec "$@"
fi

# bootstrap: not exec, this shell stays to publish the multiaddr once the node has joined. It passes
# SIGTERM/SIGINT on to the node (compose runs it under an init, which reaps orphans).
"$@" &
child=$!
trap 'kill -TERM "$child" 2>/dev/null' TERM INT
while kill -0 "$child" 2>/dev/null && [ ! -s "$READY_FILE" ]; do
    sleep 0.5
done
if [ -s "$READY_FILE" ]; then
    maddr="$(python3 - "$READY_FILE" "/ip4/$ip/tcp/$PORT/" <<'PY'
import json
import sys

ready = json.load(open(sys.argv[1]))
mine = [m for m in ready["maddrs"] if m.startswith(sys.argv[2])]
print((mine or ready["maddrs"])[0])
PY
)"
    printf '%s\n' "$maddr" > "$MADDR_FILE.tmp"
    mv "$MADDR_FILE.tmp" "$MADDR_FILE"
    log "wrote $maddr to $MADDR_FILE"
fi
status=0
wait "$child" || status=$?
# A trapped signal interrupts `wait`: wait again for the node's own exit status.
while kill -0 "$child" 2>/dev/null; do
    status=0
    wait "$child" || status=$?
done
exit "$status"
