#!/usr/bin/env python3
"""Turn the raw JSON lines of one bench/run into bench/RESULTS.md (called by bench/run)."""
import json
import os
import statistics
import sys
from collections import defaultdict

raw_path, out_path = sys.argv[1], sys.argv[2]
bench = os.path.dirname(os.path.abspath(out_path))
conf_dir = os.path.join(bench, "out", "conf")

recs = []
with open(raw_path) as f:
    for line in f:
        line = line.strip()
        if line:
            try:
                recs.append(json.loads(line))
            except json.JSONDecodeError:
                pass

machine = next((r["data"] for r in recs if r.get("test") == "machine"), {})
end = next((r["data"] for r in recs if r.get("test") == "end"), {})
run_id = recs[0]["run"] if recs else "?"
by = defaultdict(list)  # (row, test) -> [rec]
for r in recs:
    if "row" in r:
        by[(r["row"], r["test"])].append(r)

NOWAIT = ["superserver-nowait", "superserver-ctl", "xinetd-nowait", "oinetd-nowait", "tcpserver", "ssa-accept",
          "accept-ceiling-spawn", "accept-ceiling-fork"]
WAIT = ["superserver-wait", "ssa-wait", "xinetd-wait", "oinetd-wait", "direct", "epoll-echo"]
BUILTIN = ["superserver-default", "xinetd-internal", "oinetd-internal"]
BUILTIN_PEERS = ["xinetd-internal", "oinetd-internal"]
DESC = {
    "superserver-nowait": ("superserver", "nowait", "echo-static"),
    "superserver-ctl": ("superserver + control socket + metrics", "nowait", "echo-static"),
    "xinetd-nowait": ("xinetd", "nowait", "echo-static"),
    "oinetd-nowait": ("openbsd-inetd", "nowait", "echo-static"),
    "tcpserver": ("tcpserver -H -R -l 0", "per-conn", "echo-static"),
    "ssa-accept": ("systemd-socket-activate --accept --inetd", "per-conn", "echo-static"),
    "accept-ceiling-spawn": ("none: accept4 + posix_spawn + reap (bench/accept-ceiling.c)", "bound", "echo-static"),
    "accept-ceiling-fork": ("none: accept4 + fork+exec + reap (bench/accept-ceiling.c -m fork)", "bound", "echo-static"),
    "superserver-wait": ("superserver", "wait (fd 3)", "small-services"),
    "ssa-wait": ("systemd-socket-activate", "wait (fd 3)", "small-services"),
    "xinetd-wait": ("xinetd wait=yes", "wait (fd 0)", "small-services --protocol echo"),
    "oinetd-wait": ("openbsd-inetd wait", "wait (fd 0)", "small-services --protocol echo"),
    "direct": ("none (service binds)", "direct", "small-services --listen"),
    "epoll-echo": ("none (binds)", "direct", "epoll-echo.c"),
    "superserver-default": ("superserver, default job", "wait (fd 3)", "small-services (6 protocols, TCP+UDP)"),
    "xinetd-internal": ("xinetd type = INTERNAL", "built in", "echo-stream (fork), daytime-stream (in xinetd)"),
    "oinetd-internal": ("openbsd-inetd internal", "built in", "echo (fork), daytime (in inetd)"),
}


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def ok_data(row, test):
    return [r for r in by.get((row, test), []) if r.get("ok") and r.get("data") is not None]


def per_rep(row, test, key):
    """rep -> value of key (a callable on data) for successful runs."""
    out = {}
    for r in ok_data(row, test):
        try:
            v = key(r["data"])
        except (KeyError, TypeError):
            continue
        if v is not None:
            out[r["rep"]] = v
    return out


def cpu_per_conn(row, test):
    """rep -> server CPU microseconds per successful connection (process tree utime+stime)."""
    out = {}
    for r in ok_data(row, test):
        ms, ok = r.get("server_cpu_ms"), r["data"].get("ok", 0)
        if ms is not None and ok:
            out[r["rep"]] = ms * 1000.0 / ok
    return out


def self_per_conn(row, test, key):
    """rep -> the server process's own (without children) metric per successful connection."""
    out = {}
    for r in ok_data(row, test):
        v, ok = r.get(key), r["data"].get("ok", 0)
        if v is not None and ok:
            out[r["rep"]] = v / ok
    return out


def client_busy(row, test):
    return med([(r.get("cpu_busy_pct") or [None])[0] for r in ok_data(row, test)])


def cps(row, test):
    # a run with errors still has a rate; a run with zero successes does not
    return per_rep(row, test, lambda d: d["conn_per_s"] if d["ok"] > 0 else None)


def fmt(v, nd=0, unit=""):
    if v is None:
        return "–"
    if nd == 0:
        return f"{v:,.0f}{unit}"
    return f"{v:,.{nd}f}{unit}"


def rng(vals, nd=0):
    vals = list(vals)
    if not vals:
        return "–"
    m = med(vals)
    if len(vals) == 1:
        return fmt(m, nd)
    return f"{fmt(m, nd)} ({fmt(min(vals), nd)}–{fmt(max(vals), nd)})"


def paired_ratio(a, b):
    """median over reps of a[rep]/b[rep] (same run, same rep); None if no common rep."""
    rs = [a[k] / b[k] for k in a if k in b and b[k]]
    return med(rs), len(rs)


def start_error(row):
    errs = [r.get("error") for r in by.get((row, "start"), []) if not r.get("ok")]
    return errs[0] if errs else None


def row_errors(row):
    tot = defaultdict(int)
    for t in ("c1", "c32", "dt-c1", "dt-c32", "first-byte", "cold"):
        for r in by.get((row, t), []):
            d = r.get("data") or {}
            for k, v in (d.get("errors") or {}).items():
                tot[k] += v
    s = ", ".join(f"{k} {v}" for k, v in tot.items() if v)
    return s or "0"


L = []
P = L.append
quick = machine.get("mode", "").startswith("quick")
P("# bench/RESULTS.md — superserver against its peers (loopback)")
P("")
P("Generated by `bench/run` from `bench/out/raw-%s.jsonl`. Do not edit by hand: rerun." % run_id)
P("")
def load1(s):
    try:
        return float(str(s).split()[0])
    except (ValueError, IndexError):
        return 0.0


