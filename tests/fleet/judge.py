#!/usr/bin/env python3
"""Judges a load run of the fleet test (tests/fleet/run) and prints PASS/FAIL lines.

    judge.py addresses RESULTS EXPECTED_COUNT LB_FRONT LB_BACK LABEL
    judge.py kill RESULTS HOST T_KILL WINDOW
    judge.py vanish RESULTS HOST T_LINK_DOWN WINDOW
    judge.py drain RESULTS HOST T_DRAIN AGENT_INTER
    judge.py undrain RESULTS HOST T_UNDRAIN SETTLE
    judge.py upgrade RESULTS

RESULTS is load.py's output (one JSON line per connection). Times are wall-clock seconds.
Exit status: 0 if every check passed, 1 if one failed.
"""

import collections
import json
import sys

failed = 0


def result(ok, name, detail):
    global failed
    if not ok:
        failed += 1
    print("%s %s (%s)" % ("PASS" if ok else "FAIL", name, detail))


def load(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def errors(recs):
    c = collections.Counter(r.get("err", "?") for r in recs)
    return ", ".join("%d %s" % (n, e) for e, n in c.most_common()) or "none"


def per_host(recs):
    c = collections.Counter(r.get("host", "?") for r in recs)
    return " ".join("%s:%d" % kv for kv in sorted(c.items()))


def show(recs, n=5):
    for r in recs[:n]:
        print("    | %s" % json.dumps(r, sort_keys=True))


def addresses(recs, expected, lb_front, lb_back, label):
    front_ip, front_port = lb_front.rsplit(":", 1)
    ok = [r for r in recs if r["ok"]]
    result(
        len(recs) == expected and len(ok) == expected,
        "%s: %d connections through HAProxy, every one answered and the line it sent at once echoed"
        % (label, expected),
        "%d results, %d answered, failures: %s; per host %s"
        % (len(recs), len(ok), errors([r for r in recs if not r["ok"]]), per_host(ok)),
    )
    right = [
        r
        for r in ok
        if r.get("addr") == r["src"]
        and r.get("port") == str(r["sport"])
        and r.get("proxy") == lb_back
        and r.get("local") == front_ip
        and r.get("local_port") == front_port
    ]
    result(
        len(right) == expected,
        "%s: real client address: REMOTE_ADDR/REMOTE_PORT = the client's own address and port, "
        "PROXY_ADDR = the balancer, TCPLOCALIP/PORT = its frontend" % label,
        "%d of %d connections" % (len(right), expected),
    )
    show([r for r in ok if r not in right])
    hosts = {r.get("host") for r in ok}
    result(len(hosts) == 3, "%s: every host served" % label, per_host(ok))


def kill(recs, host, t_kill, window, label="kill", event="the kill"):
    before = [r for r in recs if r["t1"] < t_kill]
    inside = [r for r in recs if r["t1"] >= t_kill and r["t0"] < t_kill + window]
    after = [r for r in recs if r["t0"] >= t_kill + window]
    bad = lambda rs: [r for r in rs if not r["ok"]]
    result(not bad(before), "%s: no failure before %s" % (label, event), "%d connections" % len(before))
    # Inside the window failures are expected (the sessions the lost host was serving);
    # they are counted, not judged.
    slowest = max((r["t1"] - r["t0"] for r in inside if r["ok"]), default=0)
    print(
        "INFO %s: inside the check window (%.1f s from %s): %d connections, %d failed (%s), "
        "the slowest answered one took %.2f s"
        % (label, window, event, len(inside), len(bad(inside)), errors(bad(inside)), slowest)
    )
    result(
        len(after) > 0 and not bad(after),
        "%s: 0 failed connections once the check window has passed" % label,
        "%d connections started after it, %d failed (%s); per host %s"
        % (len(after), len(bad(after)), errors(bad(after)), per_host([r for r in after if r["ok"]])),
    )
    show(bad(after))
    late = [r for r in after if r["ok"] and r.get("host") == host]
    result(not late, "%s: nothing reached %s after the window" % (label, host), "%d" % len(late))


def drain(recs, host, t_drain, inter):
    short = [r for r in recs if r["kind"] == "short"]
    longs = [r for r in recs if r["kind"] == "long"]
    before = [r for r in short if r["ok"] and r["t0"] < t_drain and r.get("host") == host]
    late = [r for r in short if r["ok"] and r["t0"] >= t_drain + inter and r.get("host") == host]
    after = [r for r in short if r["t0"] >= t_drain + inter]
    last = max((r["t0"] for r in short if r["ok"] and r.get("host") == host), default=t_drain)
    result(
        len(before) > 0 and len(after) > 0 and not late,
        "drain: no new connection reaches the drained host after one agent interval (%.1f s)"
        % inter,
        "before the drain %s served %d, the last new one %.2f s after it; after the interval %d "
        "connections, %d on %s; per host %s"
        % (
            host,
            len(before),
            last - t_drain,
            len(after),
            len(late),
            host,
            per_host([r for r in after if r["ok"]]),
        ),
    )
    show(late)
    result(
        all(r["ok"] for r in short),
        "drain: every short connection answered",
        "%d connections, failures: %s" % (len(short), errors([r for r in short if not r["ok"]])),
    )
    on_host = [r for r in longs if r.get("host") == host]
    result(
        len(on_host) > 0 and all(r["ok"] for r in longs),
        "drain: 0 sessions reset on the drained host (long sessions held across the drain)",
        "%d long sessions, %d on %s, %d ended cleanly, fewest pings echoed %d; failures: %s"
        % (
            len(longs),
            len(on_host),
            host,
            sum(r["ok"] for r in longs),
            min((r["pings"] for r in longs), default=0),
            errors([r for r in longs if not r["ok"]]),
        ),
    )
    show([r for r in longs if not r["ok"]])


def undrain(recs, host, t_undrain, settle):
    ok = [r for r in recs if r["ok"] and r["t0"] >= t_undrain + settle]
    back = [r for r in ok if r.get("host") == host]
    result(
        len(back) > 0 and all(r["ok"] for r in recs),
        "undrain: the host takes new connections again",
        "%d connections, %d failed, per host %s after %.1f s"
        % (len(recs), sum(not r["ok"] for r in recs), per_host(ok), settle),
    )


def upgrade(recs):
    bad = [r for r in recs if not r["ok"]]
    result(
        len(recs) > 0 and not bad,
        "rolling upgrade: 0 failed connections",
        "%d connections, %d failed (%s); per host %s"
        % (len(recs), len(bad), errors(bad), per_host([r for r in recs if r["ok"]])),
    )
    show(bad)


if __name__ == "__main__":
    cmd, path, rest = sys.argv[1], sys.argv[2], sys.argv[3:]
    recs = load(path)
    if cmd == "addresses":
        addresses(recs, int(rest[0]), rest[1], rest[2], rest[3])
    elif cmd == "kill":
        kill(recs, rest[0], float(rest[1]), float(rest[2]))
    elif cmd == "vanish":
        kill(recs, rest[0], float(rest[1]), float(rest[2]), "vanish", "losing the link")
    elif cmd == "drain":
        drain(recs, rest[0], float(rest[1]), float(rest[2]))
    elif cmd == "undrain":
        undrain(recs, rest[0], float(rest[1]), float(rest[2]))
    elif cmd == "upgrade":
        upgrade(recs)
    else:
        sys.exit(__doc__)
    sys.exit(1 if failed else 0)
