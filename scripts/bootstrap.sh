#!/bin/sh
# System packages, installed only when missing (Debian/Ubuntu, as root; otherwise it says what to install).
#   sh scripts/bootstrap.sh build   what installing the package needs: a C compiler, python3-venv
#   sh scripts/bootstrap.sh test    also what the tests drive: nginx, Debian's chromium and chromedriver,
#                                   kubectl, systemd-analyze, unshare and ip (private namespaces), openssl,
#                                   nft (partitions inside network namespaces),
#                                   and Debian's PostgreSQL (a second major version for the database tests)
#                                   and PgBouncer (tests put it between replicas and Postgres)
# (COORDINATOR_WITH_NGINX=1 still means `test`.)
set -e
what=${1:-build}
[ -n "${COORDINATOR_WITH_NGINX:-}" ] && what=test
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]; }
need=""
have cc || need="$need build-essential"
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need="$need python3-venv"
if [ "$what" = test ]; then
    have nginx || need="$need nginx"
    [ -x /usr/bin/chromium ] || need="$need chromium"
    [ -x /usr/bin/chromedriver ] || need="$need chromium-driver"
    have kubectl || need="$need kubernetes-client"
    have systemd-analyze || need="$need systemd"
    have unshare || need="$need util-linux"
    have ip || need="$need iproute2"
    have openssl || need="$need openssl"
    have pgbouncer || need="$need pgbouncer"
    have nft || need="$need nftables"  # partitions between replicas (testkit/netlab.py, scripts/soak.py)
    # A second PostgreSQL major (Debian's), older than the embedded mode's: the database tests run on both.
    ls -d /usr/lib/postgresql/*/bin >/dev/null 2>&1 || need="$need postgresql"
fi
if [ -z "$need" ]; then
    echo "bootstrap: system packages for '$what' are present"
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "bootstrap: missing system packages:$need" >&2
    if [ "$what" = test ]; then
        echo "bootstrap: the tests that need them will be SKIPPED; install them (as root: sh scripts/bootstrap.sh test)" >&2
        exit 0
    fi
    echo "bootstrap: please install them (as root: sh scripts/bootstrap.sh)" >&2
    exit 1
fi
echo "bootstrap: installing$need (apt-get)"
apt-get update -qq
# Don't let the nginx or postgresql packages start system-wide servers: tests start their own.
policy=/usr/sbin/policy-rc.d
created=""
if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod +x "$policy"; created=1; fi
# shellcheck disable=SC2086
DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $need
[ -n "$created" ] && rm -f "$policy"
echo "bootstrap: installed$need"
exit 0
