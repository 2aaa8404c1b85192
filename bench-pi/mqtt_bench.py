#!/usr/bin/env python3
"""MQTT benchmark: Mosquitto's own ceiling and a minimal relay, against
rivulet, on the same stream of ~100-byte JSON readings, in one run.

    python3 bench-pi/mqtt_bench.py [--quick]
    python3 bench-pi/mqtt_bench.py --journal [--quick]
    python3 bench-pi/mqtt_bench.py --baselines [--quick]

Writes bench-pi/reports/mqtt-latest.md (compare with mqtt.md). With
--journal: the window case with and without `state:` (the input journal and
1 s checkpoints), rounds interleaved, to bench-pi/reports/mqtt-journal-latest.md.
With --baselines: a plain batched reader (mqtt_raw) against rivulet's window
pipeline, and Mosquitto's own bridge against rivulet as a bridge between two
brokers, all fed by the plain batched publisher, rounds interleaved, to
bench-pi/reports/mqtt-baselines-latest.md."""
import json, os, shutil, socket, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "target/release/mqtt_tools")
RAW = os.path.join(ROOT, "target/release/mqtt_raw")
RIVULET = os.environ.get("RIVULET", os.path.join(ROOT, "target/release/rivulet"))
QUICK = "--quick" in sys.argv
N = {0: 100_000 if QUICK else 400_000, 1: 50_000 if QUICK else 200_000}
SENSORS = 10_000
TICK = os.sysconf("SC_CLK_TCK")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Broker:
    def __init__(self, work, inflight=0, extra=""):
        self.port = free_port()
        conf = os.path.join(work, f"mosquitto-{self.port}.conf")
        with open(conf, "w") as f:
            f.write(f"listener {self.port} 127.0.0.1\nallow_anonymous true\nuser root\n"
                    "set_tcp_nodelay true\nmax_queued_messages 10000000\nmax_queued_bytes 0\n"
                    f"max_inflight_messages {inflight}\npersistence false\nlog_type error\n" + extra)
        self.proc = subprocess.Popen(["mosquitto", "-c", conf], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", self.port)).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start")

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