# Outside load: each run records each CPU's busy share, the server tree's and the load generator's
# own CPU time and the wall time. What is busy beyond our own share on a CPU is someone else's
# (or the kernel's network work on our behalf, a few %): above OUTSIDE_PCT the run is bent.
OUTSIDE_PCT = 10.0


def outside(r):
    """(server CPU %, client CPU %) of outside load during one loadgen run, or None."""
    el, busy = r.get("elapsed_ms"), r.get("cpu_busy_pct")
    if not el or not busy or r.get("server_cpu_ms") is None or r.get("client_cpu_ms") is None:
        return None
    srv = busy[1] - 100.0 * r["server_cpu_ms"] / el
    cli = busy[0] - 100.0 * r["client_cpu_ms"] / el
    return max(srv, 0.0), max(cli, 0.0)


def outside_of(row):
    """Worst outside load (server CPU, client CPU) over the row's C=1/C=32 runs, or None."""
    vals = [outside(r) for t in ("c1", "c32", "dt-c1", "dt-c32") for r in by.get((row, t), [])]
    vals = [v for v in vals if v is not None]
    if not vals:
        return None
    return max(v[0] for v in vals), max(v[1] for v in vals)


bent = {}
for (row, test) in list(by):
    o = outside_of(row)
    if o is not None and max(o) > OUTSIDE_PCT:
        bent[row] = o
before = machine.get("busy_before_pct") or []
busy_before = max([b for b in before if b is not None], default=None)
if busy_before is not None and busy_before > OUTSIDE_PCT:
    P(f"> **Noisy run: the machine was busy before the run started** (CPU 0/1 {before[0]} / {before[1]} % busy over 2 s after the "
      f"builds, with nothing of the bench running). Compare ratios only, and rerun `bench/run` on a quiet machine for the final figures.")
    P("")
if bent:
    P(f"> **Outside load during the run bent these rows** (CPU time on the server or load-generator CPU beyond the server's and the "
      f"load generator's own, worst run, > {OUTSIDE_PCT:.0f} %): "
      + "; ".join(f"`{k}` server CPU {v[0]:.0f} %, client CPU {v[1]:.0f} %" for k, v in sorted(bent.items()))
      + ". Their figures are suspect; the others were taken on a quiet machine.")
    P("")
if quick:
    P("> **SMOKE RUN (`bench/run --quick`: 1 repetition, few connections) on a busy shared machine "
      "(other engineers were compiling on both CPUs).** These numbers only show that the harness works; "
      "they are not the measurement. Run `bench/run` on a quiet machine for that.")
    P("")
P(f"- mode: **{machine.get('mode', '?')}**, repetitions: {machine.get('reps', '?')} (rows interleaved, order rotated per rep; medians, with min–max)")
P(f"- machine: {machine.get('cpu', '?')}, {machine.get('ncpu', '?')} CPUs, {int(machine.get('mem_kib', 0)) // 1024} MiB; {machine.get('os', '?')}; kernel `{machine.get('kernel', '?')}`")
P(f"- machine before the run (after the builds): CPU 0 / 1 busy {before[0] if before else '?'} / {before[1] if len(before) > 1 else '?'} % over 2 s; "
  f"load average at start / end: {machine.get('loadavg_start', '?')} / {end.get('loadavg_end', '?')} (the load average counts the builds "
  f"before and the bench's own load; the busy share and the outside load per row, below, do not); git {machine.get('git', '?')}")
if machine.get("only"):
    P(f"- **partial run: `bench/run --only {machine['only']}`** (rows not asked for are n/a)")
P(f"- environment of every server and child: `RUST_LOG={machine.get('rust_log', '?')}` (per-connection logging off, like the peers' configs here); `ulimit -n {machine.get('nofile', '?')}`")
P("- pinning: every server and everything it spawns on CPU 1 (`taskset -c 1`), the load generator on CPU 0; loopback only (127.0.0.1)")
if machine.get("workspace_build"):
    P(f"- binaries: `cargo build --release --workspace` {machine.get('workspace_build')}; superserver measured: {machine.get('superserver_build', 'glibc')} build, built {machine.get('superserver_mtime', '?')}, small-services built {machine.get('small_services_mtime', '?')}")
P("- versions: " + "; ".join(f"`{v}`" for v in machine.get("versions", [])))
sz = machine.get("sizes", {})
P(f"- sizes: nowait C=1 {sz.get('nowait_c1_n')} cycles, C=32 32×{sz.get('nowait_c32_per_client')}; wait/direct/default-job/built-in C=1 {sz.get('wait_c1_n')}, C=32 32×{sz.get('wait_c32_per_client')} (echo and daytime each); spawn-ceiling {sz.get('spawn_n')} spawns; idle window {sz.get('wake_s')} s; hold {sz.get('hold_k')} connections for {sz.get('hold_s')} s")
P("- rerun: `bench/run` (full, `BENCH_REPS=3` by default, ~10 min plus the build), `bench/run --quick` (smoke, ~1-2 min), `bench/run --report` (regenerate this file from `bench/out/latest.jsonl`)")
P("")

# ------------------------------------------------------------------ targets
P("## Targets (measured ratio, pass/fail)")
P("")
P("Ratios are medians over repetitions of the ratio measured within the same repetition (paired). "
  "n/a = a side of the ratio did not run (error recorded below).")
P("")
P("| target | measured | threshold | result |")
P("|---|--:|--:|---|")


def verdict(v, thr, ge=True):
    if v is None:
        return "n/a"
    return "**pass**" if (v >= thr if ge else v <= thr) else "**FAIL**"


def verdict_gt(v, thr):
    if v is None:
        return "n/a"
    return "**pass**" if v > thr else "**FAIL**"


def trow(name, v, thr_s, res, nd=2, unit="×"):
    P(f"| {name} | {fmt(v, nd, unit) if v is not None else 'n/a'} | {thr_s} | {res} |")


ss32 = cps("superserver-nowait", "c32")
for peer, thr in (("xinetd-nowait", 1.3), ("tcpserver", 1.05)):
    r, n = paired_ratio(ss32, cps(peer, "c32"))
    trow(f"nowait C=32 conn/s: superserver ÷ {peer}", r, f"≥ {thr}×", verdict(r, thr))
