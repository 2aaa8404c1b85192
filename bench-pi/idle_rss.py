#!/usr/bin/env python3
"""Idle memory with the HTTP endpoint on: configs/sensor-averages.yaml on a
local Mosquitto (state on, no input), `--http` on, one request each to
/metrics, / and /api/status at 11 s, RSS read every 5 s for 70 s.

    python3 bench-pi/idle_rss.py [--traffic] BINARY [BINARY ...]

With --traffic, each pipeline first gets 5,000 readings over 50 sensors at
8 s (windows fire, the journal and checkpoints are written), so the figures
after it are those of a pipeline that has worked and gone quiet.

Each binary runs at the same time as the others, on its own broker, state
directory and port (idle memory does not drift with CPU speed the way CPU
time does, but side by side is still the fairest). For each it prints RSS,
the executable's resident code (from /proc/PID/smaps) and anonymous memory
over time, and the wake-ups per second while idle (voluntary context
switches of all threads over 10 s), as a Markdown table."""
import os, re, shutil, socket, subprocess, sys, tempfile, time, urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def memory(pid, exe):
    """(RSS KB, executable's resident KB, anonymous KB)."""
    rss = code = anon = 0
    current = None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                parts = line.split()
                current = parts[5] if len(parts) > 5 else ""
            elif line.startswith("Rss:"):
                kb = int(line.split()[1])
                rss += kb
                if current and os.path.realpath(current) == exe:
                    code += kb
            elif line.startswith("Anonymous:"):
                anon += int(line.split()[1])
    return rss, code, anon


def publish(port):
    """5,000 readings over 50 sensors, 100 per sensor, 10 ms of event
    time apart, ending now: windows fire and checkpoints are written."""
    now = int(time.time() * 1000)
    lines = "\n".join(f'{{"temperature": {60 + i % 20}, "ts": {now + i * 10}}}' for i in range(-100, 0))
    pubs = [subprocess.Popen(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-q", "1", "-l",
                              "-t", f"sensors/s{s}/temperature"], stdin=subprocess.PIPE, text=True)
            for s in range(50)]
    for p in pubs:
        p.communicate(lines)


def switches(pid):
    total = 0
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{t}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches"):
                        total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total


def main():
    args = sys.argv[1:]
    traffic = "--traffic" in args
    binaries = [os.path.realpath(b) for b in args if b != "--traffic"]
    if not binaries:
        sys.exit(__doc__)
    work = tempfile.mkdtemp(prefix="idle-rss-")
    procs = []
    try:
        runs = []
        for i, exe in enumerate(binaries):
            d = os.path.join(work, str(i))
            os.makedirs(d)
            port = free_port()
            conf = os.path.join(d, "mosquitto.conf")
            with open(conf, "w") as f:
                f.write(f"listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n")
            procs.append(subprocess.Popen(["mosquitto", "-c", conf], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            with open(os.path.join(ROOT, "configs/sensor-averages.yaml")) as f:
                yaml = f.read().replace("localhost:1883", f"127.0.0.1:{port}")
            with open(os.path.join(d, "p.yaml"), "w") as f:
                f.write(yaml)
            runs.append((exe, d, free_port(), port))
        time.sleep(0.5)
        children = []
        for exe, d, http, _ in runs:
            p = subprocess.Popen([exe, "run", "p.yaml", "--http", f"127.0.0.1:{http}"], cwd=d,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(p)
            children.append((exe, p, http))
        rows = {exe: [] for exe in binaries}
        start = time.time()
        asked = False
        sent = not traffic
        wake = {}
        for t in range(1, 72, 5):
            time.sleep(max(0, start + t - time.time()))
            if t >= 6 and not sent:
                time.sleep(max(0, start + 8 - time.time()))
                for _, _, _, port in runs:
                    publish(port)
                sent = True
            if t >= 11 and not asked:
                for exe, p, http in children:
                    for path in ["/metrics", "/", "/api/status"]:
                        urllib.request.urlopen(f"http://127.0.0.1:{http}{path}", timeout=10).read()
                asked = True
                time.sleep(1)
            for exe, p, http in children:
                rows[exe].append((round(time.time() - start), *memory(p.pid, exe)))
            if t == 46:
                wake = {exe: switches(p.pid) for exe, p, _ in children}
            if t == 56:
                wake = {exe: (switches(p.pid) - wake[exe]) / 10 for exe, p, _ in children}
        for exe in binaries:
            print(f"\n{exe} ({os.path.getsize(exe) / 1e6:.1f} MB), idle wake-ups: {wake.get(exe, 0):.0f}/s\n")
            print("| time | RSS MB | executable's code MB | anonymous MB |")
            print("|---|---|---|---|")
            for t, rss, code, anon in rows[exe]:
                print(f"| {t} s | {rss / 1024:.1f} | {code / 1024:.1f} | {anon / 1024:.1f} |")
    finally:
        for p in procs:
            p.kill()
            p.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
