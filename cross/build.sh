#!/usr/bin/env bash
# Builds stripped, statically linked release binaries of rivulet:
#   arm64 (aarch64-unknown-linux-gnu, 64-bit Raspberry Pi OS) with Debian's
#   Rust toolchain and cross compiler, and amd64 (x86_64-unknown-linux-gnu).
# Installs the Debian packages it needs when they are missing (needs root).
#
#   bash cross/build.sh            # both
#   bash cross/build.sh arm64      # one
#
# Results: target/dist/<arch>/rivulet. 32-bit Pi OS (armv7) is not built:
# Debian ships no Rust std for armhf of the same version as its compiler.
set -euo pipefail
cd "$(dirname "$0")/.."
ARCHES=${*:-arm64 amd64}
export CARGO_TERM_COLOR=never

need_arm64_toolchain() {
  [ -x /usr/bin/cargo ] && [ -x /usr/bin/rustc ] && command -v aarch64-linux-gnu-gcc >/dev/null \
    && [ -d "$(/usr/bin/rustc --print target-libdir --target aarch64-unknown-linux-gnu 2>/dev/null)/" ] \
    && [ -n "$(ls "$(/usr/bin/rustc --print target-libdir --target aarch64-unknown-linux-gnu)" 2>/dev/null)" ] \
    && return 1
  return 0
}

for arch in $ARCHES; do
  case "$arch" in
    arm64)
      if need_arm64_toolchain; then
        echo "installing Debian's Rust toolchain and aarch64 cross compiler" >&2
        dpkg --add-architecture arm64
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
          rustc-web cargo-web libstd-rust-web-dev:arm64 gcc-aarch64-linux-gnu libc6-dev-arm64-cross >/dev/null
      fi
      triple=aarch64-unknown-linux-gnu
      # Debian's compiler and Debian's std for the target must be the same version.
      RUSTC=/usr/bin/rustc \
      CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc \
      CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
      CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static" \
        /usr/bin/cargo build --release --locked -p rivulet --target "$triple" --target-dir target/cross
      out=target/cross/$triple/release/rivulet
      ;;
    amd64)
      triple=x86_64-unknown-linux-gnu
      CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static" \
        cargo build --release --locked -p rivulet --target "$triple"
      out=target/$triple/release/rivulet
      ;;
    *)
      echo "unknown architecture $arch (expected arm64 or amd64)" >&2
      exit 2
      ;;
  esac
  mkdir -p "target/dist/$arch"
  cp "$out" "target/dist/$arch/rivulet"
  size=$(stat -c %s "target/dist/$arch/rivulet")
  echo "target/dist/$arch/rivulet: $((size / 1024)) KiB, $(file -b "target/dist/$arch/rivulet" 2>/dev/null | cut -d, -f1-2 || echo static)"
done
