#!/usr/bin/env python3
"""Writes cross/steady-order.txt: the functions a running pipeline executes
once it has started, in the order the shipped binaries lay them out.

Why: the kernel maps an executable's code in 64 KiB windows around each
page it faults in, so an idle pipeline that runs a few hundred functions
scattered over 7 MB of code keeps most of the code resident. Linked next to
each other (`cross/link-ordered.py` feeds this list to lld's
`--symbol-ordering-file`), the same functions fill a few hundred KB.

How: an unstripped static build (same profile as the shipped one) runs
`configs/sensor-averages.yaml` on a local Mosquitto under callgrind. Costs
are zeroed once the pipeline runs, so start-up code (argument parsing, YAML,
TLS set-up), which is released from memory two seconds after start
(`runtime/src/util/memory.rs`), is left out unless the steady state runs it
too. Phase 1 is idle with the HTTP endpoint asked for every page a scraper
or a person asks for; phase 2 is traffic (messages, window results, the
journal, checkpoints). The list is phase 1's functions, then phase 2's
others, each sorted by name; names are demangled without their hash, so the
list survives rebuilds, other targets and other compilers.

    python3 cross/make-order.py            # builds, profiles, writes the list

Needs valgrind, mosquitto and mosquitto_pub. Run it again after changing
what a running pipeline does (the list only moves code; a stale list costs
memory, never correctness)."""
import os, re, shutil, socket, subprocess, sys, tempfile, time, urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "cross", "steady-order.txt")
TRIPLE = "x86_64-unknown-linux-gnu"
# As cross/build.sh builds: static, and v0 symbol mangling, whose demangled
# names carry a generic function's type arguments, so the list names each
# instance rather than every instance of a generic function.
RUSTFLAGS = "-C target-feature=+crt-static -C symbol-mangling-version=v0"


def plain(name):
    """A demangled name without what depends on the build: the legacy
    mangling's trailing `::h<hash>` and the v0 mangling's crate
    disambiguators (`core[c1f1a4ba060b9bfa]`)."""
    name = re.sub(r"::h[0-9a-f]{16}$", "", name)
    return re.sub(r"\[[0-9a-f]{1,16}\]", "", name)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def build():
    env = dict(os.environ)
    env["CARGO_PROFILE_RELEASE_STRIP"] = "false"
    env[f"CARGO_TARGET_{TRIPLE.upper().replace('-', '_')}_RUSTFLAGS"] = RUSTFLAGS
    subprocess.run(["cargo", "build", "--release", "--locked", "-p", "rivulet", "--target", TRIPLE,
                    "--target-dir", "target/unstripped"], cwd=ROOT, env=env, check=True)
    return os.path.join(ROOT, "target", "unstripped", TRIPLE, "release", "rivulet")


def wait_for(cond, seconds, what):
    end = time.time() + seconds
    while time.time() < end:
        if cond():
            return
        time.sleep(0.2)
    sys.exit(f"make-order: timed out waiting for {what}")


def functions(dump):
    """The functions with a cost in one callgrind dump (mangled names)."""
    names, out = {}, set()
    with open(dump, errors="replace") as f:
        for line in f:
            # Names are compressed: `fn=(id) name` or `cfn=(id) name` the
            # first time, `fn=(id)` after. A `fn=` line starts a function's
            # costs; a `cfn=` line names a callee.
            m = re.match(r"^(c?)fn=\((\d+)\)(?: (.*))?$", line.rstrip("\n"))
            if not m:
                continue
            ident, name = m.group(2), m.group(3)
            if name is not None:
                names[ident] = name
            if not m.group(1):
                out.add(names.get(ident, ""))
    # callgrind marks recursion levels and threads with `'N`; addresses
    # without a symbol and its own pseudo-functions are not for the list.
    return {re.sub(r"'\d+$", "", n) for n in out if n and not n.startswith(("0x", "("))}


def demangled(mangled):
    """Each name demangled (c++filt knows Rust's legacy mangling), without
    the trailing `::h<hash>`; C names are left as they are."""
    mangled = sorted(mangled)
    res = subprocess.run(["c++filt"], input="\n".join(mangled), capture_output=True, text=True, check=True)
    out = set()
    for name in res.stdout.splitlines():
        out.add(plain(name))
    return out


