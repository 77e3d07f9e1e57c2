#!/usr/bin/env bash
# Debian packages the tests and benchmarks need: Fashion-MNIST (real data) and the aarch64 cross compiler.
set -euo pipefail
PKGS="dataset-fashion-mnist gcc-aarch64-linux-gnu"
if dpkg -s $PKGS >/dev/null 2>&1; then exit 0; fi
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq $PKGS >/dev/null
