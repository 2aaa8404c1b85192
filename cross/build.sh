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
#
# Both are linked by lld through cross/link-ordered.py, which places the
# functions a running pipeline executes (cross/steady-order.txt, written by
# cross/make-order.py) next to each other: an idle pipeline then keeps far
# less of its code resident. Symbols use the v0 mangling, whose names the
# list can match across compilers and targets.
set -euo pipefail
cd "$(dirname "$0")/.."
ARCHES=${*:-arm64 amd64}
RUSTFLAGS_SHIPPED="-C target-feature=+crt-static -C symbol-mangling-version=v0"
export CARGO_TERM_COLOR=never

need_arm64_toolchain() {
  [ -x /usr/bin/cargo ] && [ -x /usr/bin/rustc ] && command -v aarch64-linux-gnu-gcc >/dev/null \
    && [ -d "$(/usr/bin/rustc --print target-libdir --target aarch64-unknown-linux-gnu 2>/dev/null)/" ] \
    && [ -n "$(ls "$(/usr/bin/rustc --print target-libdir --target aarch64-unknown-linux-gnu)" 2>/dev/null)" ] \
    && return 1
  return 0
}

# The layout list is an input of the link that cargo does not track: when
# it changed since a target's last link, make cargo link that binary again.
relink_if_order_changed() {
  local stats
  stats=$(ls -t "$1"/deps/rivulet-*.order 2>/dev/null | head -1 || true)
  [ -n "$stats" ] || return 0
  local used
  used=$(cut -d' ' -f3 "$stats")
  if [ "$used" != "$(sha256sum cross/steady-order.txt | cut -c1-16)" ]; then
    touch runtime/src/main.rs
  fi
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
      if ! command -v ld.lld >/dev/null; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq lld >/dev/null
      fi
      triple=aarch64-unknown-linux-gnu
      # The cross gcc finds no `ld.lld` for `-fuse-ld=lld`; it takes the
      # `ld` of a directory given with -B.
      lld_dir=$PWD/target/cross/lld
      mkdir -p "$lld_dir"
      ln -sf "$(command -v ld.lld)" "$lld_dir/ld"
      # Debian's compiler and Debian's std for the target must be the same version.
      relink_if_order_changed "target/cross/$triple/release"
      RUSTC=/usr/bin/rustc \
      CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc \
      CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER="$PWD/cross/link-ordered.py" \
      RIVULET_LINKER="aarch64-linux-gnu-gcc -B$lld_dir" RIVULET_NM=aarch64-linux-gnu-nm \
      CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUSTFLAGS="$RUSTFLAGS_SHIPPED" \
        /usr/bin/cargo build --release --locked -p rivulet --target "$triple" --target-dir target/cross
      out=target/cross/$triple/release/rivulet
      ;;
    amd64)
      triple=x86_64-unknown-linux-gnu
      relink_if_order_changed "target/$triple/release"
      # rustc links this target with its own lld (`cc -fuse-ld=lld`).
      CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER="$PWD/cross/link-ordered.py" RIVULET_LINKER=cc \
      CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="$RUSTFLAGS_SHIPPED" \
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
  # How much of cross/steady-order.txt the link could place. Most of it
  # missing means the list is stale (run cross/make-order.py) or the names
  # no longer match (a demangler or mangling change): the binary works, but
  # an idle pipeline keeps more code resident.
  stats=$(ls -t "$(dirname "$out")"/deps/rivulet-*.order 2>/dev/null | head -1 || true)
  if [ -z "$stats" ]; then
    echo "cross/build.sh: the link did not go through cross/link-ordered.py" >&2
    exit 1
  fi
  read -r found missing _ < "$stats"
  echo "target/dist/$arch/rivulet: $found functions of the steady-state list placed together, $missing not found"
  if [ "$found" -lt $(( (found + missing) * 4 / 5 )) ]; then
    echo "cross/build.sh: more than a fifth of cross/steady-order.txt is not in this build: run cross/make-order.py" >&2
    exit 1
  fi
  size=$(stat -c %s "target/dist/$arch/rivulet")
  echo "target/dist/$arch/rivulet: $((size / 1024)) KiB, $(file -b "target/dist/$arch/rivulet" 2>/dev/null | cut -d, -f1-2 || echo static)"
done
