#!/usr/bin/env bash
# Installs Debian packages for a make target that found a tool missing.
#
#   scripts/apt-install.sh PKG...
#
# As root: `apt-get install` (after `apt-get update` when the first try fails, as on a fresh
# machine with empty package lists). Otherwise prints the command to run and exits 1, so the
# caller decides whether that is fatal.
set -euo pipefail
[ $# -gt 0 ] || { echo "usage: $0 PKG..." >&2; exit 2; }
if [ "$(id -u)" != 0 ]; then
  echo "missing Debian packages (not root, not installing): apt-get install $*" >&2
  exit 1
fi
echo "== apt-get install $*"
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -qq "$@" >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq "$@" >/dev/null; }