# glibc picks one of several versions of its string functions at start-up
# (IFUNC), by processor: callgrind's is not the one a Pi or another x86
# runs. A listed version stands for its whole family, as a pattern that
# cross/link-ordered.py expands against libc.a; memcpy, memmove and mempcpy
# share their code, so each brings the others.
IFUNC = re.compile(r"^__(mem\w*?|str\w*?|stp\w*?|wmem\w*?|wcs\w*?|raw\w*?)_(?:sse|ssse|avx|evex|erms|generic|simd|asimd|thunderx|falkor|a64fx|emag|kunpeng|zva|mte|sve|unaligned)")


def variants(names):
    out = set(names)
    for name in names:
        m = IFUNC.match(name)
        if not m:
            continue
        family = m.group(1)
        for f in (["memcpy", "memmove", "mempcpy"] if family in ("memcpy", "memmove", "mempcpy") else [family]):
            out.add(f"__{f}_*")
    return out


def main():
    exe = build()
    work = tempfile.mkdtemp(prefix="make-order-")
    procs = []
    try:
        port, http = free_port(), free_port()
        conf = os.path.join(work, "mosquitto.conf")
        with open(conf, "w") as f:
            f.write(f"listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n")
        procs.append(subprocess.Popen(["mosquitto", "-c", conf], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        with open(os.path.join(ROOT, "configs", "sensor-averages.yaml")) as f:
            yaml = f.read().replace("localhost:1883", f"127.0.0.1:{port}")
        with open(os.path.join(work, "p.yaml"), "w") as f:
            f.write(yaml)
        time.sleep(0.5)
        out = os.path.join(work, "callgrind.out")
        cg = subprocess.Popen(["valgrind", "--tool=callgrind", "--demangle=no", f"--callgrind-out-file={out}",
                               exe, "run", "p.yaml", "--http", f"127.0.0.1:{http}"], cwd=work,
                              stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "run.log"), "w"))
        procs.append(cg)

        def get(path):
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{http}{path}", timeout=30).read()
            except OSError:
                return None

        wait_for(lambda: get("/health") is not None, 120, "the endpoint")
        # Past the release of start-up pages (2 s after start).
        time.sleep(5)
        ctl = lambda *a: subprocess.run(["callgrind_control", *a, str(cg.pid)], check=True,
                                        stdout=subprocess.DEVNULL)
        ctl("-z")
        # Phase 1: idle, with every page the endpoint serves asked for twice.
        for _ in range(2):
            for path in ["/metrics", "/", "/api/status", "/health", "/api/state?key=s1", "/nope"]:
                get(path)
            time.sleep(6)
        ctl("-d")
        # Phase 2: traffic, results, checkpoints, late events, a dead letter.
        # 50 sensors, as bench-pi/idle_rss.py --traffic sends.
        now = int(time.time() * 1000)
        lines = "\n".join(f'{{"temperature": {60 + i % 20}, "ts": {now + i * 10}}}' for i in range(-100, 0))
        late = f'{{"temperature": 70, "ts": {now - 60_000}}}'
        pubs = [subprocess.Popen(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-q", "1", "-l",
                                  "-t", f"sensors/s{s}/temperature"], stdin=subprocess.PIPE, text=True)
                for s in range(50)]
        for p in pubs:
            p.communicate(lines + "\n" + late)
        subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-q", "1",
                        "-t", "sensors/s0/temperature", "-m", "not json"], check=True)
        time.sleep(12)
        for path in ["/metrics", "/api/status", "/api/state?key=s1"]:
            get(path)
        # The input goes quiet: idle_timeout (30 s) moves event time on, the
        # last windows fire, checkpoints trim the journal.
        time.sleep(45)
        for path in ["/metrics", "/", "/api/status"]:
            get(path)
        ctl("-d")
        cg.terminate()
        cg.wait(timeout=120)
        dumps = sorted(p for p in os.listdir(work) if p.startswith("callgrind.out"))
        parts = [functions(os.path.join(work, d)) for d in dumps if re.search(r"\.\d+$", d)]
        if len(parts) < 2:
            sys.exit(f"make-order: expected two dumps, found {dumps}")
        idle, traffic = variants(demangled(parts[0])), variants(demangled(parts[1]))
        with open(OUT, "w") as f:
            f.write("# Written by cross/make-order.py: what a running pipeline executes, idle first.\n")
            for name in sorted(idle):
                f.write(name + "\n")
            for name in sorted(traffic - idle):
                f.write(name + "\n")
        print(f"{OUT}: {len(idle)} idle functions, {len(traffic - idle)} more with traffic")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
