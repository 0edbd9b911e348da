#!/usr/bin/python3
"""Protocol clients for the systemd tests: each command checks one answer and exits 0 or 1.

Run inside the test instance's network namespace (nsenter -n). Every socket has a timeout,
so a silent server fails the check instead of hanging it. Usage:

  client.py echo-tcp PORT          100 KiB of random bytes come back byte for byte
  client.py echo-udp PORT          one datagram comes back unchanged
  client.py discard PORT           64 KiB are swallowed: nothing comes back, clean EOF
  client.py chargen PORT           RFC 864 rotating 72-character lines
  client.py qotd PORT              one printable quote, at most 512 characters, then EOF
  client.py daytime-tcp PORT       one printable line whose HH:MM:SS is within 5 s of now
  client.py daytime-udp PORT       the same over UDP
  client.py time-tcp PORT          4-byte RFC 868 time within 5 s of now
  client.py time-udp PORT          the same over UDP
  client.py echo-hold PORT N FILE  N concurrent echo connections; print HOLDING once all
                                   answered, keep them open until FILE exists (max 20 s)
  client.py hammer [--allow-cut] FILE PORT...
                                   daytime connections round-robin until FILE exists;
                                   fails if any connection is refused or unanswered
                                   (--allow-cut: one closed without a byte, its process
                                   stopped by a restart, is counted apart)
  client.py http-race PHASES N ADDR...
                                   N HTTP/1.1 GET / (body "Hello, World!") in PHASES rounds
                                   from 6 threads spread over the ADDRs (tcp:PORT or
                                   unix:PATH): one-shot, keep-alive and slow keep-alive
                                   connections, with pauses between rounds around a 200 ms
                                   idle timeout; prints the tally, fails if any request
                                   failed
"""
import os
import random
import re
import socket
import sys
import threading
import time

HOST = "127.0.0.1"
TIMEOUT = 5.0
RFC868_EPOCH = 2208988800  # seconds from 1900-01-01 to 1970-01-01


class CheckFailed(Exception):
    pass


def tcp(port: int) -> socket.socket:
    return socket.create_connection((HOST, port), timeout=TIMEOUT)


def udp_request(port: int, payload: bytes) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(1.0)
        # UDP is lossy and the first datagram may start the service: retry a few times.
        for _ in range(5):
            s.sendto(payload, (HOST, port))
            try:
                data, _ = s.recvfrom(65536)
                return data
            except socket.timeout:
                continue
    raise CheckFailed(f"no UDP answer from port {port}")


def read_all(s: socket.socket, limit: int = 1 << 20) -> bytes:
    chunks, total = [], 0
    while total < limit:
        b = s.recv(65536)
        if not b:
            break
        chunks.append(b)
        total += len(b)
    return b"".join(chunks)


def echo_tcp(port: int) -> str:
    payload = os.urandom(100 * 1024)
    with tcp(port) as s:
        sender = threading.Thread(target=lambda: (s.sendall(payload), s.shutdown(socket.SHUT_WR)))
        sender.start()
        got = read_all(s, len(payload) + 1)
        sender.join()
    if got != payload:
        raise CheckFailed(f"echoed {len(got)} bytes differ from the {len(payload)} sent")
    return f"{len(got)} bytes echoed byte for byte"


def echo_udp(port: int) -> str:
    payload = b"superserver-udp-echo " + os.urandom(16).hex().encode()
    got = udp_request(port, payload)
    if got != payload:
        raise CheckFailed(f"echoed datagram {got!r} != {payload!r}")
    return f"{len(got)}-byte datagram echoed"


def discard(port: int) -> str:
    with tcp(port) as s:
        s.sendall(b"x" * 65536)
        s.shutdown(socket.SHUT_WR)
        got = read_all(s)
    if got:
        raise CheckFailed(f"discard answered {len(got)} bytes")
    return "64 KiB discarded, clean EOF"


def chargen(port: int) -> str:
    with tcp(port) as s:
        data = b""
        while len(data) < 74 * 20:
            b = s.recv(65536)
            if not b:
                break
            data += b
    lines = data.split(b"\r\n")[:-1]  # the last piece may be cut off
    if len(lines) < 10:
        raise CheckFailed(f"only {len(lines)} complete lines: {data[:200]!r}")
    alphabet = bytes(range(32 if b" " in data else 33, 127))
    n = len(alphabet)
    first = alphabet.find(lines[0][:1])
    for i, line in enumerate(lines):
        want = bytes(alphabet[(first + i + j) % n] for j in range(72))
        if line != want:
            raise CheckFailed(f"line {i} is {line!r}, expected {want!r}")
    return f"{len(lines)} RFC 864 lines"


