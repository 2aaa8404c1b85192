#!/usr/bin/env python3
"""MQTT ingest, two rivulet builds against the plain batched reader, rounds
interleaved (per-core speed drifts between minutes, so only same-run
ratios count):

    python3 bench-pi/ingest_ab.py OLD_RIVULET NEW_RIVULET [ROUNDS] [--quick]

Each round runs, at QoS 0 and 1, the plain reader (mqtt_raw, as it is and
reading a busy stream in slices as rivulet does) and the
window pipeline of mqtt_bench.py with each build, each on a fresh broker
fed by the plain batched publisher. Prints one JSON line per case and a
table of medians: rate and CPU per message, and each build's CPU ratio to
the reader of its round."""
import json, os, statistics, sys, tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mqtt_bench as mb  # noqa: E402

args = [a for a in sys.argv[1:] if not a.startswith("--")]
old, new = os.path.abspath(args[0]), os.path.abspath(args[1])
rounds = int(args[2]) if len(args) > 2 else 3
work = tempfile.mkdtemp()


def fresh(case, *a):
    b = mb.Broker(work)
    try:
        return case(b, *a)
    finally:
        b.stop()


res = {}
for rnd in range(rounds):
    for qos in (0, 1):
        order = [("old", old), ("new", new)] if rnd % 2 == 0 else [("new", new), ("old", old)]
        r = fresh(mb.case_raw_reader, qos)
        res.setdefault((qos, "reader"), []).append(r)
        print(json.dumps({"round": rnd, "qos": qos, "case": "reader", **r}), flush=True)
        c = fresh(mb.case_raw_reader, qos, mb.COALESCE_US)
        c["ratio"] = c["cpu_us_per_msg"] / max(r["cpu_us_per_msg"], 1e-9)
        res.setdefault((qos, "coalescing reader"), []).append(c)
        print(json.dumps({"round": rnd, "qos": qos, "case": "coalescing reader", **c}), flush=True)
        for name, binary in order:
            mb.RIVULET = binary
            w = fresh(mb.case_window_raw_fed, work, qos)
            w["ratio"] = w["cpu_us_per_msg"] / max(r["cpu_us_per_msg"], 1e-9)
            res.setdefault((qos, name), []).append(w)
            print(json.dumps({"round": rnd, "qos": qos, "case": name, **w}), flush=True)

med = lambda rs, k: statistics.median(x[k] for x in rs)
print("\n| QoS | case | msg/s | CPU µs/msg | CPU ÷ reader's (same round) | rate ÷ reader's |")
print("|---|---|---|---|---|---|")
for qos in (0, 1):
    rd = med(res[(qos, "reader")], "rate")
    for name in ("reader", "coalescing reader", "old", "new"):
        rs = res[(qos, name)]
        ratio = "" if name == "reader" else f"{med(rs, 'ratio'):.2f}"
        print(f"| {qos} | {name} | {med(rs, 'rate'):,.0f} | {med(rs, 'cpu_us_per_msg'):.2f} | {ratio} | {med(rs, 'rate') / max(rd, 1):.2f} |")
