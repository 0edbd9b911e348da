#!/usr/bin/env python3
"""bench/table.py — the superserver with a table of N services (called by bench/run).

usage: table.py SUPERSERVER ECHO_STATIC SMALL_SERVICES N [N ...] [--server-cpu C] [--wake-s S]
                [--reps R] [--dir DIR]

For each N: N services, half nowait (ECHO_STATIC per connection), half wait (SMALL_SERVICES),
each on a Unix socket of its own in a directory on tmpfs (/dev/shm, as /run is in
production; on ext4 every bind's new inode costs several times more). The superserver runs
pinned to CPU C with RUST_LOG=info (its default logging) and a control socket; this script
(the clients) runs wherever bench/run pinned it. Prints one JSON line per measurement:

- check:   wall time of `superserver --check FILE` (R runs; the plan is written to /dev/null)
- ready:   exec to READY=1 on NOTIFY_SOCKET (a datagram socket of ours; the superserver also
           sends every socket to the fd store there, as it would to systemd), the CPU time
           (user + system) it had used by then (10 ms ticks), VmRSS/Pss then
- wakeups: context switches of all its threads over S idle seconds after READY=1
- reload:  R times, one service's max_instances changed and SIGHUP sent: `read_ms` (reading,
           parsing, validating the file, preparing the programs) and `apply_ms` (applying the
           diff in the event loop; `apply_cpu_ms` the loop thread's CPU time for it), all from
           the superserver's own `reload:` log line, and
           `stall_ms`: while the reload ran, the longest a client of an unchanged nowait service
           waited for its echo (connect, write, read, close, back to back), against
           `base_p50_ms`/`base_max_ms` of the same client in the 0.3 s before the SIGHUP
"""
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

args = sys.argv[1:]
opts = {"--server-cpu": "1", "--wake-s": "3", "--reps": "3", "--dir": ""}
pos = []
i = 0
while i < len(args):
    if args[i] in opts:
        opts[args[i]] = args[i + 1]
        i += 2
    else:
        pos.append(args[i])
        i += 1
ss, echo, small = pos[0], pos[1], pos[2]
sizes = [int(n) for n in pos[3:]]
cpu, wake_s, reps = opts["--server-cpu"], float(opts["--wake-s"]), int(opts["--reps"])
base = opts["--dir"] or ("/dev/shm" if os.path.isdir("/dev/shm") else "/tmp")


def out(test, n, ok, data, error=""):
    print(json.dumps({"test": test, "services": n, "ok": ok, "data": data, "error": error}), flush=True)


def write_config(path, d, n, probe_max):
    parts = [f'[superserver]\ncontrol = "{d}/control"\n']
    for i in range(n):
        if i % 2 == 0:
            mi = probe_max if i == n - 2 else 100
            # each nowait service with an argument of its own (no two argv lists alike)
            parts.append(f'[service.s{i:05d}]\nmode = "nowait"\nexec = ["{echo}", "s{i:05d}"]\n'
                         f'listen = "unix:{d}/s{i:05d}.sock"\nmax_instances = {mi}\nallow_root = true\n')
        else:
            parts.append(f'[service.s{i:05d}]\nmode = "wait"\nexec = ["{small}", "--idle-timeout=8s"]\n'
                         f'listen = {{ echo = "unix:{d}/s{i:05d}.sock" }}\nallow_root = true\n')
    tmp = path + ".new"
    with open(tmp, "w") as f:
        f.write("\n".join(parts))
    os.rename(tmp, path)


def mem(pid):
    rss = pss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss


def ctxsw(pid):
    t = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            for line in f:
                if "ctxt_switches:" in line:
                    t += int(line.split()[1])
    return t


def echo_once(path):
    t = time.perf_counter()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(path)
    s.sendall(b"ping\n")
    got = b""
    while not got.endswith(b"\n"):
        b = s.recv(64)
        if not b:
            break
        got += b
    s.close()
    if got != b"ping\n":
        raise RuntimeError(f"echo answered {got!r}")
    return (time.perf_counter() - t) * 1000