def printable(text: bytes) -> bool:
    return all(32 <= c < 127 or c in b"\r\n\t" for c in text)


def qotd(port: int) -> str:
    with tcp(port) as s:
        got = read_all(s, 4096)
    if not got.strip() or len(got) > 512 or not printable(got):
        raise CheckFailed(f"bad quote ({len(got)} bytes): {got[:200]!r}")
    return f"quote of {len(got)} bytes"


def check_daytime(line: bytes) -> str:
    text = line.decode("ascii", "replace")
    if not printable(line) or not text.strip() or "\n" in text.strip():
        raise CheckFailed(f"not one printable line: {line!r}")
    m = re.search(r"(\d{1,2}):(\d{2}):(\d{2})", text)
    if not m:
        raise CheckFailed(f"no HH:MM:SS in {text!r}")
    got = int(m[1]) * 3600 + int(m[2]) * 60 + int(m[3])
    now = time.time()
    # Accept UTC or local time (the RFC leaves the format free); mod one day for midnight.
    candidates = [time.gmtime(now), time.localtime(now)]
    for t in candidates:
        want = t.tm_hour * 3600 + t.tm_min * 60 + t.tm_sec
        if min((got - want) % 86400, (want - got) % 86400) <= 5:
            if str(t.tm_year) not in text and str(t.tm_year % 100) not in text:
                raise CheckFailed(f"year {t.tm_year} missing from {text!r}")
            return f"daytime {text.strip()!r}"
    raise CheckFailed(f"time in {text!r} is more than 5 s from now")


def daytime_tcp(port: int) -> str:
    with tcp(port) as s:
        return check_daytime(read_all(s, 4096))


def daytime_udp(port: int) -> str:
    return check_daytime(udp_request(port, b"\n"))


def check_time(data: bytes) -> str:
    if len(data) != 4:
        raise CheckFailed(f"time answer is {len(data)} bytes, expected 4: {data!r}")
    got = int.from_bytes(data, "big")
    now = int(time.time()) + RFC868_EPOCH
    if abs(got - now) > 5:
        raise CheckFailed(f"time {got} is {got - now} s from now ({now})")
    return f"time {got} ({got - now:+d} s)"


def time_tcp(port: int) -> str:
    with tcp(port) as s:
        return check_time(read_all(s, 64))


def time_udp(port: int) -> str:
    return check_time(udp_request(port, b""))


def echo_hold(port: int, count: int, release: str) -> str:
    conns = [tcp(port) for _ in range(count)]
    for i, s in enumerate(conns):
        s.sendall(f"connection {i}\n".encode())
    for i, s in enumerate(conns):
        want = f"connection {i}\n".encode()
        got = b""
        while len(got) < len(want):
            b = s.recv(4096)
            if not b:
                break
            got += b
        if got != want:
            raise CheckFailed(f"connection {i} got {got!r}, expected {want!r}")
    print("HOLDING", flush=True)
    deadline = time.monotonic() + 20
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.05)
    for s in conns:
        s.close()
    return f"{count} concurrent connections answered"


def hammer(stop: str, *ports: int, allow_cut: bool = False) -> str:
    """Daytime connections round the ports until `stop` exists. With allow_cut, a connection
    that was accepted and then closed without a byte (its process stopped with the server's,
    as a restart does to sessions in flight) is counted apart, not as a failure: what must
    never happen there is a refused or reset connect."""
    ok, cut, failures, i = 0, 0, [], 0
    while not os.path.exists(stop):
        port = ports[i % len(ports)]
        i += 1
        try:
            with tcp(port) as s:
                answer = read_all(s, 4096)
                if allow_cut and answer == b"":
                    cut += 1
                else:
                    check_daytime(answer)
                    ok += 1
        except (OSError, CheckFailed) as e:
            failures.append(f"port {port}: {e}")
        time.sleep(0.01)
    if failures or not ok:
        raise CheckFailed(f"{ok} answered, {cut} cut short, {len(failures)} failed: {failures[:5]}")
    if allow_cut:
        return f"{ok} connections answered, {cut} in flight cut short by the stop, none refused"
    return f"{ok} connections answered, none refused"


HELLO = b"Hello, World!"


def http_dial(addr: str) -> socket.socket:
    kind, _, where = addr.partition(":")
    if kind == "tcp":
        s = socket.create_connection((HOST, int(where)), timeout=TIMEOUT)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s
    if kind == "unix":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(TIMEOUT)
        s.connect(where)
        return s
    raise CheckFailed(f"address {addr!r}: expected tcp:PORT or unix:PATH")


