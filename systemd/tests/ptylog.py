#!/usr/bin/python3
"""Run a command on a fresh pty and copy everything it prints to a log file.

Usage: ptylog.py LOGFILE -- COMMAND [ARG...]

The booted systemd needs a terminal for /dev/console; run-all binds this pty's slave there.
Exits with the command's status once the command has exited and the pty is drained.
"""
import os
import sys


def main() -> int:
    if len(sys.argv) < 4 or sys.argv[2] != "--":
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 100
    log_path, argv = sys.argv[1], sys.argv[3:]
    master, slave = os.openpty()
    pid = os.fork()
    if pid == 0:
        os.close(master)
        os.setsid()
        for fd in (0, 1, 2):
            os.dup2(slave, fd)
        if slave > 2:
            os.close(slave)
        try:
            os.execvp(argv[0], argv)
        except OSError as e:
            os.write(2, f"ptylog: {argv[0]}: {e}\n".encode())
            os._exit(111)
    os.close(slave)
    with open(log_path, "ab", buffering=0) as log:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every holder of the slave side has closed it
                break
            if not data:
                break
            log.write(data)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) & 0xFF


if __name__ == "__main__":
    sys.exit(main())
