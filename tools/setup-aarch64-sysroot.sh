#!/usr/bin/env bash
# An aarch64 Python 3.11 with the TVM runtime, run under qemu-user: lets tests run a Raspberry Pi artifact here
# (a correctness check, not Pi speed). Installs qemu-user and fills ${EDGECOMPACT_AARCH64_ROOT:-~/.cache/...}
# with sysroot/ (arm64 Debian packages) and site/ (aarch64 wheels). A re-run with the same lists only checks a stamp.
set -euo pipefail
ROOT="${EDGECOMPACT_AARCH64_ROOT:-$HOME/.cache/edgecompact/aarch64}"
# python3.11 and the shared libraries that it, the stdlib modules the runner imports, TVM and numpy load.
DEBS="python3.11-minimal libpython3.11-minimal libpython3.11-stdlib libc6 libgcc-s1 libstdc++6 zlib1g libffi8
libssl3 libexpat1 libbz2-1.0 liblzma5 libuuid1"
WHEELS="apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post1 numpy ml_dtypes typing_extensions psutil"
KEY="debs: $(echo $DEBS); wheels: $WHEELS"
STAMP="$ROOT/stamp"

HAVE_ROOT=0; [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$KEY" ] && HAVE_ROOT=1
if command -v qemu-aarch64 >/dev/null && [ $HAVE_ROOT = 1 ]; then exit 0; fi

mkdir -p "$ROOT"
LOG="$ROOT/setup.log"
: >"$LOG"
fail() { echo "setup-aarch64-sysroot: $1 failed: $(tail -n 1 "$LOG") (log: $LOG)" >&2; exit 1; }
step() { local what="$1"; shift; echo "+ $*" >>"$LOG"; "$@" >>"$LOG" 2>&1 </dev/null || fail "$what"; }

command -v apt-get >/dev/null || { echo "setup-aarch64-sysroot: needs apt-get (Debian/Ubuntu)" >&2; exit 1; }
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
  step "dpkg --add-architecture arm64" $SUDO dpkg --add-architecture arm64
fi
step "apt-get update" $SUDO apt-get update -qq
if ! command -v qemu-aarch64 >/dev/null; then
  step "apt-get install qemu-user" $SUDO apt-get install -y -qq qemu-user
fi
[ $HAVE_ROOT = 1 ] && exit 0

# Build into fresh directories and swap them in at the end, so an interrupted run leaves no half sysroot.
rm -rf "$ROOT/debs" "$ROOT/sysroot.new" "$ROOT/site.new"
mkdir -p "$ROOT/debs" "$ROOT/sysroot.new"
(cd "$ROOT/debs" && step "apt-get download (arm64)" apt-get download -q $(printf '%s:arm64 ' $DEBS))
for deb in "$ROOT"/debs/*.deb; do step "dpkg -x $(basename "$deb")" dpkg -x "$deb" "$ROOT/sysroot.new"; done
step "pip install (aarch64 wheels)" python3 -m pip install -q --target "$ROOT/site.new" \
  --platform manylinux_2_28_aarch64 --python-version 3.11 --implementation cp --only-binary=:all: $WHEELS
[ -x "$ROOT/sysroot.new/usr/bin/python3.11" ] || { echo "no usr/bin/python3.11 in the packages" >>"$LOG"; fail "sysroot"; }

rm -rf "$ROOT/sysroot" "$ROOT/site" "$ROOT/debs"
mv "$ROOT/sysroot.new" "$ROOT/sysroot"
mv "$ROOT/site.new" "$ROOT/site"
echo "$KEY" >"$STAMP"
echo "setup-aarch64-sysroot: aarch64 Python 3.11 + TVM runtime ready in $ROOT"
