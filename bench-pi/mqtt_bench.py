#!/usr/bin/env python3
"""MQTT benchmark: Mosquitto's own ceiling and a minimal relay, against
rivulet, on the same stream of ~100-byte JSON readings, in one run.

    python3 bench-pi/mqtt_bench.py [--quick]
    python3 bench-pi/mqtt_bench.py --journal [--quick]

Writes bench-pi/reports/mqtt-latest.md (compare with mqtt.md). With
--journal: the window case with and without `state:` (the input journal and
1 s checkpoints), rounds interleaved, to bench-pi/reports/mqtt-journal-latest.md."""
import json, os, shutil, socket, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "target/release/mqtt_tools")
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
    def __init__(self, work, inflight=0):
        self.port = free_port()
        conf = os.path.join(work, "mosquitto.conf")
        with open(conf, "w") as f:
            f.write(f"listener {self.port} 127.0.0.1\nallow_anonymous true\nuser root\n"
                    "set_tcp_nodelay true\nmax_queued_messages 10000000\nmax_queued_bytes 0\n"
                    f"max_inflight_messages {inflight}\npersistence false\nlog_type error\n")
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


if __name__ == "__main__":
    main()
