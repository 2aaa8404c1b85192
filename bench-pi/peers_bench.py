#!/usr/bin/env python3
"""Peer-mode benchmark: 1, 2 and 3 peers of one cluster on one Mosquitto,
fed the same QoS 1 stream, rounds interleaved; then the recovery time after
a kill -9 and the time a joining peer takes to be part of the cluster.

    cargo build --release -p rivulet -p rivulet-bench
    python3 bench-pi/peers_bench.py [--quick]

Writes bench-pi/reports/peers-latest.md (compare with peers.md). Per case:
messages/s from the first message sent to the last one read by a peer,
CPU (user + system) per event of each peer and of the whole cluster, and
the broker's. Peers read their share from a shared subscription, journal
it (QoS 1 acknowledged once on disk), forward events to their owners over
the peer links and checkpoint globally every second."""
import json, os, shutil, statistics, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mqtt_bench as mb  # noqa: E402  (Broker, load, cpu_s, rss_mb, free_port)

QUICK = "--quick" in sys.argv
N = 30_000 if QUICK else 120_000
ROUNDS = 1 if QUICK else 3

PIPELINE = """name: bench-peers
source:
  mqtt: {{ url: "mqtt://127.0.0.1:{port}", topics: ["sensors/+/t"], qos: 1 }}
  event_time: {{ field: ts, max_out_of_orderness: 1s }}
steps:
  - key_by: sensor_id
  - window:
      tumbling: 5s
      aggregate: {{ avg_t: avg(temperature), max_t: max(temperature), n: count() }}
sink: {{ file: {{ path: /dev/null }} }}
state: {{ dir: state, checkpoint_interval: 1s }}
peers: {{ cluster: bench, id: {id}, listen: "127.0.0.1:{peer_port}", keep_alive: 2s, failure_timeout: 30s }}
"""


class Peer:
    def __init__(self, root, port, pid):
        self.id = pid
        self.dir = os.path.join(root, pid)
        os.makedirs(self.dir, exist_ok=True)
        with open(os.path.join(self.dir, "pipeline.yaml"), "w") as f:
            f.write(PIPELINE.format(port=port, id=pid, peer_port=mb.free_port()))
        self.proc = None

    def start(self):
        env = dict(os.environ, RUST_LOG="info,rivulet::cluster=debug")
        self.log = open(os.path.join(self.dir, "log.txt"), "a")
        self.proc = subprocess.Popen([mb.RIVULET, "run", "pipeline.yaml", "--stats-file", "stats.json"],
                                     cwd=self.dir, stdout=subprocess.DEVNULL, stderr=self.log, env=env)

    def kill9(self):
        self.proc.kill()
        self.proc.wait()

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=60)

    def events(self):
        try:
            with open(os.path.join(self.dir, "stats.json")) as f:
                return json.load(f).get("events_read", 0)
        except (OSError, ValueError):
            return 0

    def text(self):
        with open(os.path.join(self.dir, "log.txt")) as f:
            return f.read()

    def view_size(self):
        views = [l for l in self.text().splitlines() if "starting a view" in l]
        return views[-1].split("members=")[1].count('"') // 2 if views else 0

    def applied_since(self, offset):
        return self.text()[offset:].count("global checkpoint applied")


def wait(what, f, timeout=120):
    t0 = time.time()
    while not f():
        if time.time() - t0 > timeout:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.02)
    return time.time() - t0


def cluster(root, b, n):
    peers = [Peer(root, b.port, f"p{i}") for i in range(n)]
    for p in peers:
        p.start()
    wait("the view", lambda: all(p.view_size() == n for p in peers))
    time.sleep(1.5)  # subscribed, first checkpoints
    return peers


