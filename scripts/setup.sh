#!/usr/bin/env bash
# Installs everything vduproxy and its test suite need on a fresh Debian 12 machine (apt + a venv), then builds
# the C cores. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  build-essential python3-dev python3-venv pkg-config   # the cffi C cores
  qemu-system-x86 linux-image-amd64 busybox-static      # tier 3: QEMU 7.2 TCG guest with Debian's kernel
  dpdk-dev                                              # tier 3: dpdk-testpmd (virtio-user front-end, vhost peer)
  iproute2 kmod procps psmisc xz-utils cpio             # network namespaces, module resolution, teardown
  linux-source-6.1 bc bison flex libelf-dev libssl-dev  # tier 4: a small kernel with vdpa_sim_net (cached build)
  clang libclang-rt-14-dev                              # libFuzzer + sanitizers for the C-core fuzz runs
)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing apt packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel cffi
.venv/bin/python -m pip install -q -e '.[test,bench]'
# Editable installs do not always leave the compiled cores beside the sources: build them in place explicitly.
# Remove stale copies first: a module built another way (other suffix) would shadow the fresh one on import.
find vduproxy -name '_*_core*.so' -delete
.venv/bin/python setup.py -q build_ext --inplace >/dev/null
echo "setup: ok ($(.venv/bin/python -c 'import vduproxy; print("vduproxy", vduproxy.__version__)'))"