RELOAD_RE = re.compile(r"reload: .* \(read in ([0-9.]+) ms, applied in ([0-9.]+) ms, ([0-9.]+) ms of CPU\)")


def measure(n):
    d = os.path.join(base, f"superserver-bench-table-{n}")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d, mode=0o700)
    conf = os.path.join(d, "superserver.toml")
    write_config(conf, d, n, 100)
    size = os.path.getsize(conf)
    pin = ["taskset", "-c", cpu]

    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        rc = subprocess.call(pin + [ss, "--check", conf], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ts.append((time.perf_counter() - t) * 1000)
        if rc != 0:
            out("check", n, False, None, f"--check exit {rc}")
            return
    out("check", n, True, {"ms": ts, "bytes": size})

    ns = os.path.join(d, "notify.sock")
    ready = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    ready.bind(ns)
    ready.settimeout(60)
    logp = os.path.join(d, "superserver.log")
    env = dict(os.environ, NOTIFY_SOCKET=ns, RUST_LOG="info")
    t0 = time.perf_counter()
    proc = subprocess.Popen(pin + [ss, "--config", conf], env=env, stdout=subprocess.DEVNULL,
                            stderr=open(logp, "w"))
    try:
        while True:
            m = ready.recv(4096)
            if b"READY=1" in m:
                break
        t1 = time.perf_counter()
        rss, pss = mem(proc.pid)
        with open(f"/proc/{proc.pid}/stat") as f:
            st = f.read().rsplit(")", 1)[1].split()
        cpu_ms = (int(st[11]) + int(st[12])) * 1000 / os.sysconf("SC_CLK_TCK")
        out("ready", n, True, {"ready_ms": (t1 - t0) * 1000, "cpu_ms": cpu_ms, "rss_kib": rss, "pss_kib": pss})
        time.sleep(0.2)  # the loop logs "ready" after READY=1, then sleeps in epoll_wait
        a = ctxsw(proc.pid)
        time.sleep(wake_s)
        b = ctxsw(proc.pid)
        out("wakeups", n, True, {"seconds": wake_s, "ctxsw": b - a, "per_s": (b - a) / wake_s})

        probe = os.path.join(d, "s00000.sock")
        for r in range(reps):
            lat = []  # (start, ms)
            stop = threading.Event()
            err = []

            def client():
                while not stop.is_set():
                    t = time.perf_counter()
                    try:
                        lat.append((t, echo_once(probe)))
                    except Exception as e:  # noqa: BLE001 - reported, not raised
                        err.append(str(e))
                        return

            th = threading.Thread(target=client)
            th.start()
            time.sleep(0.3)
            write_config(conf, d, n, 101 + r)
            with open(logp) as f:
                before = f.read().count(" (read in ")
            hup = time.perf_counter()
            proc.send_signal(signal.SIGHUP)
            line = None
            deadline = time.time() + 120
            while line is None and time.time() < deadline:
                while True:
                    m = ready.recv(4096)
                    if b"READY=1" in m:
                        break
                with open(logp) as f:
                    done = [x for x in f if " (read in " in x]
                if len(done) > before:
                    line = done[-1]
            end = time.perf_counter()
            time.sleep(0.2)
            stop.set()
            th.join()
            m = RELOAD_RE.search(line or "")
            basel = [ms for (t, ms) in lat if t + ms / 1000 < hup]
            # every probe that overlapped the reload (started before its end, ended after the SIGHUP)
            during = [ms for (t, ms) in lat if t < end and t + ms / 1000 >= hup]
            if not m or err:
                out("reload", n, False, None, f"no reload line or client error: {err[:1]} {line!r}")
                continue
            out("reload", n, True, {
                "read_ms": float(m.group(1)), "apply_ms": float(m.group(2)),
                "apply_cpu_ms": float(m.group(3)),
                "hup_to_ready_ms": (end - hup) * 1000,
                "stall_ms": max(during) if during else None, "probes_during": len(during),
                "base_p50_ms": statistics.median(basel) if basel else None,
                "base_max_ms": max(basel) if basel else None})
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        ready.close()
        shutil.rmtree(d, ignore_errors=True)


for n in sizes:
    measure(n)