# What any process-per-connection server could reach against xinetd on this machine: the
# honest ceiling's own ratio bounds the superserver's.
r, _ = paired_ratio(cps("accept-ceiling-spawn", "c32"), cps("xinetd-nowait", "c32"))
trow("(info) nowait C=32 conn/s: accept-ceiling (posix_spawn) ÷ xinetd-nowait, the most any "
     "process-per-connection server reaches against xinetd here", r, "–", "info")
r, _ = paired_ratio(cps("superserver-ctl", "c32"), ss32)
trow("nowait C=32 conn/s: with the control socket and metrics listening ÷ without", r, "≥ 0.98×", verdict(r, 0.98))
spawn_fork = per_rep("spawn-ceiling-fork", "spawn", lambda d: d["spawns_per_s"])
spawn_ps = per_rep("spawn-ceiling-spawn", "spawn", lambda d: d["spawns_per_s"])
r, _ = paired_ratio(ss32, spawn_fork)
trow("nowait C=32 conn/s: superserver ÷ spawn-ceiling (fork+exec)", r, "≥ 0.9×", verdict(r, 0.9))
r, _ = paired_ratio(ss32, spawn_ps)
trow("(info) nowait C=32: superserver ÷ spawn-ceiling (posix_spawn)", r, "–", "info")


def spread(a, b):
    """Per-repetition ratios a/b (same rep): (median, min, max, stdev or None, n)."""
    rs = [a[k] / b[k] for k in a if k in b and b[k]]
    if not rs:
        return None
    sd = statistics.stdev(rs) if len(rs) > 1 else None
    return med(rs), min(rs), max(rs), sd, len(rs)


for t in ("c1", "c32"):
    # The same comparison by the server tree's CPU time per connection (ceiling ÷ superserver, so
    # that higher is better as above): unlike conn/s it holds when outside load shares the CPU.
    sp = spread(cpu_per_conn("accept-ceiling-spawn", t), cpu_per_conn("superserver-nowait", t))
    name = (f"nowait C={t[1:]} server CPU per connection: accept-ceiling (posix_spawn) ÷ superserver "
            f"(the same bound, robust to outside load)")
    if sp is None:
        P(f"| {name} | n/a | ≥ 0.97× | n/a |")
    else:
        m, lo, hi, sd, n = sp
        sds = f", stdev {sd:.3f}" if sd is not None else ""
        P(f"| {name}: median of {n} paired rep(s), min–max {lo:.2f}–{hi:.2f}{sds} | {m:.2f}× | ≥ 0.97× | {verdict(m, 0.97)} |")
    for ceil, thr in (("accept-ceiling-spawn", 0.97), ("accept-ceiling-fork", None)):
        sp = spread(cps("superserver-nowait", t), cps(ceil, t))
        what = "posix_spawn" if ceil.endswith("spawn") else "fork+exec"
        name = f"nowait C={t[1:]} conn/s: superserver ÷ accept-ceiling ({what}: accept4 + spawn + reap, same child and environment)"
        if thr is None:
            name = "(info) " + name
        if sp is None:
            P(f"| {name} | n/a | {'≥ %.2f×' % thr if thr else '–'} | {'n/a' if thr else 'info'} |")
            continue
        m, lo, hi, sd, n = sp
        sds = f", stdev {sd:.3f}" if sd is not None else ""
        P(f"| {name}: median of {n} paired rep(s), min–max {lo:.2f}–{hi:.2f}{sds} | {m:.2f}× | "
          f"{'≥ %.2f×' % thr if thr else '–'} | {verdict(m, thr) if thr else 'info'} |")
for t in ("c1", "c32"):
    r, _ = paired_ratio(cps("superserver-wait", t), cps("direct", t))
    trow(f"wait C={t[1:]} conn/s: superserver→small-services ÷ small-services binding itself", r, "≥ 0.97×", verdict(r, 0.97))


st99 = [r["data"]["p99_ms"] for r in ok_data("superserver-1000", "status")]
if st99:
    m = med(st99)
    P(f"| `superserver status` with 1,000 services, end to end: p99 {fmt(m, 2)} ms (median over reps of the p99 of 200 requests) | {fmt(m, 2)} ms | < 5 ms | {'**pass**' if m < 5 else '**FAIL**'} |")
ups = [v for r in ok_data("superserver-1000", "upgrade") for v in r["data"].get("upgrade_ms", [])]
if ups:
    m = med(ups)
    P(f"| in-place upgrade with 1,000 services, command to the new image serving: median {fmt(m, 1)} ms over {len(ups)} | {fmt(m, 1)} ms | < 50 ms | {'**pass**' if m < 50 else '**FAIL**'} |")


def cold(row):
    """Every cold sample of the row (the first connection after each start), keyed by order."""
    vals = []
    for test in ("first-byte", "cold"):
        for r in ok_data(row, test):
            d = r["data"]
            if d.get("cold_ok") and d.get("cold_first_byte_ms") is not None:
                vals.append(d["cold_first_byte_ms"])
    return dict(enumerate(vals))


for mine, peers in (("superserver-nowait", ["xinetd-nowait", "oinetd-nowait", "tcpserver", "ssa-accept"]),
                    ("superserver-wait", ["ssa-wait", "xinetd-wait", "oinetd-wait"])):
    m = med(cold(mine).values())
    pm = {p: med(cold(p).values()) for p in peers}
    pm = {p: v for p, v in pm.items() if v is not None}
    best = min(pm.items(), key=lambda kv: kv[1]) if pm else None
    if m is not None and best:
        P(f"| cold first byte, {mine}: {fmt(m, 2)} ms vs best peer {best[0]} {fmt(best[1], 2)} ms | {fmt(m / best[1], 2, '×')} | ≤ 1.00× | {verdict(m, best[1], ge=False)} |")
    else:
        P(f"| cold first byte, {mine} vs best peer | n/a | ≤ best peer | n/a |")


# The default job against the peers' built-ins: ahead of both on every row (issue target).
BUILTIN_TESTS = (("c1", "echo C=1"), ("c32", "echo C=32"), ("dt-c1", "daytime C=1"), ("dt-c32", "daytime C=32"))
for t, what in BUILTIN_TESTS:
    for peer in BUILTIN_PEERS:
        r, _ = paired_ratio(cps("superserver-default", t), cps(peer, t))
        trow(f"default job {what} conn/s: superserver-default ÷ {peer}", r, "> 1.00×", verdict_gt(r, 1.0))
