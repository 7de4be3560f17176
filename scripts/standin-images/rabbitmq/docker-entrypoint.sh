#!/usr/bin/env bash
# As the official image's entrypoint: started as root, hand the data directory (and a cookie
# file placed there) to the rabbitmq user and run the command as that user.
set -euo pipefail
if [[ "$1" == rabbitmq* ]] && [ "$(id -u)" = 0 ]; then
  if [ "$1" = rabbitmq-server ]; then
    find /var/lib/rabbitmq \! -user rabbitmq -exec chown rabbitmq '{}' +
  fi
  exec setpriv --reuid=rabbitmq --regid=rabbitmq --init-groups "$BASH_SOURCE" "$@"
fi
if [ "$1" = rabbitmq-server ]; then
  # Debian's /usr/sbin/rabbitmq-server sends the node's output to files under
  # /var/log/rabbitmq; the official image's logs go to the container's output, where
  # `docker compose logs` (and a failed test's report) reads them.
  shift
  exec /usr/lib/rabbitmq/bin/rabbitmq-server "$@"
fi
exec "$@"
