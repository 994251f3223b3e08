#!/usr/bin/env bash
# Makes sure a PostgreSQL server answers on 127.0.0.1:5432 for the store tests: starts the
# installed cluster, or installs one from apt, and prints the URL the tests should use
# (exported by .ci/run as DICEBOX_TEST_POSTGRES_URL).
set -euo pipefail
SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
ready() { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; }

if ! command -v pg_isready >/dev/null 2>&1; then
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >&2
fi
if ! ready; then
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  $SUDO pg_ctlcluster --skip-systemctl-redirect "$version" main start >&2 || true
  for _ in $(seq 1 30); do ready && break; sleep 1; done
fi
ready || { echo "PostgreSQL did not start on 127.0.0.1:5432" >&2; exit 1; }

# Without a password (trust authentication, as on the project's machines) if that works;
# otherwise a password set here for the tests' own use.
if psql -h 127.0.0.1 -U postgres -d postgres -Atc 'select 1' >/dev/null 2>&1; then
  url="postgresql+psycopg://postgres@127.0.0.1:5432/test"
  psql -h 127.0.0.1 -U postgres -d postgres -Atc "select 1 from pg_database where datname='test'" | grep -q 1 ||
    psql -h 127.0.0.1 -U postgres -d postgres -qc 'create database test' >&2
else
  as_postgres=$([ "$(id -u)" = 0 ] && echo "runuser -u postgres --" || echo "sudo -u postgres")
  $as_postgres psql -qc "alter user postgres password 'dicebox-tests'" >&2
  export PGPASSWORD=dicebox-tests
  psql -h 127.0.0.1 -U postgres -d postgres -Atc "select 1 from pg_database where datname='test'" | grep -q 1 ||
    psql -h 127.0.0.1 -U postgres -d postgres -qc 'create database test' >&2
  url="postgresql+psycopg://postgres:dicebox-tests@127.0.0.1:5432/test"
fi
echo "$url"
