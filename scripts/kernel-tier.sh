#!/usr/bin/env bash
# Tier 4: the cross-device suite (tests/device) against a kernel vDPA net device.
#
#   scripts/kernel-tier.sh --device /dev/vhost-vdpa-0 [PYTEST ARGS...]
#       Real hardware (or any host whose kernel has vhost_vdpa): run the suite directly against that device,
#       no VM. The device must exist and be free (vhost-vdpa allows one opener), e.g. created with
#       `vdpa dev add name vdpa0 mgmtdev <your mgmtdev> mac 02:...`; needs root or access to the node.
#   scripts/kernel-tier.sh [PYTEST ARGS...]
#       No hardware: build (once, ~10 min on 2 cores, cached under $VDUPROXY_CACHE or ~/.cache/vduproxy) a
#       kernel with vdpa_sim_net, boot it under QEMU TCG and run the suite inside against /dev/vhost-vdpa-0.
#       PYTEST ARGS go to the inner run (e.g. -x, or -k "vhost-vdpa and loopback").
#   scripts/kernel-tier.sh --build
#       Only build the kernel (or confirm it is cached) and print its path.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || { echo "kernel-tier: no .venv; run scripts/setup.sh first" >&2; exit 2; }
export PYTHONUNBUFFERED=1

case "${1:-}" in
  --device)
    dev="${2:?--device needs a path, e.g. /dev/vhost-vdpa-0}"; shift 2
    [ -c "$dev" ] || { echo "kernel-tier: $dev is not a character device" >&2; exit 2; }
    echo "kernel-tier: running tests/device against $dev on this host"
    VDUPROXY_TEST_VDPA="$dev" VDUPROXY_TEST_VDPA_ONLY=1 \
      exec "$PY" -m pytest -p no:cacheprovider -rs tests/device "$@"
    ;;
  --build)
    exec "$PY" -m vduproxy.testing.kernelvm build
    ;;
  -h|--help)
    sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
    ;;
esac

echo "kernel-tier: no --device given: running the suite in a QEMU TCG guest with vdpa_sim_net"
"$PY" -m vduproxy.testing.kernelvm build >/dev/null
# %q keeps each argument's quoting for the shlex.split on the other side.
VDUPROXY_KERNEL_PYTEST_ARGS="$(printf '%q ' "$@")" \
  exec "$PY" -m pytest -p no:cacheprovider -rs -m kernel tests/kernel
