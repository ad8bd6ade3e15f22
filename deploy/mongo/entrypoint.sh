#!/usr/bin/env bash
# Entrypoint of the `mongo` service (docker-compose.yml). A replica set with authentication
# needs a keyfile: generate one on the first start, keep it in the mongo_config volume
# (/data/configdb), then hand over to the image's own entrypoint, which creates the root user
# and runs docker-entrypoint-initdb.d/ on an empty data volume, then starts mongod.
set -euo pipefail

keyfile=/data/configdb/keyfile
if [ ! -s "$keyfile" ]; then
    umask 077
    # 756 random bytes -> 1008 base64 characters (the limit is 1024), no line breaks.
    head -c 756 /dev/urandom | base64 -w 0 > "$keyfile"
fi
chown mongodb:mongodb "$keyfile"
chmod 400 "$keyfile"

exec docker-entrypoint.sh "$@"