def http_get(s: socket.socket, buf: bytearray, close: bool) -> None:
    """One GET / on s; checks status 200 and the body. buf holds bytes read past the answer."""
    s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n" + (b"Connection: close\r\n" if close else b"") + b"\r\n")
    while b"\r\n\r\n" not in buf:
        b = s.recv(65536)
        if not b:
            raise CheckFailed(f"EOF before the end of the headers ({bytes(buf[:80])!r})")
        buf += b
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    if not lines[0].startswith(b"HTTP/1.1 200"):
        raise CheckFailed(f"status line {lines[0]!r}")
    length = None
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            length = int(v)
    if length is None:
        raise CheckFailed("no content-length")
    while len(rest) < length:
        b = s.recv(65536)
        if not b:
            raise CheckFailed("EOF in the body")
        rest += b
    if rest[:length] != HELLO:
        raise CheckFailed(f"body {rest[:length]!r}")
    buf[:] = rest[length:]


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.ok = 0
        self.failed = 0
        self.errors = []

    def record(self, err=None, count=1):
        with self.lock:
            if err is None:
                self.ok += count
            else:
                self.failed += count
                if len(self.errors) < 10:
                    self.errors.append(err)


def http_connection(addr: str, n: int, pause: float, tally: Tally) -> None:
    """n requests on one connection (the last asks to close), pause seconds between them."""
    try:
        s = http_dial(addr)
    except OSError as e:
        tally.record(f"{addr}: connect: {e}", n)
        return
    with s:
        buf = bytearray()
        for i in range(n):
            try:
                http_get(s, buf, close=i + 1 == n)
            except (OSError, CheckFailed) as e:
                tally.record(f"{addr}: request {i + 1} of {n}: {e}", n - i)
                return
            tally.record()
            if pause and i + 1 < n:
                time.sleep(pause)


def client_round(addr: str, rng: random.Random, tally: Tally) -> int:
    """One client's work: one-shot requests, a fast keep-alive connection, or a slow one that
    stays open longer than the idle timeout. Returns the number of requests."""
    k = rng.randrange(10)
    if k < 4:
        n = 1 + rng.randrange(12)
        for _ in range(n):
            http_connection(addr, 1, 0, tally)
        return n
    if k < 8:
        n = 2 + rng.randrange(40)
        http_connection(addr, n, 0, tally)
        return n
    http_connection(addr, 6, 0.06, tally)
    return 6


def http_race(phases: int, total: int, *addrs: str) -> str:
    clients, tally, rng = 6, Tally(), random.Random(0x9E3779B97F4A7C15)
    per_phase = total // phases
    sent = [0]
    sent_lock = threading.Lock()
    for phase in range(phases):
        start = sent[0]

        def client(addr, seed):
            r = random.Random(seed)
            time.sleep(r.randrange(30) / 1000)
            while sent[0] - start < per_phase:
                n = client_round(addr, r, tally)
                with sent_lock:
                    sent[0] += n

        threads = [threading.Thread(target=client, args=(addrs[c % len(addrs)], rng.getrandbits(64)))
                   for c in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        # Quiet: on even rounds longer than the 200 ms idle timeout (an idle exit, then a new
        # activation); on odd rounds 195..215 ms, so the next clients arrive right around the
        # exit decision.
        time.sleep((300 + rng.randrange(50) if phase % 2 == 0 else 195 + rng.randrange(20)) / 1000)
    line = f"{tally.ok} requests answered, {tally.failed} failed"
    if tally.failed or tally.ok < per_phase * phases:
        raise CheckFailed(f"{line}; first errors: {tally.errors[:5]}")
    return line


COMMANDS = {
    "echo-tcp": echo_tcp, "echo-udp": echo_udp, "discard": discard, "chargen": chargen,
    "qotd": qotd, "daytime-tcp": daytime_tcp, "daytime-udp": daytime_udp,
    "time-tcp": time_tcp, "time-udp": time_udp,
}


def main(argv: list) -> int:
    try:
        if len(argv) == 2 and argv[0] in COMMANDS:
            print(COMMANDS[argv[0]](int(argv[1])))
        elif len(argv) == 4 and argv[0] == "echo-hold":
            print(echo_hold(int(argv[1]), int(argv[2]), argv[3]))
        elif len(argv) >= 4 and argv[0] == "http-race":
            print(http_race(int(argv[1]), int(argv[2]), *argv[3:]))
        elif len(argv) >= 4 and argv[0] == "hammer" and argv[1] == "--allow-cut":
            print(hammer(argv[2], *map(int, argv[3:]), allow_cut=True))
        elif len(argv) >= 3 and argv[0] == "hammer":
            print(hammer(argv[1], *map(int, argv[2:])))
        else:
            print(__doc__, file=sys.stderr)
            return 100
    except (OSError, CheckFailed) as e:
        print(f"{argv[0]} {argv[1:]}: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
