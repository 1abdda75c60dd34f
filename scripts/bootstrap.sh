#!/bin/sh
# System packages the build and the tests need, installed only when missing (Debian/Ubuntu, as root).
set -e
need=""
command -v cc >/dev/null 2>&1 || need="$need build-essential"
command -v pg_config >/dev/null 2>&1 || need="$need libpq-dev"
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need="$need python3-venv"
if [ -n "${COORDINATOR_WITH_NGINX:-}" ] && ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
    need="$need nginx"
fi
[ -z "$need" ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "bootstrap: please install:$need" >&2
    exit 1
fi
echo "bootstrap: installing$need" >&2
apt-get update -qq
# Don't let the nginx package start a system-wide server on port 80: tests start their own.
policy=/usr/sbin/policy-rc.d
created=""
if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod +x "$policy"; created=1; fi
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need >/dev/null
[ -n "$created" ] && rm -f "$policy"
exit 0
