#!/usr/bin/env bash
# Installs the system tools the tests and benchmarks need, only when missing:
#   prometheus (Debian package) for the dashboard test, buf (npm @bufbuild/buf) for proto lint,
#   wrk (Debian package) for the overhead benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v prometheus >/dev/null 2>&1 || need_apt+=(prometheus)
command -v wrk >/dev/null 2>&1 || need_apt+=(wrk)
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "installing ${need_apt[*]} (apt)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
# The Debian package starts a prometheus service on some systems; we run our own instances.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
  systemctl stop prometheus || true
fi

if [ ! -x node_modules/.bin/buf ]; then
  echo "installing @bufbuild/buf (npm)"
  npm install --no-audit --no-fund --silent --no-save @bufbuild/buf@^1 >/dev/null
fi
