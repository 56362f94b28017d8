#!/usr/bin/env python3
"""Helpers for benches/load.sh (standard library only).

  report.py h2load LABEL OUTPUT_FILE LOG_FILE   -> one JSON line from an h2load run
  report.py summary RESULTS.jsonl               -> the summary table and the issue's ratios
  report.py line < JSON                         -> one human-readable line for a run

Labels are `case@load#round`, e.g. `sqlite/legacy-repeated@high#2`.
"""

import json
import math
import re
import statistics
import sys


def percentile(sorted_values, p):
    if not sorted_values:
        return 0
    rank = math.ceil(p / 100.0 * len(sorted_values))
    return sorted_values[min(max(rank, 1), len(sorted_values)) - 1]


def parse_label(label):
    m = re.fullmatch(r"(.+)@(\w+)#(\d+)", label)
    if not m:
        return label, "high", 0
    return m.group(1), m.group(2), int(m.group(3))


def h2load(label, output_file, log_file):
    text = open(output_file, encoding="utf-8", errors="replace").read()
    finished = re.search(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s", text)
    requests = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", text)
    if not finished or not requests:
        raise SystemExit(f"cannot parse h2load output in {output_file}:\n{text}")
    elapsed = float(finished.group(1)) / (1000.0 if finished.group(2) == "ms" else 1.0)
    latencies = []
    with open(log_file, encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[1] == "200":
                latencies.append(int(parts[2]))
    latencies.sort()
    total, succeeded = int(requests.group(1)), int(requests.group(3))
    report = {
        "kind": "load",
        "label": label,
        "tool": "h2load",
        "requests": total,
        "ok": succeeded,
        "errors": total - succeeded,
        "elapsed_s": elapsed,
        "rps": float(finished.group(3)),
        "mean_us": statistics.fmean(latencies) if latencies else 0,
        "p50_us": percentile(latencies, 50),
        "p90_us": percentile(latencies, 90),
        "p99_us": percentile(latencies, 99),
        "max_us": latencies[-1] if latencies else 0,
    }
    print(json.dumps(report))
    if succeeded != total:
        raise SystemExit(f"{label}: {total - succeeded} of {total} requests failed")


def summary(results_file):
    loads, other = [], []
    for line in open(results_file, encoding="utf-8"):
        line = line.strip()
        if not line:
            continue
        record = json.loads(line)
        (loads if record.get("kind") == "load" else other).append(record)

    by_case = {}
    for r in loads:
        case, load, rnd = parse_label(r["label"])
        r["case"], r["load"], r["round"] = case, load, rnd
        by_case.setdefault((case, load), []).append(r)

    def med(case, load, key):
        runs = by_case.get((case, load))
        return statistics.median(r[key] for r in runs) if runs else None

    def cpu_med(case, load):
        runs = [r["server_cpu_us"] for r in by_case.get((case, load), []) if "server_cpu_us" in r]
        return statistics.median(runs) if runs else None

    def cpu_cell(case, load):
        value = cpu_med(case, load)
        return "-" if value is None else f"{value:.1f}"

    print("### Throughput and latency per case (median of the rounds; each round is one run)\n")
    print("| case | load | tool | runs | req/s (median) | req/s (min-max) | p50 µs | p90 µs | p99 µs | server CPU µs/req | failed |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for (case, load), runs in sorted(by_case.items(), key=lambda kv: (kv[0][1] != "high", kv[0][0])):
        rps = [r["rps"] for r in runs]
        failed = sum(r["requests"] - r["ok"] for r in runs)
        print(
            f"| {case} | {load} | {runs[0]['tool']} | {len(runs)} | {statistics.median(rps):,.0f} | "
            f"{min(rps):,.0f}-{max(rps):,.0f} | {med(case, load, 'p50_us'):,.0f} | {med(case, load, 'p90_us'):,.0f} | "
            f"{med(case, load, 'p99_us'):,.0f} | {cpu_cell(case, load)} | {failed} |"
        )

    def per_round(num, den, key, load="high"):
        a = {r["round"]: r[key] for r in by_case.get((num, load), [])}
        b = {r["round"]: r[key] for r in by_case.get((den, load), [])}
        return [a[k] / b[k] for k in sorted(a) if k in b and b[k]]

    print("\n### The issue's targets (ratio of medians; per-round ratios of the interleaved runs in brackets)\n")
    print("| target | measured | goal | met |")
    print("| --- | --- | --- | --- |")
    rows = []

    def ratio_row(title, num, den, key, goal, higher_is_better=True):
        a, b = med(num, "high", key), med(den, "high", key)
        if a is None or b is None or not b:
            rows.append((title, "not measured", goal, "-"))
            return
        value = a / b
        rounds = ", ".join(f"{x:.2f}" for x in per_round(num, den, key))
        if goal is None:
            rows.append((title, f"{value:.2f} [{rounds}]", "report", "-"))
            return
        met = value >= goal if higher_is_better else value <= goal
        sign = "≥" if higher_is_better else "≤"
        rows.append((title, f"{value:.2f} [{rounds}]", f"{sign} {goal}", "yes" if met else "**no**"))

    # Issue 14: the default configuration (info logs, no OTLP) on both databases,
    # then trace export on (SQLite): 1 % parent-based ratio sampler, and every span.
    configs = [
        ("sqlite", "default config", 0.95),
        ("postgres", "default config", 0.95),
        ("sqlite-otlp1", "OTLP on, parentbased_traceidratio 0.01", 0.85),
        ("sqlite-always", "OTLP on, always_on", None),
    ]
    for db, config, goal in configs:
        kinds = ("legacy", "clerk") if db in ("sqlite", "postgres") else ("legacy",)
        for kind in kinds:
            ratio_row(f"{db} ({config}): repeated {kind} token, req/s vs echo (h2load)", f"{db}/{kind}-repeated", "echo/h2load", "rps", goal)
            ratio_row(
                f"{db} ({config}): repeated {kind} token, p99 vs echo p99 (h2load, -c 16 -m 8)",
                f"{db}/{kind}-repeated",
                "echo/h2load",
                "p99_us",
                1.5,
                higher_is_better=False,
            )
    for db in ("sqlite", "postgres"):
        ratio_row(f"{db}: new RS256 Clerk token per call vs raw-verify control (benchtool)", f"{db}/clerk-cold", "raw-rs256/benchtool", "rps", 0.95)
    for db in ("sqlite", "postgres"):
        ratio_row(f"{db}: new legacy token per call vs echo (benchtool)", f"{db}/legacy-fresh", "echo/benchtool", "rps", 0.85)
    for title, measured, goal, met in rows:
        print(f"| {title} | {measured} | {goal} | {met} |")

    print("\nFor information (not targets):\n")
    info = [
        ("new legacy token per call vs raw HS256 verify control (benchtool)", "sqlite/legacy-fresh", "raw-hs256/benchtool"),
        ("raw HS256 verify control vs echo (benchtool)", "raw-hs256/benchtool", "echo/benchtool"),
        ("raw RS256 verify control vs echo (h2load)", "raw-rs256/h2load", "echo/h2load"),
        ("benchtool vs h2load on the echo control (load generators compared)", "echo/benchtool", "echo/h2load"),
    ]
    for title, num, den in info:
        a, b = med(num, "high", "rps"), med(den, "high", "rps")
        if a and b:
            print(f"- {title}: {a / b:.2f}")
    # The same comparisons by the servers' own CPU time per request (control ÷ service,
    # so above 1 the service costs less), which does not depend on how the cores were shared.
    cpu_info = [
        ("new RS256 Clerk token per call, raw-verify control CPU ÷ service CPU", "clerk-cold", "raw-rs256/benchtool"),
        ("new legacy token per call, raw HS256 control CPU ÷ service CPU", "legacy-fresh", "raw-hs256/benchtool"),
        ("new legacy token per call, echo CPU ÷ service CPU", "legacy-fresh", "echo/benchtool"),
        ("repeated legacy token, echo CPU ÷ service CPU (h2load)", "legacy-repeated", "echo/h2load"),
        ("repeated Clerk token, echo CPU ÷ service CPU (h2load)", "clerk-repeated", "echo/h2load"),
    ]
    for title, case, control in cpu_info:
        for db in ("sqlite", "postgres", "sqlite-otlp1", "sqlite-always"):
            a, b = cpu_med(f"{db}/{case}", "high"), cpu_med(control, "high")
            if a and b:
                print(f"- {db}: {title}: {b / a:.2f} ({b:.1f} vs {a:.1f} µs per request)")

    for record in other:
        kind = record.get("kind")
        if kind == "startup":
            runs = record["runs_ms"]
            ok = "yes" if max(runs) < 1000 else "**no**"
            print(f"\n- Start-up to SERVING on an empty SQLite database: {', '.join(f'{x:.0f} ms' for x in runs)} (goal < 1000 ms; met: {ok})")
        elif kind == "rss":
            print(
                f"- Resident memory ({record['server']}): idle {record['idle_mb']:.1f} MB; under load (max) {record['load_mb']:.1f} MB; "
                f"during {record['distinct']:,} distinct tokens, each sent twice (max) {record['distinct_max_mb']:.1f} MB; after them {record['after_mb']:.1f} MB, "
                f"token cache {record['cache_entries']:,} of {record['cache_capacity']:,} entries "
                f"(goal < 150 MB; met: {'yes' if max(record['distinct_max_mb'], record['after_mb']) < 150 else '**no**'})"
            )
        elif kind == "queries":
            print(
                f"- PostgreSQL transactions during {record['what']}: {record['during']} in {record['seconds']:.1f} s for {record['requests']:,} requests; "
                f"idle background rate {record['idle_rate']:.2f}/s (health ping, auth-mode and revocation refresh) "
                f"-> attributable to requests ≈ {max(record['during'] - record['idle_rate'] * record['seconds'], 0):.0f} "
                f"({record['during'] / max(record['requests'], 1):.6f} per request)"
            )


def line():
    r = json.loads(sys.stdin.read())
    print(
        f"{r['label']:<42} {r['tool']:<9} {r['rps']:>9,.0f} req/s  p50 {r['p50_us']:>6,} us  "
        f"p90 {r['p90_us']:>6,} us  p99 {r['p99_us']:>6,} us  ok {r['ok']}/{r['requests']}"
        + (f"  server CPU {r['server_cpu_us']:.1f} us/req" if "server_cpu_us" in r else "")
    )


def main():
    if len(sys.argv) == 2 and sys.argv[1] == "line":
        line()
    elif len(sys.argv) >= 2 and sys.argv[1] == "h2load" and len(sys.argv) == 5:
        h2load(*sys.argv[2:])
    elif len(sys.argv) == 3 and sys.argv[1] == "summary":
        summary(sys.argv[2])
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
