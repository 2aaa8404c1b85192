"""Turns benchmark JSON lines into a markdown table: medians per configuration,
ratios against the baseline measured in the same run."""
import json
import statistics
import sys

kind, path = sys.argv[1], sys.argv[2]
extra = sys.argv[3] if len(sys.argv) > 3 else ""
rows = [json.loads(l) for l in open(path) if l.strip()]
groups = {}
for r in rows:
    groups.setdefault((r.get("build", "now"), r["mode"], r["workers"]), []).append(r)

def med(rs, k):
    return statistics.median(r[k] for r in rs)

base = groups.get(("now", "baseline", 1))
print(f"| configuration | runs | events/s (median) | CPU µs/event (median) | peak RSS MB | events/s vs baseline | CPU/event vs baseline |")
print("|---|---|---|---|---|---|---|")
for (build, mode, workers), rs in sorted(groups.items(), key=lambda g: (g[0][1], g[0][2], g[0][0] != "before")):
    eps, cpu, rss = med(rs, "events_per_s"), med(rs, "cpu_us_per_event"), max(r["peak_rss_mb"] for r in rs)
    ratio_eps = f"{eps / med(base, 'events_per_s'):.2f}" if base else "-"
    ratio_cpu = f"{cpu / med(base, 'cpu_us_per_event'):.2f}" if base else "-"
    name = f"{mode} ({workers} worker{'s' if workers > 1 else ''})" if mode in ("rivulet", "graph", "streams", "tee") else mode
    if build == "before":
        name += ", before"
    print(f"| {name} | {len(rs)} | {eps:,.0f} | {cpu:.3f} | {rss:.1f} | {ratio_eps} | {ratio_cpu} |")
print()
print(f"Events per run: {rows[0]['events']:,}; average line: {extra} bytes. Every run of a round checks the same number of window results.")
results = {r["results"] for r in rows if r["mode"] not in ("source-only", "graph", "streams", "tee")}
print(f"Window results per run: {', '.join(str(x) for x in sorted(results))} (identical across configurations means identical answers).")