def cpu_s(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def counter(port, filt, n, timeout=5):
    p = subprocess.Popen([TOOLS, "count", str(port), filt, str(n), str(timeout)], stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    assert json.loads(line).get("ready"), line
    return p


def finish(p):
    out, _ = p.communicate(timeout=600)
    return json.loads(out.strip().splitlines()[-1])


def load(port, qos, n, rate):
    out = subprocess.run([TOOLS, "load", str(port), str(qos), str(n), str(rate), str(SENSORS)],
                         capture_output=True, text=True, timeout=600).stdout
    return json.loads(out.strip().splitlines()[-1])


WINDOW = """name: bench-window
source:
  mqtt: {{ url: "mqtt://127.0.0.1:{port}", topics: ["sensors/+/t"], qos: {qos} }}
  event_time: {{ field: ts, max_out_of_orderness: 1s }}
steps:
  - key_by: sensor_id
  - window:
      tumbling: 5s
      aggregate: {{ avg_t: avg(temperature), max_t: max(temperature), n: count() }}
sink: {{ file: {{ path: /dev/null }} }}
"""

BRIDGE = """name: bench-bridge
source:
  mqtt: {{ url: "mqtt://127.0.0.1:{port}", topics: ["sensors/{{sensor}}/t"], qos: {qos}, topic_field: "" }}
steps:
  - map: {{ celsius: (temperature - 32) * 5 / 9 }}
sink:
  mqtt: {{ url: "mqtt://127.0.0.1:{port}", topic: "out/sensors/{{sensor}}/t", qos: {qos} }}
"""


def start_rivulet(work, yaml):
    path = os.path.join(work, "pipeline.yaml")
    with open(path, "w") as f:
        f.write(yaml)
    stats = os.path.join(work, "stats.json")
    if os.path.exists(stats):
        os.remove(stats)
    p = subprocess.Popen([RIVULET, "run", path, "--stats-file", stats], stdout=subprocess.DEVNULL,
                         stderr=open(os.path.join(work, "rivulet.log"), "w"), cwd=work)
    time.sleep(1.0)  # connect and subscribe
    return p, stats


def read_stats(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def stop(p):
    p.terminate()
    p.wait(timeout=60)


def rate_since(t0, res, n):
    """Messages per second from the start of the load to the last one seen."""
    return n / max(res["last_unix_ms"] / 1000 - t0, 1e-3)


def case_ceiling(b, qos):
    c = counter(b.port, "sensors/#", N[qos])
    t0 = time.time()
    load(b.port, qos, N[qos], 0)
    r = finish(c)
    return {"rate": rate_since(t0, r, r["received"]), "received": r["received"]}


def case_rivulet_window(b, work, qos, state=False):
    yaml = WINDOW.format(port=b.port, qos=qos)
    if state:
        sd = os.path.join(work, "state")
        shutil.rmtree(sd, ignore_errors=True)
        yaml += f"state: {{ dir: {sd}, checkpoint_interval: 1s }}\n"
    p, stats = start_rivulet(work, yaml)
    cpu0 = cpu_s(p.pid)
    t0 = time.time()
    load(b.port, qos, N[qos], 0)
    first = last = None
    deadline = time.time() + 300
    while time.time() < deadline:
        s = read_stats(stats)
        if s and s["events_read"] > 0 and first is None:
            first = (s["time_ms"], s["events_read"])
        if s and s["events_read"] >= N[qos]:
            last = (s["time_ms"], s["events_read"])
            break
        time.sleep(0.05)
    cpu = cpu_s(p.pid) - cpu0
    rss = rss_mb(p.pid)
    stop(p)
    if not last:
        return {"rate": 0, "received": (read_stats(stats) or {}).get("events_read", 0)}
    # The stats file is written every 200 ms: the end time is that coarse.
    rate = last[1] / max(last[0] / 1000 - t0, 1e-3)
    return {"rate": rate, "received": last[1], "cpu_us_per_msg": cpu * 1e6 / N[qos], "rss_mb": rss}


def case_relay(b, qos, rate=0, n=None):
    n = n or N[qos]
    r = subprocess.Popen([TOOLS, "relay", str(b.port), "sensors/#", str(qos)])
    time.sleep(0.5)
    c = counter(b.port, "out/#", n)
    cpu0 = cpu_s(r.pid)
    t0 = time.time()
    load(b.port, qos, n, rate)
    res = finish(c)
    res["rate"] = rate_since(t0, res, res["received"])
    res["cpu_us_per_msg"] = (cpu_s(r.pid) - cpu0) * 1e6 / n
    res["rss_mb"] = rss_mb(r.pid)
    stop(r)
    return res


def case_rivulet_bridge(b, work, qos, rate=0, n=None):
    n = n or N[qos]
    p, _ = start_rivulet(work, BRIDGE.format(port=b.port, qos=qos))
    c = counter(b.port, "out/#", n)
    cpu0 = cpu_s(p.pid)
    t0 = time.time()
    load(b.port, qos, n, rate)
    res = finish(c)
    res["rate"] = rate_since(t0, res, res["received"])
    res["cpu_us_per_msg"] = (cpu_s(p.pid) - cpu0) * 1e6 / n
    res["rss_mb"] = rss_mb(p.pid)
    stop(p)
    return res


def main():
    for tool in ("mosquitto",):
        if not shutil.which(tool):
            sys.exit(f"{tool} is needed")
    subprocess.run(["cargo", "build", "--release", "-p", "rivulet", "-p", "rivulet-bench"], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    work = tempfile.mkdtemp()

    def fresh(case, *args):
        # Each case gets a broker of its own, so no backlog of an earlier
        # case can slow it down. With --journal, the broker lets at most
        # 1000 messages wait for their PUBACK (as docs/state.md advises),
        # so acknowledgements cannot trail far behind what is counted.
        b = Broker(work, 1000 if "--journal" in sys.argv else 0)
        try:
            return case(b, *args)
        finally:
            b.stop()

    if "--journal" in sys.argv:
        return journal(fresh, work)
    if "--baselines" in sys.argv:
        return baselines(fresh, work)
    rows = []
    for qos in (0, 1):
        ceil = fresh(case_ceiling, qos)
        win = fresh(case_rivulet_window, work, qos)
        relay = fresh(case_relay, qos)
        bridge = fresh(case_rivulet_bridge, work, qos)
        rows.append((qos, ceil, win, relay, bridge))
        print(json.dumps({"qos": qos, "ceiling": ceil, "window": win, "relay": relay, "bridge": bridge}), flush=True)
    lat = []
    for qos in (0, 1):
        for rate in (1000, 10000, 50000):
            n = min(rate * (3 if QUICK else 6), 300_000)
            rl = fresh(case_relay, qos, rate, n)
            rv = fresh(case_rivulet_bridge, work, qos, rate, n)
            lat.append((qos, rate, n, rl, rv))
            print(json.dumps({"qos": qos, "rate": rate, "relay": rl, "rivulet": rv}), flush=True)
    out = ["| QoS | broker ceiling (msg/s) | rivulet window (msg/s) | window ÷ ceiling | rivulet window CPU µs/msg | relay (msg/s) | rivulet bridge (msg/s) | bridge ÷ relay | relay CPU µs/msg | rivulet bridge CPU µs/msg | rivulet RSS MB (window / bridge) |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for qos, ceil, win, relay, bridge in rows:
        out.append(f"| {qos} | {ceil['rate']:,.0f} | {win['rate']:,.0f} | {win['rate'] / ceil['rate']:.2f} | {win.get('cpu_us_per_msg', 0):.1f} | "
                   f"{relay['rate']:,.0f} | {bridge['rate']:,.0f} | {bridge['rate'] / relay['rate']:.2f} | {relay['cpu_us_per_msg']:.1f} | "
                   f"{bridge['cpu_us_per_msg']:.1f} | {win.get('rss_mb', 0):.1f} / {bridge['rss_mb']:.1f} |")
    out += ["", "| QoS | offered msg/s | messages | relay p50 / p99 ms | rivulet bridge p50 / p99 ms | delivered (relay / rivulet) |", "|---|---|---|---|---|---|"]
    for qos, rate, n, rl, rv in lat:
        out.append(f"| {qos} | {rate:,} | {n:,} | {rl['p50_ms']:.2f} / {rl['p99_ms']:.2f} | {rv['p50_ms']:.2f} / {rv['p99_ms']:.2f} | {rl['received']:,} / {rv['received']:,} |")
    report = "\n".join(out) + "\n"
    with open(os.path.join(ROOT, "bench-pi/reports/mqtt-latest.md"), "w") as f:
        f.write(report)
    print(report)


def journal(fresh, work):
    """The input journal's cost: the window case with and without state."""
    import statistics
    res = {}
    for rnd in range(3):
        for qos in (0, 1):
            for state in (False, True):
                r = fresh(case_rivulet_window, work, qos, state)
                res.setdefault((qos, state), []).append(r)
                print(json.dumps({"round": rnd, "qos": qos, "state": state, **r}), flush=True)
    med = lambda rs, k: statistics.median(r.get(k, 0) for r in rs)
    out = ["| QoS | without state (msg/s) | with journal + 1 s checkpoints (msg/s) | ratio | CPU µs/msg without / with | RSS MB without / with |",
           "|---|---|---|---|---|---|"]
    for qos in (0, 1):
        a, b = res[(qos, False)], res[(qos, True)]
        out.append(f"| {qos} | {med(a, 'rate'):,.0f} | {med(b, 'rate'):,.0f} | {med(b, 'rate') / max(med(a, 'rate'), 1):.2f} | "
                   f"{med(a, 'cpu_us_per_msg'):.1f} / {med(b, 'cpu_us_per_msg'):.1f} | {med(a, 'rss_mb'):.1f} / {med(b, 'rss_mb'):.1f} |")
    report = "\n".join(out) + "\n"
    with open(os.path.join(ROOT, "bench-pi/reports/mqtt-journal-latest.md"), "w") as f:
        f.write(report)
    print(report)


def raw_sub(port, filt, qos, n, timeout=5, coalesce_us=0):
    p = subprocess.Popen([RAW, "sub", str(port), filt, str(qos), str(n), str(timeout), str(coalesce_us)],
                         stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    assert json.loads(line).get("ready"), line
    return p


def raw_pub(port, qos, n, rate):
    out = subprocess.run([RAW, "pub", str(port), str(qos), str(n), str(rate), str(SENSORS)],
                         capture_output=True, text=True, timeout=600).stdout
    return json.loads(out.strip().splitlines()[-1])


# What rivulet's MQTT source waits for more of a busy stream (COALESCE in
# runtime/src/mqtt/direct.rs); the coalescing reader waits as long.
COALESCE_US = 200


def case_raw_reader(b, qos, coalesce_us=0):
    """The plain batched reader: the floor of an MQTT client's cost. With
    coalesce_us, it reads a busy stream in slices as rivulet does."""
    c = raw_sub(b.port, "sensors/#", qos, N[qos], coalesce_us=coalesce_us)
    cpu0 = cpu_s(c.pid)
    t0 = time.time()
    raw_pub(b.port, qos, N[qos], 0)
    cpu = cpu_s(c.pid) - cpu0
    r = finish(c)
    return {"rate": rate_since(t0, r, r["received"]), "received": r["received"], "cpu_us_per_msg": cpu * 1e6 / N[qos]}


def case_window_raw_fed(b, work, qos):
    """rivulet's window pipeline, fed by the plain batched publisher."""
    p, stats = start_rivulet(work, WINDOW.format(port=b.port, qos=qos))
    cpu0 = cpu_s(p.pid)
    t0 = time.time()
    raw_pub(b.port, qos, N[qos], 0)
    last = None
    deadline = time.time() + 300
    while time.time() < deadline:
        s = read_stats(stats)
        if s and s["events_read"] >= N[qos]:
            last = (s["time_ms"], s["events_read"])
            break
        time.sleep(0.05)
    cpu = cpu_s(p.pid) - cpu0
    stop(p)
    if not last:
        return {"rate": 0, "received": (read_stats(stats) or {}).get("events_read", 0), "cpu_us_per_msg": 0}
    return {"rate": last[1] / max(last[0] / 1000 - t0, 1e-3), "received": last[1], "cpu_us_per_msg": cpu * 1e6 / N[qos]}


RAW_BRIDGE = """name: bench-raw-bridge
source:
  mqtt: {{ url: "mqtt://127.0.0.1:{a}", topics: ["sensors/#"], qos: {qos} }}
  format: raw
sink:
  mqtt: {{ url: "mqtt://127.0.0.1:{b}", topic: "{{topic}}", qos: {qos} }}
"""


def case_bridge(work, kind, qos, rate=0, n=None):
    """Broker A to broker B, by Mosquitto's bridge (in A), by rivulet, or by
    the plain relay (`mqtt_raw relay`: the floor of a bridge in its own
    process); CPU per message is A's plus the bridge's (what bridging adds
    to the plain broker path), and the bridge process's alone."""
    n = n or N[qos]
    b = Broker(work)
    extra = ""
    if kind == "mosquitto":
        extra = (f"connection to-b\naddress 127.0.0.1:{b.port}\ntopic sensors/# out {qos}\n"
                 "cleansession true\nbridge_protocol_version mqttv311\n")
    a = Broker(work, 0, extra)
    r = None
    try:
        if kind == "rivulet":
            r, _ = start_rivulet(work, RAW_BRIDGE.format(a=a.port, b=b.port, qos=qos))
        elif kind in ("relay", "relay-lazy"):
            lazy = ["lazy-acks"] if kind == "relay-lazy" else []
            r = subprocess.Popen([RAW, "relay", str(a.port), str(b.port), "sensors/#", str(qos)] + lazy)
            time.sleep(0.5)
        else:
            time.sleep(1.0)  # the bridge connects
        c = raw_sub(b.port, "sensors/#", qos, n)
        cpu_a0 = cpu_s(a.proc.pid)
        cpu_r0 = cpu_s(r.pid) if r else 0
        t0 = time.time()
        raw_pub(a.port, qos, n, rate)
        res = finish(c)
        cpu_a = cpu_s(a.proc.pid) - cpu_a0
        cpu_r = (cpu_s(r.pid) - cpu_r0) if r else 0
        res["rate"] = rate_since(t0, res, res["received"])
        res["cpu_us_per_msg"] = (cpu_a + cpu_r) * 1e6 / n
        res["bridge_cpu_us_per_msg"] = cpu_r * 1e6 / n if r else None
        return res
    finally:
        if r:
            stop(r)
        a.stop()
        b.stop()


def baselines(fresh, work):
    import statistics
    rounds = 1 if QUICK else 3
    res = {}
    for rnd in range(rounds):
        for qos in (0, 1):
            for name, run in (("reader", lambda: fresh(case_raw_reader, qos)),
                              ("reader-coalescing", lambda: fresh(case_raw_reader, qos, COALESCE_US)),
                              ("window", lambda: fresh(case_window_raw_fed, work, qos)),
                              ("mosquitto", lambda: case_bridge(work, "mosquitto", qos)),
                              ("rivulet", lambda: case_bridge(work, "rivulet", qos))):
                r = run()
                res.setdefault((qos, name), []).append(r)
                print(json.dumps({"round": rnd, "qos": qos, "case": name, **r}), flush=True)
        for qos in (0, 1):
            for rate in (1000, 10000):
                n = rate * (3 if QUICK else 6)
                for kind in ("mosquitto", "rivulet"):
                    r = case_bridge(work, kind, qos, rate, n)
                    res.setdefault((qos, kind, rate), []).append(r)
                    print(json.dumps({"round": rnd, "qos": qos, "rate": rate, "case": kind, **r}), flush=True)
    med = lambda rs, k: statistics.median((r.get(k) or 0) for r in rs)
    out = ["Ingest: the plain batched reader (as it is, and reading a busy stream in slices as rivulet does) against rivulet's window pipeline, all fed by the plain batched publisher (medians of the rounds).", "",
           "| QoS | reader msg/s | rivulet window msg/s | rate ratio | reader CPU µs/msg | coalescing reader CPU µs/msg | rivulet CPU µs/msg | CPU ratio (to reader / to coalescing reader) |",
           "|---|---|---|---|---|---|---|---|"]
    for qos in (0, 1):
        a, c, w = res[(qos, "reader")], res[(qos, "reader-coalescing")], res[(qos, "window")]
        out.append(f"| {qos} | {med(a, 'rate'):,.0f} | {med(w, 'rate'):,.0f} | {med(w, 'rate') / max(med(a, 'rate'), 1):.2f} | "
                   f"{med(a, 'cpu_us_per_msg'):.2f} | {med(c, 'cpu_us_per_msg'):.2f} | {med(w, 'cpu_us_per_msg'):.2f} | "
                   f"{med(w, 'cpu_us_per_msg') / max(med(a, 'cpu_us_per_msg'), 1e-9):.2f} / {med(w, 'cpu_us_per_msg') / max(med(c, 'cpu_us_per_msg'), 1e-9):.2f} |")
    out += ["", "Bridge, broker A to broker B: Mosquitto's own bridge against rivulet (`format: raw`, `{topic}`). CPU per message is broker A's plus rivulet's.", "",
            "| QoS | offered | Mosquitto msg/s | rivulet msg/s | ratio | Mosquitto CPU µs/msg | rivulet CPU µs/msg (of it rivulet) | CPU ratio | Mosquitto p50 / p99 ms | rivulet p50 / p99 ms |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for qos in (0, 1):
        for rate in (0, 1000, 10000):
            m = res[(qos, "mosquitto")] if rate == 0 else res[(qos, "mosquitto", rate)]
            r = res[(qos, "rivulet")] if rate == 0 else res[(qos, "rivulet", rate)]
            out.append(f"| {qos} | {'max' if rate == 0 else f'{rate:,}/s'} | {med(m, 'rate'):,.0f} | {med(r, 'rate'):,.0f} | {med(r, 'rate') / max(med(m, 'rate'), 1):.2f} | "
                       f"{med(m, 'cpu_us_per_msg'):.2f} | {med(r, 'cpu_us_per_msg'):.2f} ({med(r, 'bridge_cpu_us_per_msg'):.2f}) | "
                       f"{med(r, 'cpu_us_per_msg') / max(med(m, 'cpu_us_per_msg'), 1e-9):.2f} | "
                       f"{med(m, 'p50_ms'):.2f} / {med(m, 'p99_ms'):.2f} | {med(r, 'p50_ms'):.2f} / {med(r, 'p99_ms'):.2f} |")
    report = "\n".join(out) + "\n"
    with open(os.path.join(ROOT, "bench-pi/reports/mqtt-baselines-latest.md"), "w") as f:
        f.write(report)
    print(report)


if __name__ == "__main__":
    main()
