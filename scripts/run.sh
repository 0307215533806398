#!/usr/bin/env bash
# The main job on a fresh machine: install, then run the proxy on the built-in software vDPA device, ready for
# QEMU to attach. Prints the QEMU options to use. Extra arguments go to `vduproxy serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
SOCK="${VDUPROXY_SOCKET:-/tmp/vduproxy.sock}"
exec .venv/bin/vduproxy serve --socket "$SOCK" --device "${VDUPROXY_DEVICE:-sim}" --print-qemu-args "$@"