def case_throughput(root, n):
    b = mb.Broker(root, inflight=1000)
    try:
        peers = cluster(root, b, n)
        cpu0 = {p.id: mb.cpu_s(p.proc.pid) for p in peers}
        bcpu0 = mb.cpu_s(b.proc.pid)
        t0 = time.time()
        mb.load(b.port, 1, N, 0)
        wait("every event read", lambda: sum(p.events() for p in peers) >= N, timeout=600)
        took = time.time() - t0
        per_peer = {p.id: (mb.cpu_s(p.proc.pid) - cpu0[p.id]) for p in peers}
        reads = {p.id: p.events() for p in peers}
        broker = mb.cpu_s(b.proc.pid) - bcpu0
        for p in peers:
            p.stop()
        return {
            "peers": n,
            "rate": N / took,
            "cpu_us_per_event_cluster": sum(per_peer.values()) / N * 1e6,
            "cpu_us_per_event_per_peer": statistics.median(per_peer[k] / max(reads[k], 1) * 1e6 for k in per_peer),
            "broker_cpu_us_per_msg": broker / N * 1e6,
            "shares": sorted(reads.values()),
        }
    finally:
        b.stop()


def case_recovery(root):
    """3 peers under a paced load; kill -9 one and restart it at once: the
    time until the cluster completes a global checkpoint with it again."""
    b = mb.Broker(root, inflight=1000)
    try:
        peers = cluster(root, b, 3)
        loader = subprocess.Popen([mb.TOOLS, "load", str(b.port), "1", str(10**9), "2000", str(mb.SENSORS)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(3)
        victim = peers[2]
        offset = len(victim.text())
        t0 = time.time()
        victim.kill9()
        victim.start()
        wait("a global checkpoint with the restarted peer", lambda: victim.applied_since(offset) > 0)
        recovery = time.time() - t0
        # Rebalance on join: a 4th peer joins the loaded cluster.
        joiner = Peer(root, b.port, "p3")
        t1 = time.time()
        joiner.start()
        wait("the joiner's first global checkpoint", lambda: joiner.applied_since(0) > 0)
        join = time.time() - t1
        loader.kill()
        for p in peers + [joiner]:
            p.stop()
        return {"recovery_s": recovery, "join_s": join}
    finally:
        b.stop()


def main():
    if not os.path.exists(mb.RIVULET) or not os.path.exists(mb.TOOLS):
        sys.exit("build first: cargo build --release -p rivulet -p rivulet-bench")
    res = {}
    for rnd in range(ROUNDS):
        for n in (1, 2, 3):
            root = tempfile.mkdtemp(prefix="peers-bench-")
            try:
                r = case_throughput(root, n)
            finally:
                shutil.rmtree(root, ignore_errors=True)
            res.setdefault(n, []).append(r)
            print(json.dumps({"round": rnd, **r}), flush=True)
    rec = []
    for rnd in range(ROUNDS):
        root = tempfile.mkdtemp(prefix="peers-bench-")
        try:
            r = case_recovery(root)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        rec.append(r)
        print(json.dumps({"round": rnd, **r}), flush=True)
    med = lambda rs, k: statistics.median(r[k] for r in rs)
    out = [f"{N:,} QoS 1 messages (~100-byte JSON, {mb.SENSORS:,} sensors), keyed 5 s window, 1 s global checkpoints; "
           f"median of {ROUNDS} interleaved round(s).", "",
           "| peers | msg/s | CPU µs per event, whole cluster | CPU µs per event read, per peer (median) | broker CPU µs per msg | events read per peer |",
           "|---|---|---|---|---|---|"]
    for n in (1, 2, 3):
        rs = res[n]
        out.append(f"| {n} | {med(rs, 'rate'):,.0f} | {med(rs, 'cpu_us_per_event_cluster'):.1f} | "
                   f"{med(rs, 'cpu_us_per_event_per_peer'):.1f} | {med(rs, 'broker_cpu_us_per_msg'):.1f} | {rs[-1]['shares']} |")
    out += ["", f"Recovery after kill -9 of one of 3 peers (restarted at once) until the next global checkpoint with it: "
            f"median {med(rec, 'recovery_s'):.2f} s; a 4th peer joining a loaded cluster until its first global checkpoint: "
            f"median {med(rec, 'join_s'):.2f} s (runs: {[round(r['recovery_s'], 2) for r in rec]}, {[round(r['join_s'], 2) for r in rec]})."]
    report = "\n".join(out) + "\n"
    with open(os.path.join(mb.ROOT, "bench-pi/reports/peers-latest.md"), "w") as f:
        f.write(report)
    print(report)


if __name__ == "__main__":
    main()
