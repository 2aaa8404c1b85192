#!/usr/bin/env bash
# Runs the aarch64 binary under qemu-aarch64-static: --version, validate on
# every file in configs/, and the demo pipeline on a bounded generator with
# its output checked. Builds the binary first if it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/dist/arm64/rivulet
[ -x "$bin" ] || bash cross/build.sh arm64
command -v qemu-aarch64-static >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static >/dev/null; }
run() { qemu-aarch64-static "$bin" "$@"; }

file "$bin" 2>/dev/null | grep -q "statically linked" || {
  # `file` may be missing; readelf tells as well.
  if command -v readelf >/dev/null && readelf -l "$bin" | grep -q INTERP; then echo "$bin is not static" >&2; exit 1; fi
}
[ "$(run --version | cut -d' ' -f1)" = rivulet ]
run validate configs/*.yaml >/dev/null
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
sed 's/    rate: 100 .*/    count: 20000\n    start: 1800000000000\n    rate: unlimited/' configs/demo.yaml > "$work/bounded.yaml"
run run "$work/bounded.yaml" > "$work/out.jsonl" 2>"$work/err.log" || { cat "$work/err.log" >&2; exit 1; }
# The same results as the native build.
n=$(grep -c '"window_start"' "$work/out.jsonl")
[ "$n" -eq 25 ] || { echo "expected 25 window results under qemu, got $n" >&2; exit 1; }
if [ -x target/debug/rivulet ]; then
  target/debug/rivulet run "$work/bounded.yaml" > "$work/native.jsonl" 2>/dev/null
  cmp -s "$work/out.jsonl" "$work/native.jsonl" || { echo "aarch64 and native results differ" >&2; exit 1; }
fi
size=$(stat -c %s "$bin")
echo "qemu: aarch64 binary ok ($((size / 1024)) KiB), 25 results identical to the native build"
[ "$size" -lt $((10 * 1024 * 1024)) ] || { echo "binary over 10 MB" >&2; exit 1; }
