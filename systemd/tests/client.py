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
  client.py hammer FILE PORT...    daytime connections round-robin until FILE exists;
                                   fails if any connection is refused or unanswered
"""
import os
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


def hammer(stop: str, *ports: int) -> str:
    ok, failures, i = 0, [], 0
    while not os.path.exists(stop):
        port = ports[i % len(ports)]
        i += 1
        try:
            with tcp(port) as s:
                check_daytime(read_all(s, 4096))
            ok += 1
        except (OSError, CheckFailed) as e:
            failures.append(f"port {port}: {e}")
        time.sleep(0.01)
    if failures or not ok:
        raise CheckFailed(f"{ok} answered, {len(failures)} failed: {failures[:5]}")
    return f"{ok} connections answered, none refused"


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