m = med(cold("superserver-default").values())
for peer in BUILTIN_PEERS:
    pv = med(cold(peer).values())
    if m is not None and pv:
        P(f"| cold first byte (echo), superserver-default (starts small-services): {fmt(m, 2)} ms vs {peer} (built in, no exec) {fmt(pv, 2)} ms | {fmt(m / pv, 2, '×')} | ≤ 1.00× | {verdict(m, pv, ge=False)} |")
    else:
        P(f"| cold first byte (echo), superserver-default vs {peer} | n/a | ≤ 1.00× | n/a |")


def idle_rss(row):
    return med(per_rep(row, "idle-mem", lambda d: d["rss_kib"]).values())


tcp_rss = idle_rss("tcpserver")
for mine in ("superserver-nowait", "superserver-wait"):
    v = idle_rss(mine)
    r = v / tcp_rss if (v is not None and tcp_rss) else None
    P(f"| idle VmRSS, 1 service ({mine}): {fmt(v)} KiB vs tcpserver {fmt(tcp_rss)} KiB | {fmt(r, 2, '×') if r is not None else 'n/a'} | ≤ 1.00× | {verdict(r, 1.0, ge=False)} |")
v1000 = med(per_rep("superserver-1000", "ready1000", lambda d: d["rss_kib"]).values())
r = v1000 / tcp_rss if (v1000 is not None and tcp_rss) else None
P(f"| idle VmRSS, 1000 services: {fmt(v1000)} KiB vs tcpserver (1 service) {fmt(tcp_rss)} KiB | {fmt(r, 2, '×') if r is not None else 'n/a'} | ≤ 2.00× | {verdict(r, 2.0, ge=False)} |")
for mine, test, what in (("superserver-nowait", "idle-wakeups", "before any connection"),
                         ("superserver-nowait", "idle-wakeups-after-load", "after the load, children gone"),
                         ("superserver-wait", "idle-wakeups", "before any connection"),
                         ("superserver-wait", "idle-wakeups-after-load", "after the load, small-services exited idle"),
                         ("superserver-1000", "idle-wakeups", "after readiness")):
    w = per_rep(mine, test, lambda d: d["per_s"])
    v = med(w.values())
    P(f"| idle wake-ups/s, {mine}, {what} | {fmt(v, 2, '/s') if v is not None else 'n/a'} | 0 | {verdict(v, 0.0, ge=False)} |")
# The table of 100 / 1,000 / 10,000 services (bench/table.py).
TABLE = [100, 1000, 10000]


def tdata(n, test):
    return [r["data"] for r in by.get((f"table-{n}", test), []) if r.get("ok") and r.get("data")]


def table_summary(n):
    chk = [ms for d in tdata(n, "check") for ms in d["ms"]]
    rd = tdata(n, "ready")
    wk = tdata(n, "wakeups")
    rl = tdata(n, "reload")
    return {
        "bytes": (tdata(n, "check") or [{}])[0].get("bytes"),
        "check": chk,
        "ready": [d["ready_ms"] for d in rd],
        "ready_cpu": [d["cpu_ms"] for d in rd if d.get("cpu_ms") is not None],
        "rss": med([d["rss_kib"] for d in rd]),
        "pss": med([d["pss_kib"] for d in rd]),
        "wake": med([d["per_s"] for d in wk]),
        "read": [d["read_ms"] for d in rl],
        "apply": [d["apply_ms"] for d in rl],
        "apply_cpu": [d.get("apply_cpu_ms") for d in rl if d.get("apply_cpu_ms") is not None],
        "stall": [d["stall_ms"] for d in rl if d.get("stall_ms") is not None],
        "base_max": [d["base_max_ms"] for d in rl if d.get("base_max_ms") is not None],
        "base_p50": [d["base_p50_ms"] for d in rl if d.get("base_p50_ms") is not None],
    }


TS = {n: table_summary(n) for n in TABLE}


def rss_per_1000(n):
    """Idle VmRSS per 1,000 services above the 100-service table's (KiB)."""
    a, b = TS[100]["rss"], TS[n]["rss"]
    if a is None or b is None or n <= 100:
        return None
    return (b - a) * 1000.0 / (n - 100)


t10 = TS[10000]
if any(TS[n]["ready"] for n in TABLE):
    m = med(t10["check"])
    P(f"| `superserver --check` of 10,000 services (1.9 MB of TOML): median {fmt(m, 0)} ms of {len(t10['check'])} | {fmt(m, 0, ' ms')} | < 300 ms | {verdict(m, 300, ge=False)} |")
    m = med(t10["ready"])
    c = med(t10["ready_cpu"])
    P(f"| start-up to READY=1 with 10,000 services (Unix sockets on tmpfs; the CPU time it took: {fmt(c, 0)} ms, "
      f"which outside load does not bend) | {fmt(m, 0, ' ms')} | < 300 ms | {verdict(m, 300, ge=False)} |")
    m = med(t10["apply"])
    c = med(t10["apply_cpu"])
    P(f"| SIGHUP changing one service of 10,000: applied in (the event loop's share, after the file was read and checked off the loop; "
      f"median of {len(t10['apply'])}, its CPU time {fmt(c, 1)} ms) | {fmt(m, 1, ' ms')} | < 10 ms | {verdict(m, 10, ge=False)} |")
    if t10["stall"] and t10["base_max"]:
        st, bm = max(t10["stall"]), max(t10["base_max"])
        P(f"| stall of an unchanged service while 10,000 are reloaded: its client's longest echo during the reloads {fmt(st, 1)} ms, "
          f"before them {fmt(bm, 1)} ms (longest), {fmt(med(t10['base_p50']), 2)} ms (median) | +{fmt(max(st - bm, 0.0), 1)} ms | ≤ +10 ms | {verdict(st - bm, 10, ge=False)} |")
    for n in (1000, 10000):
        v = rss_per_1000(n)
        P(f"| idle VmRSS per 1,000 services, table of {n:,} (above the 100-service table's) | {fmt(v, 0, ' KiB')} | < 1,024 KiB | {verdict(v, 1024, ge=False)} |")
    w = [TS[n]["wake"] for n in TABLE if TS[n]["wake"] is not None]
    v = max(w) if w else None
    P(f"| idle wake-ups/s with 100, 1,000 and 10,000 services (worst) | {fmt(v, 2, '/s') if v is not None else 'n/a'} | 0 | {verdict(v, 0.0, ge=False)} |")
