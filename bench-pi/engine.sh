#!/usr/bin/env bash
# Engine benchmark: JSON Lines in memory -> parse -> key_by -> 5 s tumbling
# avg/max/count over 10,000 keys -> discard. Runs the hand-written baseline
# and rivulet (1 and 2 workers) interleaved, ROUNDS times, one process each,
# plus a three-stage graph (the same window, then 1-minute maxima of it and
# an alert on those) and a job graph of three streams (the window's results
# to a sink, to a filter and to 1-minute maxima, each with its own sink),
# and writes bench-pi/reports/engine-latest.md.
#   bash bench-pi/engine.sh [EVENTS] [ROUNDS]
# With BEFORE=path/to/an/older/engine, that build's rivulet runs too, in the
# same rounds, so a change is measured against what it replaces:
#   git worktree add /tmp/old <rev> && (cd /tmp/old && cargo build --release -p rivulet-bench)
#   BEFORE=/tmp/old/target/release/engine bash bench-pi/engine.sh
set -euo pipefail
cd "$(dirname "$0")/.."
EVENTS=${1:-10000000}
ROUNDS=${2:-3}
cargo build --release -p rivulet-bench >/dev/null 2>&1
B=target/release/engine
OUT=$(mktemp)
label() { sed "s/^{/{\"build\":\"$1\",/"; }
for r in $(seq "$ROUNDS"); do
  $B source "$EVENTS" | label now >>"$OUT"
  $B baseline "$EVENTS" | label now >>"$OUT"
  # Alternate which build goes first, so drift favours neither.
  order="now before"
  [ $((r % 2)) = 0 ] && order="before now"
  for build in $order; do
    if [ "$build" = before ]; then
      [ -n "${BEFORE:-}" ] || continue
      E=$BEFORE
    else
      E=$B
    fi
    $E rivulet 1 "$EVENTS" | label "$build" >>"$OUT"
    $E rivulet 2 "$EVENTS" | label "$build" >>"$OUT"
    # The three-stage graph (steps after the window) and a job graph of
    # three streams (fan-out of the window's results); an older build
    # without a case prints no row.
    $E graph 2 "$EVENTS" 2>/dev/null | label "$build" >>"$OUT" || true
    $E streams 2 "$EVENTS" 2>/dev/null | label "$build" >>"$OUT" || true
  done
  # The window with a tee beside it (every event forwarded as it came).
  $B tee 2 "$EVENTS" | label now >>"$OUT"
done
python3 bench-pi/report.py engine "$OUT" "$($B line-length)" > bench-pi/reports/engine-latest.md
cat bench-pi/reports/engine-latest.md
