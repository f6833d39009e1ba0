#!/bin/sh
# Runs nginx for the compose stack and reloads it whenever the set of `server`
# replicas changes (scaled, recreated, restarted with a new address). nginx
# resolves upstream names only when it (re)loads its configuration; reloading
# is graceful: new workers take new connections, old ones finish theirs.
set -eu

replicas() {
    getent ahostsv4 server 2>/dev/null | awk '{print $1}' | sort -u | tr '\n' ' '
}

nginx -g 'daemon off;' &
nginx_pid=$!
trap 'nginx -s quit; wait "$nginx_pid"; exit 0' TERM INT QUIT

known=$(replicas)
while kill -0 "$nginx_pid" 2>/dev/null; do
    sleep 3 &
    wait $! || true
    current=$(replicas)
    if [ -n "$current" ] && [ "$current" != "$known" ]; then
        echo "run-nginx: replicas are now: $current; reloading nginx" >&2
        nginx -s reload
        known=$current
    fi
done
wait "$nginx_pid"