# Informational ratios: (label, numerator, denominator).
for label, num, den in (
    ("(info) wait C=32 server CPU per connection: superserver tree ÷ small-services binding itself (lower is better)",
     cpu_per_conn("superserver-wait", "c32"), cpu_per_conn("direct", "c32")),
    ("(info) nowait C=32 server CPU per connection: superserver tree ÷ tcpserver tree (lower is better)",
     cpu_per_conn("superserver-nowait", "c32"), cpu_per_conn("tcpserver", "c32")),
    ("(info) nowait C=32 server CPU per connection: superserver tree ÷ xinetd tree (lower is better)",
     cpu_per_conn("superserver-nowait", "c32"), cpu_per_conn("xinetd-nowait", "c32")),
    ("(report) C=32 server CPU per connection: small-services ÷ epoll-echo.c (lower is better)",
     cpu_per_conn("direct", "c32"), cpu_per_conn("epoll-echo", "c32")),
    ("(report) C=32 conn/s: small-services (binding itself) ÷ epoll-echo.c", cps("direct", "c32"), cps("epoll-echo", "c32")),
    ("(report) C=1 conn/s: small-services (binding itself) ÷ epoll-echo.c", cps("direct", "c1"), cps("epoll-echo", "c1")),
):
    r, _ = paired_ratio(num, den)
    trow(label, r, "–", "info")
P("")

# ------------------------------------------------------------------ connect-echo
P("## Connect-echo (connect, write a 32 B line, read the echo, close)")
P("")
P("conn/s: median (min–max) over repetitions; latencies in ms are medians over repetitions. "
  "`÷ superserver` = this row's conn/s divided by the superserver's of the same kind, paired per repetition "
  "(nowait rows and spawn-ceiling against superserver nowait, wait/direct rows against superserver wait). "
  "server CPU µs/conn = CPU time (user+system, `/proc/PID/stat` utime+stime+cutime+cstime) of the server's process tree "
  "during the C=32 run divided by the connections served: it isolates the server from other load on the machine and stays "
  "meaningful when the load generator is the bottleneck. loadgen CPU % = busy share of CPU 0 during the C=32 run; "
  "`(bound)` at ≥ 95 %: that row's conn/s is limited by the client, not the server, so compare its CPU per connection instead. "
  "steal = worst per-CPU hypervisor steal during the C=32 run (median over reps), a noise indicator.")
P("")
P("| row | superserver | mode | program | C=1 conn/s | C=1 p50 | C=1 p99 | C=1 ÷ superserver | C=32 conn/s | C=32 p50 | C=32 p90 | C=32 p99 | C=32 max | C=32 ÷ superserver | C=32 server CPU µs/conn | ÷ superserver | C=32 loadgen CPU % | errors (all reps) | steal % |")
P("|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|--:|")
for row in NOWAIT + WAIT:
    d = DESC[row]
    ref = "superserver-nowait" if row in NOWAIT else "superserver-wait"
    err = start_error(row)
    c1, c32 = cps(row, "c1"), cps(row, "c32")
    if err and not c1 and not c32:
        P(f"| {row} | {d[0]} | {d[1]} | {d[2]} | error: {err[:160].replace('|', '/')} |" + " |" * 14)
        continue
    lat = lambda t, k: med(per_rep(row, t, lambda x: x["lat_ms"][k] if x["ok"] > 0 else None).values())
    r1, _ = paired_ratio(c1, cps(ref, "c1"))
    r32, _ = paired_ratio(c32, cps(ref, "c32"))
    steal = med([r.get("steal_pct") for r in ok_data(row, "c32")])
    cpc = cpu_per_conn(row, "c32")
    rc, _ = paired_ratio(cpc, cpu_per_conn(ref, "c32"))
    cb = client_busy(row, "c32")
    P(f"| {row} | {d[0]} | {d[1]} | {d[2]} | {rng(c1.values())} | {fmt(lat('c1', 'p50'), 2)} | {fmt(lat('c1', 'p99'), 2)} | {fmt(r1, 2, '×')} | "
      f"{rng(c32.values())} | {fmt(lat('c32', 'p50'), 2)} | {fmt(lat('c32', 'p90'), 2)} | {fmt(lat('c32', 'p99'), 2)} | {fmt(lat('c32', 'max'), 2)} | {fmt(r32, 2, '×')} | "
      f"{fmt(med(cpc.values()), 1)} | {fmt(rc, 2, '×')} | {fmt(cb, 0)}{' (bound)' if cb is not None and cb >= 95 else ''} | {row_errors(row)} | {fmt(steal, 1)} |")
for row, meth in (("spawn-ceiling-fork", "fork+exec"), ("spawn-ceiling-spawn", "posix_spawn")):
    v = per_rep(row, "spawn", lambda d: d["spawns_per_s"])
    p50 = med(per_rep(row, "spawn", lambda d: d["lat_ms"]["p50"]).values())
    p99 = med(per_rep(row, "spawn", lambda d: d["lat_ms"]["p99"]).values())
    r, _ = paired_ratio(v, ss32)
    steal = med([r_.get("steal_pct") for r_ in ok_data(row, "spawn")])
    errs = sum(int(r_["data"].get("errors", 0)) for r_ in ok_data(row, "spawn"))
    P(f"| {row} | none: socketpair + {meth}, no accept | bound | echo-static | {rng(v.values())} spawns/s | {fmt(p50, 2)} | {fmt(p99, 2)} | – | – | – | – | – | – | {fmt(r, 2, '×')} | – | – | – | {errs} | {fmt(steal, 1)} |")
P("")

P("### The launcher's own share during C=32 (the server process alone, without its children)")
P("")
P("In wait mode a launcher should be out of the path once it has handed over the listening socket: its own CPU and "
  "context switches per connection should be ~0. In nowait mode this is the per-connection cost of accept + spawn + reap "
  "in the launcher itself (the child's exec and echo are in the tree figure above).")
P("")
P("| row | launcher CPU µs/conn | launcher context switches/conn |")
P("|---|--:|--:|")
for row in NOWAIT + WAIT + BUILTIN:
    c = med(self_per_conn(row, "c32", "server_self_cpu_ms").values())
    x = med(self_per_conn(row, "c32", "server_self_ctxsw").values())
    if c is None and x is None:
        continue
    P(f"| {row} | {fmt(c * 1000 if c is not None else None, 1)} | {fmt(x, 3)} |")
