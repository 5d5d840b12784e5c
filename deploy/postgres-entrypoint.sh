#!/bin/sh
# First start: a cluster in $PGDATA, the role `node` (password from the secret file) and the database `dicom_node`.
# Every start: PostgreSQL in the foreground, reachable with a password from the container network only.
set -eu
PGDATA=/var/lib/postgresql/data
BIN=/usr/lib/postgresql/15/bin
SECRET=/run/secrets/journal_password
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    [ -s "$SECRET" ] || { echo "postgres: no password in $SECRET" >&2; exit 1; }
    "$BIN/initdb" -D "$PGDATA" --auth-local=peer --auth-host=scram-sha-256 -U postgres >/dev/null
    echo "host all all 0.0.0.0/0 scram-sha-256" >> "$PGDATA/pg_hba.conf"
    "$BIN/pg_ctl" -D "$PGDATA" -o "-c listen_addresses=''" -w start >/dev/null
    password=$(head -n 1 "$SECRET" | sed "s/'/''/g")
    psql -v ON_ERROR_STOP=1 -q -d postgres -c "CREATE ROLE node LOGIN PASSWORD '$password'" \
         -c "CREATE DATABASE dicom_node OWNER node"
    "$BIN/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null
fi
exec "$BIN/postgres" -D "$PGDATA" -c listen_addresses='*'
