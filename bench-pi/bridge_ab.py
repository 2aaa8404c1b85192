#!/usr/bin/env python3
"""The bridge, two rivulet builds against Mosquitto's own bridge and the
plain relay, rounds interleaved (per-core speed drifts between minutes, so
only same-run ratios count):

    python3 bench-pi/bridge_ab.py OLD_RIVULET NEW_RIVULET [ROUNDS] [--quick]

Each round runs, at QoS 0 and 1 and at 1,000 msg/s, 10,000 msg/s and full
speed, broker A to broker B through Mosquitto's bridge (in A), through
`mqtt_raw relay` (a plain one-thread relay in its own process: the floor of
any bridge that is not inside the broker; `relay-lazy` leaves B's PUBACKs in
the socket for 64 messages, one wake-up per message) and through each build
(`case_bridge` of mqtt_bench.py), the order of the cases turning each
round. CPU per message is broker A's plus the bridge process's, as in
mqtt_bench.py. Prints one JSON line per case and a table of medians, with
each case's CPU ratio to Mosquitto's bridge of its round."""
import json, os, statistics, sys, tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mqtt_bench as mb  # noqa: E402

args = [a for a in sys.argv[1:] if not a.startswith("--")]
old, new = os.path.abspath(args[0]), os.path.abspath(args[1])
rounds = int(args[2]) if len(args) > 2 else 3
quick = "--quick" in sys.argv
work = tempfile.mkdtemp()
KINDS = ["mosquitto", "relay", "relay-lazy", "old", "new"]


def run(kind, qos, rate, n):
    if kind in ("old", "new"):
        mb.RIVULET = old if kind == "old" else new
        return mb.case_bridge(work, "rivulet", qos, rate, n)
    return mb.case_bridge(work, kind, qos, rate, n)


res = {}
for rnd in range(rounds):
    order = KINDS[rnd % len(KINDS):] + KINDS[:rnd % len(KINDS)]
    for qos in (0, 1):
        for rate in (1000, 10000, 0):
            n = rate * (3 if quick else 6) if rate else mb.N[qos] // (4 if quick else 1)
            for kind in order:
                r = run(kind, qos, rate, n)
                res.setdefault((qos, rate, kind), []).append(r)
                print(json.dumps({"round": rnd, "qos": qos, "offered": rate, "case": kind, **r}), flush=True)

med = lambda rs, k: statistics.median((x.get(k) or 0) for x in rs)
print("\n| QoS | offered | case | msg/s | CPU µs/msg (A + bridge) | of it the bridge process | CPU ÷ Mosquitto's bridge | p50 / p99 ms |")
print("|---|---|---|---|---|---|---|---|")
for qos in (0, 1):
    for rate in (1000, 10000, 0):
        m = med(res[(qos, rate, "mosquitto")], "cpu_us_per_msg")
        for kind in KINDS:
            rs = res[(qos, rate, kind)]
            own = "" if kind == "mosquitto" else f"{med(rs, 'bridge_cpu_us_per_msg'):.1f}"
            print(f"| {qos} | {'max' if rate == 0 else f'{rate:,}/s'} | {kind} | {med(rs, 'rate'):,.0f} | "
                  f"{med(rs, 'cpu_us_per_msg'):.1f} | {own} | {med(rs, 'cpu_us_per_msg') / max(m, 1e-9):.2f} | "
                  f"{med(rs, 'p50_ms'):.2f} / {med(rs, 'p99_ms'):.2f} |")
