#!/usr/bin/env bash
# Debian packages the tests and benchmarks need: Fashion-MNIST (real data) and the aarch64 cross compiler;
# then qemu-user and an aarch64 Python with the TVM runtime, to run Raspberry Pi artifacts here.
set -euo pipefail
PKGS="dataset-fashion-mnist gcc-aarch64-linux-gnu"
if ! dpkg -s $PKGS >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq $PKGS >/dev/null
fi
"$(dirname "$0")/setup-aarch64-sysroot.sh"
