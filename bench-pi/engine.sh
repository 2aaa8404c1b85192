#!/usr/bin/env bash
# Engine benchmark: JSON Lines in memory -> parse -> key_by -> 5 s tumbling
# avg/max/count over 10,000 keys -> discard. Runs the hand-written baseline
# and rivulet (1 and 2 workers) interleaved, ROUNDS times, one process each,
# and writes bench-pi/reports/engine.md.
#   bash bench-pi/engine.sh [EVENTS] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
EVENTS=${1:-10000000}
ROUNDS=${2:-3}
cargo build --release -p rivulet-bench >/dev/null 2>&1
B=target/release/engine
OUT=$(mktemp)
for r in $(seq "$ROUNDS"); do
  $B source "$EVENTS" >>"$OUT"
  $B baseline "$EVENTS" >>"$OUT"
  $B rivulet 1 "$EVENTS" >>"$OUT"
  $B rivulet 2 "$EVENTS" >>"$OUT"
done
python3 bench-pi/report.py engine "$OUT" "$($B line-length)" > bench-pi/reports/engine-latest.md
cat bench-pi/reports/engine-latest.md
