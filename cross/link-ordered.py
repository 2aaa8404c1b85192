#!/usr/bin/env python3
"""A linker wrapper for the shipped builds (cross/build.sh): lays out the
functions named in cross/steady-order.txt next to each other, then links as
usual. See cross/make-order.py for why.

The list holds demangled names without their hash; the objects being
linked hold mangled names whose hash depends on the compiler and target.
This wrapper reads the symbols of the objects it is given (`nm`), maps each
listed name to its mangled symbols (a generic function may have several),
writes them to a temporary file and runs the real linker with lld's
`--symbol-ordering-file`. C names (glibc) pass as they are. A name no object
defines is skipped: a stale list moves less code, it never breaks a build.

Environment:
  RIVULET_LINKER   the real linker driver (default: cc)
  RIVULET_NM       nm for the target's objects (default: nm)
  RIVULET_ORDER    the list (default: steady-order.txt beside this file)
"""
import fnmatch, hashlib, os, re, subprocess, sys

HERE = os.path.dirname(os.path.abspath(__file__))


def plain(name):
    """A demangled name without what depends on the build: the legacy
    mangling's trailing `::h<hash>` and the v0 mangling's crate
    disambiguators (`core[c1f1a4ba060b9bfa]`)."""
    name = re.sub(r"::h[0-9a-f]{16}$", "", name)
    return re.sub(r"\[[0-9a-f]{1,16}\]", "", name)


def args_of(argv):
    """The arguments, with response files (`@file`) read in."""
    out = []
    for a in argv:
        if a.startswith("@") and os.path.isfile(a[1:]):
            with open(a[1:]) as f:
                out.extend(line.rstrip("\n") for line in f if line.strip())
        else:
            out.append(a)
    return out


def symbols(nm, objects):
    """{demangled name without hash: [mangled names]} for the objects."""
    table = {}
    for obj in objects:
        res = subprocess.run([nm, "--defined-only", "-p", obj], capture_output=True, text=True)
        mangled = []
        for line in res.stdout.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[1] in "tTwW":
                mangled.append(parts[2])
        if not mangled:
            continue
        res = subprocess.run(["c++filt"], input="\n".join(mangled), capture_output=True, text=True)
        names = res.stdout.splitlines()
        if len(names) != len(mangled):
            continue
        for m, p in zip(mangled, names):
            table.setdefault(plain(p), []).append(m)
    return table


def libc_symbols(nm, linker):
    """The functions of the target's static C library (for the patterns of
    glibc's per-processor string functions)."""
    res = subprocess.run(linker + ["-print-file-name=libc.a"], capture_output=True, text=True)
    path = res.stdout.strip()
    if not os.path.isfile(path):
        return set()
    res = subprocess.run([nm, "--defined-only", "-p", path], capture_output=True, text=True)
    return {p[2] for p in (line.split() for line in res.stdout.splitlines()) if len(p) == 3 and p[1] in "tTwWiI"}


def main():
    linker = os.environ.get("RIVULET_LINKER", "cc").split()
    nm = os.environ.get("RIVULET_NM", "nm")
    order = os.environ.get("RIVULET_ORDER", os.path.join(HERE, "steady-order.txt"))
    argv = sys.argv[1:]
    args = args_of(argv)
    output = args[args.index("-o") + 1] if "-o" in args[:-1] else None
    extra = []
    if output and os.path.isfile(order):
        table = symbols(nm, [a for a in args if a.endswith(".o") and os.path.isfile(a)])
        found = missing = 0
        names = []
        libc = None
        with open(order) as f:
            for line in f:
                name = line.rstrip("\n")
                if not name or name.startswith("#"):
                    continue
                if name in table:
                    names.extend(table[name])
                    found += 1
                elif "*" in name:
                    if libc is None:
                        libc = libc_symbols(nm, linker)
                    names.extend(sorted(n for n in libc if fnmatch.fnmatchcase(n, name)))
                elif "::" in name or name.startswith("<"):
                    missing += 1
                else:
                    names.append(name)
        # Beside the output: the symbols for lld, and what was matched, for
        # cross/build.sh to report (cargo shows a linker's own output only
        # when it fails).
        with open(output + ".symbol-order", "w") as f:
            f.write("\n".join(names) + "\n")
        with open(order, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()[:16]
        with open(output + ".order", "w") as f:
            f.write(f"{found} {missing} {digest}\n")
        extra = [f"-Wl,--symbol-ordering-file={output}.symbol-order", "-Wl,--no-warn-symbol-ordering"]
    os.execvp(linker[0], linker + argv + extra)


if __name__ == "__main__":
    main()