P("")
P("systemd-socket-activate without `--accept` execs the service in place, and `direct`/`epoll-echo` have no launcher: "
  "in those rows the process measured is the service itself. The last three rows are echo C=32 of the default-job section "
  "below: xinetd's and openbsd-inetd's built-in echo forks a child per connection (the echo itself is in the child), "
  "the default job's launcher is out of the path as in wait mode.")
P("")

# ------------------------------------------------------------------ first byte, idle
P("## First byte, idle memory, idle wake-ups")
P("")
P("cold = median over every start of the server (1 + 4 extra starts per repetition in a full run) of the first "
  "connection after it started (waited for by watching `ss -ltn` for LISTEN, so no readiness probe warmed it); warm = median of the next 20 single connections. "
  "Idle VmRSS/Pss = the server process before any connection. Wake-ups = voluntary + involuntary context switches "
  "of all the server's threads (`/proc/PID/task/*/status`) over the idle window, before any connection.")
P("")
P("| row | cold first byte ms | warm first byte p50 ms | idle VmRSS KiB | idle Pss KiB | idle wake-ups/s |")
P("|---|--:|--:|--:|--:|--:|")
for row in NOWAIT + WAIT + BUILTIN + ["superserver-1000"]:
    if row == "superserver-1000":
        rs = med(per_rep(row, "ready1000", lambda d: d["rss_kib"]).values())
        ps = med(per_rep(row, "ready1000", lambda d: d["pss_kib"]).values())
        c = w = None
    else:
        c = med(cold(row).values())
        w = med(per_rep(row, "first-byte", lambda d: d["warm_first_byte_p50_ms"] if d["warm_ok"] else None).values())
        rs = idle_rss(row)
        ps = med(per_rep(row, "idle-mem", lambda d: d["pss_kib"]).values())
    wk = med(per_rep(row, "idle-wakeups", lambda d: d["per_s"]).values())
    if rs is None and c is None:
        e = start_error(row)
        P(f"| {row} | error: {(e or 'no data')[:160].replace('|', '/')} | | | | |")
        continue
    P(f"| {row} | {fmt(c, 2)} | {fmt(w, 2)} | {fmt(rs)} | {fmt(ps)} | {fmt(wk, 2)} |")
P("")

# ------------------------------------------------------------------ default job vs built-ins
P("## The default job against the peers' built-in services (echo and daytime)")
P("")
P("superserver-default = the superserver's embedded default config (`superserver --print-default`: one wait-mode "
  "small-services holding echo, discard, daytime, qotd, chargen and time over TCP and UDP, started by the first connection, "
  "run as `nobody`, exiting after 8 s idle) moved onto the bench's ports; xinetd-internal = xinetd's `type = INTERNAL` "
  "echo-stream and daytime-stream; oinetd-internal = openbsd-inetd's `internal` echo and daytime. Same load generator and pinning "
  "as above. echo = connect, write 32 B, read them back, close; daytime = connect, read the reply until the server closes "
  "(one line with a digit, ≤ 512 B), close. `÷ default` = this row's conn/s divided by superserver-default's, paired per repetition. "
  "cold = the first echo connection after each start (for the default job it includes starting small-services; the peers' "
  "built-ins start nothing: echo is a fork of the already running daemon, no exec). Server CPU µs/conn and loadgen CPU % "
  "as in the connect-echo table ((bound) = CPU 0 busy ≥ 95 %: the client limits that figure).")
P("")
P("| row | server | serves with | echo C=1 conn/s | ÷ default | echo C=32 conn/s | ÷ default | daytime C=1 conn/s | ÷ default | daytime C=32 conn/s | ÷ default | "
  "echo C=32 p99 ms | daytime C=32 p99 ms | echo C=32 server CPU µs/conn | daytime C=32 server CPU µs/conn | loadgen CPU % echo / daytime C=32 | "
  "cold first byte ms | warm first byte p50 ms | idle VmRSS KiB | errors (all reps) | steal % |")
P("|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|--:|--:|--:|---|--:|")
for row in BUILTIN:
    d = DESC[row]
    err = start_error(row)
    vals = {t: cps(row, t) for t, _ in BUILTIN_TESTS}
    if err and not any(vals.values()):
        P(f"| {row} | {d[0]} | {d[2]} | error: {err[:160].replace('|', '/')} |" + " |" * 17)
        continue
    cells = []
    for t, _ in BUILTIN_TESTS:
        r, _ = paired_ratio(vals[t], cps("superserver-default", t))
        cells += [rng(vals[t].values()), fmt(r, 2, "×")]
    p99 = lambda t: med(per_rep(row, t, lambda x: x["lat_ms"]["p99"] if x["ok"] > 0 else None).values())
    cb = [client_busy(row, t) for t in ("c32", "dt-c32")]
    cbs = " / ".join(f"{fmt(c, 0)}{' (bound)' if c is not None and c >= 95 else ''}" for c in cb)
    w = med(per_rep(row, "first-byte", lambda x: x["warm_first_byte_p50_ms"] if x["warm_ok"] else None).values())
    steal = med([r_.get("steal_pct") for t in ("c32", "dt-c32") for r_ in ok_data(row, t)])
    P(f"| {row} | {d[0]} | {d[2]} | {' | '.join(cells)} | {fmt(p99('c32'), 2)} | {fmt(p99('dt-c32'), 2)} | "
      f"{fmt(med(cpu_per_conn(row, 'c32').values()), 1)} | {fmt(med(cpu_per_conn(row, 'dt-c32').values()), 1)} | {cbs} | "
      f"{fmt(med(cold(row).values()), 2)} | {fmt(w, 2)} | {fmt(idle_rss(row))} | {row_errors(row)} | {fmt(steal, 1)} |")
P("")

# ------------------------------------------------------------------ 1000 services
P("## Superserver with 1000 services (1000 ports, nowait echo-static)")
P("")
P("Start-up to readiness = from exec to the moment the last port (127.0.0.1:21999) accepts a connection "
  "(poll-connect every 1 ms, bounded to 30 s). Memory is the superserver's after readiness.")
