#!/bin/sh
# First start: a cluster in $PGDATA, the role `node` (password from the secret file) and the database `dicom_node`,
# made in a temporary folder and moved into place only once complete (a failed first start is tried again whole).
# Every start: PostgreSQL in the foreground, reachable with a password from the container network only.
set -eu
PGDATA=/var/lib/postgresql/data
BIN=/usr/lib/postgresql/15/bin
SECRET=/run/secrets/journal_password
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    password=""
    IFS= read -r password < "$SECRET" || true   # the first line (a file without a final newline too)
    [ -n "$password" ] || { echo "postgres: no password in $SECRET (missing, unreadable or empty)" >&2; exit 1; }
    staging="$PGDATA/.init"
    rm -rf "$staging"
    # UTF8 whatever the container's locale: initdb's default there (no LANG) is SQL_ASCII, for which psycopg
    # returns bytes, not str, and the node cannot read its own journal
    "$BIN/initdb" -D "$staging" --encoding=UTF8 --locale=C.UTF-8 --auth-local=peer --auth-host=scram-sha-256 \
        -U postgres >/dev/null
    echo "host all all 0.0.0.0/0 scram-sha-256" >> "$staging/pg_hba.conf"
    "$BIN/pg_ctl" -D "$staging" -o "-c listen_addresses='' -k /run/postgresql" -w start >/dev/null
    quoted=$(printf '%s' "$password" | sed "s/'/''/g")
    psql -v ON_ERROR_STOP=1 -q -h /run/postgresql -d postgres \
         -c "CREATE ROLE node LOGIN PASSWORD '$quoted'" -c "CREATE DATABASE dicom_node OWNER node"
    "$BIN/pg_ctl" -D "$staging" -m fast -w stop >/dev/null
    # move the finished cluster into place (PG_VERSION last: it marks the cluster as made), over what an earlier
    # first start that failed halfway may have left
    find "$PGDATA" -mindepth 1 -maxdepth 1 ! -name .init -exec rm -rf {} +
    for entry in "$staging"/*; do
        [ "$(basename "$entry")" = PG_VERSION ] || mv "$entry" "$PGDATA/"
    done
    mv "$staging/PG_VERSION" "$PGDATA/PG_VERSION"
    rmdir "$staging"
fi
chmod 0700 "$PGDATA"
exec "$BIN/postgres" -D "$PGDATA" -c listen_addresses='*'
