#!/bin/sh
# The cluster's one-shot setup (docker-compose.cluster.yml, service cluster-setup): once the
# three nodes have formed one cluster, give every stream and quorum queue of the smartgrid
# vhost a member on each node. The definitions imported at boot may declare them before the
# last node has joined, and then they live only on the nodes that were there.
#  - Streams (the history, the grid limits): an AMQP consumer reads a stream from the replica
#    on the node it is connected to, and a node without one refuses it ("does not have a
#    replica on the local node"). No reconciliation adds the missing replicas: this does.
#  - Quorum queues: RabbitMQ 4.x's continuous membership reconciliation (rabbitmq/cluster.conf)
#    does it too, later; growing them here puts them on all three before any service starts.
# Idempotent; the services start once it has succeeded. It speaks to the nodes as a CLI
# node, with the cluster's Erlang cookie (kept by the setup service in the secrets volume).
set -eu

VHOST=smartgrid
NODES="rabbit@rabbitmq-1 rabbit@rabbitmq-2 rabbit@rabbitmq-3"
STREAMS="smartgrid.history smartgrid.grid.limits"
FIRST=rabbit@rabbitmq-1
# Debian's rabbitmq-server package (the tests' stand-in image) keeps it out of PATH.
STREAMS_CLI=$(command -v rabbitmq-streams || echo /usr/lib/rabbitmq/bin/rabbitmq-streams)

# The CLI reads $HOME/.erlang.cookie (HOME is /var/lib/rabbitmq in the image). It may run as
# root or, where the CLI is a wrapper that drops root (Debian's), as the rabbitmq user: the
# copy belongs to that user, and root reads it anyway.
umask 077
cp /secrets/rabbitmq-erlang-cookie "$HOME/.erlang.cookie"
chown rabbitmq:rabbitmq "$HOME/.erlang.cookie"
chmod 400 "$HOME/.erlang.cookie"

echo "cluster-setup: waiting for the three nodes to form one cluster"
rabbitmqctl -q -n "$FIRST" -t 300 await_online_nodes 3

for stream in $STREAMS; do
  tries=0
  # The definitions are imported at boot; a stream may not be there the very first second.
  until status=$("$STREAMS_CLI" -q -n "$FIRST" stream_status --vhost "$VHOST" "$stream" 2>&1); do
    tries=$((tries + 1))
    if [ "$tries" -ge 60 ]; then
      echo "cluster-setup: no stream $stream in vhost $VHOST: $status" >&2
      exit 1
    fi
    sleep 2
  done
  for node in $NODES; do
    case "$status" in
      *"$node"*) echo "cluster-setup: $stream has a replica on $node" ;;
      *)
        echo "cluster-setup: adding a replica of $stream on $node"
        "$STREAMS_CLI" -q -n "$FIRST" add_replica --vhost "$VHOST" "$stream" "$node"
        ;;
    esac
  done
done

for node in $NODES; do
  rabbitmq-queues -q -n "$FIRST" grow "$node" all --vhost-pattern "^$VHOST\$" --queue-pattern '.*'
done
echo "cluster-setup: every stream and quorum queue of $VHOST has a member on each node"