P("")
rd = per_rep("superserver-1000", "ready1000", lambda d: d["ready_ms"])
if rd:
    ls = med(per_rep("superserver-1000", "ready1000", lambda d: d["listening"]).values())
    P("| start-up to readiness ms | ports listening | VmRSS KiB | Pss KiB | ÷ tcpserver VmRSS (1 service) |")
    P("|--:|--:|--:|--:|--:|")
    P(f"| {rng(rd.values(), 1)} | {fmt(ls)} | {fmt(v1000)} | {fmt(med(per_rep('superserver-1000', 'ready1000', lambda d: d['pss_kib']).values()))} | {fmt(v1000 / tcp_rss if (v1000 and tcp_rss) else None, 2, '×')} |")
else:
    P(f"error: {start_error('superserver-1000') or 'no data'}")
P("")

# ------------------------------------------------------------------ table
if any(TS[n]["ready"] or TS[n]["check"] for n in TABLE):
    P("## A table of 100, 1,000 and 10,000 services (bench/table.py)")
    P("")
    P("Half the services nowait (`echo-static`, each with an argument of its own), half wait (`small-services`), each on a Unix "
      "socket of its own in a directory on tmpfs (as `/run` is; on ext4 every bind's new inode costs several times more); "
      "`control` socket open, `RUST_LOG=info` (its default logging: one line per socket at start-up). The superserver on CPU 1, "
      "the clients on CPU 0. `--check` = wall time of `superserver --check FILE` (median, min–max); start-up = exec to `READY=1` "
      "on a `NOTIFY_SOCKET` of the bench's (the superserver also hands every socket to the fd store there, as under systemd); "
      "VmRSS after READY=1; wake-ups over the idle window after it. Reload: one service's `max_instances` changed and SIGHUP: "
      "read = reading, parsing, validating the file and preparing the programs, on a thread of its own; applied = the event loop's "
      "share (the diff), wall and CPU time, both from the superserver's `reload:` line; stall = the longest echo of a client of an "
      "unchanged nowait service (connect, write, read, close, back to back) that overlapped the reload, against the same client's "
      "longest and median in the 0.3 s before.")
    P("")
    P("| services | TOML bytes | --check ms | start-up to READY=1 ms | its CPU ms | VmRSS KiB | KiB per 1,000 services | idle wake-ups/s | "
      "reload: read ms | applied ms | applied CPU ms | stall ms (longest) | before: longest / median ms |")
    P("|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for n in TABLE:
        t = TS[n]
        P(f"| {n:,} | {fmt(t['bytes'])} | {rng(t['check'], 1)} | {rng(t['ready'], 1)} | {rng(t['ready_cpu'], 0)} | {fmt(t['rss'])} | {fmt(rss_per_1000(n), 0)} | "
          f"{fmt(t['wake'], 2)} | {rng(t['read'], 1)} | {rng(t['apply'], 1)} | {rng(t['apply_cpu'], 1)} | "
          f"{fmt(max(t['stall']) if t['stall'] else None, 1)} | {fmt(max(t['base_max']) if t['base_max'] else None, 1)} / {fmt(med(t['base_p50']), 2)} |")
    P("")

# ------------------------------------------------------------------ hold
P("## Held connections on a wait-mode small-services")
P("")
P("K idle connections opened by 8 threads, each echo-probed once, kept open, then checked alive (non-blocking peek: "
  "no EOF, no error). Memory = VmRSS/Pss summed over the server's process tree (superserver + small-services) "
  "after one warm-up connection (so the wait-mode service is running) and while all are held.")
P("")
P("| row | served / opened / asked | alive at end | errors | tree VmRSS before → held KiB | Pss before → held KiB | processes | Pss per conn KiB |")
P("|---|---|--:|---|---|---|--:|--:|")
for row in ("superserver-wait", "direct"):
    rs = by.get((row, "hold"), [])
    if not rs:
        continue
    r = rs[-1]
    if not r.get("ok"):
        P(f"| {row} | error: {(r.get('error') or '')[:160].replace('|', '/')} | | | | | | |")
        continue
    d = r["data"]
    lgd = d["loadgen"]
    errs = ", ".join(f"{k} {v}" for k, v in lgd["errors"].items() if v) or "0"
    per = (d["held"]["pss_kib"] - d["before"]["pss_kib"]) / lgd["served"] if lgd["served"] else None
    P(f"| {row} | {lgd['served']} / {lgd['opened']} / {lgd['count']} | {lgd['alive']} | {errs} | {fmt(d['before']['rss_kib'])} → {fmt(d['held']['rss_kib'])} | "
      f"{fmt(d['before']['pss_kib'])} → {fmt(d['held']['pss_kib'])} | {d['held']['procs']} | {fmt(per, 2)} |")
P("")

# ------------------------------------------------------------------ errors
errs = [r for r in recs if r.get("ok") is False]
if errs:
    P("## Errors recorded")
    P("")
    seen = set()
    for r in errs:
        key = (r["row"], r["test"], r.get("error"))
        if key in seen:
            continue
        seen.add(key)
        P(f"- `{r['row']}` {r['test']} (rep {r['rep']}): {(r.get('error') or 'loadgen reported failure').strip()[:400]}")
    P("")

# ------------------------------------------------------------------ configs
P("## Exact configurations")
P("")
P("Commands (each run as `taskset -c 1 CMD`; paths are this machine's):")
P("")
P("```")
for c in machine.get("cmds", []):
    row, cmd = c.split("|", 1)
    P(f"{row:20} {cmd}")
P("```")
P("")
for name, lang in (("superserver-nowait.toml", "toml"), ("superserver-wait.toml", "toml"),
                   ("xinetd-nowait.conf", ""), ("xinetd-wait.conf", ""),
                   ("inetd-nowait.conf", ""), ("inetd-wait.conf", ""),
                   ("superserver-default.toml", "toml"), ("xinetd-internal.conf", ""),
                   ("inetd-internal.conf", ""), ("inetd-internal.services", ""), ("oinetd-internal.sh", "sh")):
    p = os.path.join(conf_dir, name)
    if os.path.exists(p):
        P(f"`bench/out/conf/{name}`:")
        P("")
        P(f"```{lang}")
        P(open(p).read().rstrip())
        P("```")
        P("")
p = os.path.join(conf_dir, "superserver-1000.toml")
if os.path.exists(p):
    head = open(p).read().split("\n\n")
    P(f"`bench/out/conf/superserver-1000.toml` ({len([h for h in head if h.strip()])} services; the first two, the rest alike on ports 21000–21999):")
    P("")
    P("```toml")
    P("\n\n".join(head[:2]).rstrip())
    P("```")
    P("")
P("Notes on the peers' settings: xinetd has `cps` and `instances` raised (defaults 50/s then a 10 s shutdown, "
  "which the baseline run showed refusing 97 % of connections), no per-connection logging, `NOLIBWRAP`. "
  "openbsd-inetd runs with `-i` (no daemon) and `-R 1000000` (default 256 spawns/min, then it drops connections). "
  "tcpserver runs with `-H -R -l 0` (otherwise it does a reverse DNS lookup and an IDENT connection per client, "
  "i.e. traffic off loopback), `-c 1000` (default 40 concurrent) and `-b 1024` (default backlog 20, which at C=32 "
  "drops SYNs and adds 1 s retransmits). systemd-socket-activate has no limits to raise. "
  "Every launcher runs its child as root (the peers' `user = root`), so the superserver's services set "
  "`allow_root = true` (it refuses root children otherwise); the default job is the exception: unchanged, it runs "
  "small-services as `nobody` (`user_if_root`) with `no_new_privs`, as it ships. "
  "Built-in rows: xinetd-internal has the same `cps`/`instances`/logging/`NOLIBWRAP` settings as the other xinetd rows "
  "(`type = INTERNAL UNLISTED`: UNLISTED only so that it may take the bench's ports). openbsd-inetd finds a built-in by "
  "service name and its port in `/etc/services`, so it runs in a mount namespace of its own (`unshare -m`) where a "
  "services file of the bench's (above) is bind-mounted on `/etc/services`; the host's file is untouched. Its looping "
  "limit is raised twice: `-R 1000000` as in the other rows and `nowait.1000000` on each line (the per-service maximum "
  "of forks within 60 s, after which inetd closes the service for 10 minutes); a full run forks at most about 60,000 "
  "echo children per start and daytime forks none, so the limit never bends a figure. Its 127/8 rejection (datagrams "
  "from 127/8 dropped as possible loops) concerns UDP built-ins only; these rows are TCP.")
P("")
P("## What bounds each target")
P("")
P("- **nowait conn/s** is bounded by fork/exec of the child on the server CPU: the superserver starts "
  "children with `clone(CLONE_VM | CLONE_VFORK)` (no page tables copied, as `posix_spawn`), so it sits at "
  "about the posix_spawn ceiling and above the fork+exec one; its CPU per connection is below tcpserver's "
  "and xinetd's (see the server CPU column).")
P("- **wait mode** is bounded by the service itself: once the sockets are handed over the superserver is out "
  "of the data path (0 µs and 0 context switches of its own per connection above), so the ratio to the "
  "service binding by itself is 1 within noise; at C=32 all wait rows are bound by the load generator "
  "(CPU 0 busy), which the CPU-per-connection column corrects for.")
P("- **cold first byte, wait mode**: every launcher execs the same `small-services`, so the figure is that "
  "program's start-up (dynamic loading, Rust runtime, taking its sockets: about 1.5 ms here) plus a few tens "
  "of µs of launcher; the superserver's share (epoll wake-up, clone, exec) is the same order as xinetd's "
  "fork+exec and systemd-socket-activate's exec. Runs land on either side of 1.00× (0.84× and 1.03× in two "
  "consecutive full runs): parity within noise, not a difference the launcher can remove.")
P("- **idle memory** is mostly code pages: a dynamically linked Rust program with glibc starts near 1.8 MB "
  "RSS (hello world), above tcpserver's 1.3 MB, so the bench measures the static musl build "
  "(`scripts/build-static`): about 1.15 MB with one service. With 1000 services the heap adds about "
  "1.3 KB per service (its definition, prepared argv/env shared between services, socket, poll token).")
P("- **default job vs built-ins, steady state**: after the first connection the default job's small-services is already "
  "running and holds the listening sockets, so echo and daytime conn/s are small-services' own accept loop (accept, "
  "one read/write, close, in one epoll thread, nothing spawned) and the superserver is out of the path. xinetd's and "
  "openbsd-inetd's built-in echo forks the daemon per connection (no exec): bounded by fork + exit + reap on the server "
  "CPU. Their built-in daytime is answered inside the daemon (accept, write, close, no fork): the same kind of loop as "
  "small-services', so at C=32 all three are usually bound by the load generator (CPU 0) and the ratio is parity within noise; "
  "compare the server CPU per connection there.")
P("- **default job, cold first byte**: the first connection starts small-services (clone + exec, dropping to `nobody`, "
  "dynamic loading, Rust runtime, taking six TCP and four UDP sockets), which the peers' built-ins never do: their "
  "first byte is a fork (echo) or nothing (daytime) in a daemon that is already running. The target (≤ 1.00×) asks the "
  "default job's process start to beat no process start; it is reported, not expected to pass.")
P("- **idle wake-ups**: none: no timers run while idle; the only wake-ups are events (a connection, a "
  "child exiting, a signal).")
P("- **nowait against the accept ceiling**: `bench/accept-ceiling.c` does only what any nowait superserver must (accept4, "
  "posix_spawn or fork+exec of the same child with the same environment, close, reap on SIGCHLD), so the ratio is the "
  "superserver's own overhead per connection: its session per child (setsid), the program opened by descriptor, limits, "
  "counters and the peer checks. Both are bound by the child's exec and exit on the server CPU; the stated spread is "
  "between repetitions of the same run.")
P("- **the table of services**: `--check` and start-up are bound by parsing and validating the TOML (linear in its size) "
  "and, at start-up, by the kernel's work per socket (socket, bind of a new inode, listen, epoll registration, one fd-store "
  "message each) and one log line per socket; idle memory by the services' definitions, templates and sockets. A reload "
  "reads, parses and validates on a thread of its own, so the loop's share is the diff alone (compare by name, swap what "
  "changed); on a 2-CPU machine the reading thread shares the server CPU with the loop (everything of the server is "
  "pinned to CPU 1), which is what the stall column shows.")
P("")
with open(out_path, "w") as f:
    f.write("\n".join(L) + "\n")
