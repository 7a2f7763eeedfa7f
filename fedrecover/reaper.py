"""The simulation's watchdog: a tiny process (standard library only, started with `python -I -S`)
that outlives a driver killed without warning (SIGKILL, the kernel's OOM killer) and ends the
processes the driver started. Ray's services fate-share with the driver, but the agents its
raylet starts (DashboardAgent, RuntimeEnvAgent, one of them listening on every interface) notice
their parent's death only after a minute or more. Nothing else can clean up after SIGKILL.

    python -I -S reaper.py DRIVER_PID     stdin: a pipe from the driver

It notes the driver's descendants (pid and start time, so a reused pid is never hit) twice a
second. When the driver ends the run it writes `done` and the watchdog leaves; when the pipe
closes without it, or the driver is gone, it terminates every noted process still alive (SIGTERM,
then SIGKILL after a grace period)."""

from __future__ import annotations

import os
import select
import signal
import sys
import time

DONE = b"done"
INTERVAL_S = 0.5
GRACE_S = 3.0


def descendants(pid: int) -> list[int]:
    """Child processes of `pid`, recursively, from /proc (Linux; elsewhere none)."""
    children: dict[int, list[int]] = {}
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return []
    for entry in entries:
        fields = _stat(int(entry))
        if fields:
            children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name: state, ppid, ... (field 22 of the file is [19])."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def alive_as(pid: int, started: str) -> bool:
    """Whether `pid` is still the process that started at `started` (and not a zombie)."""
    fields = _stat(pid)
    return bool(fields) and fields[0] != "Z" and fields[19] == started


def watch(driver: int, pipe: int) -> dict[int, str]:
    """Note the driver's descendants until the driver says done ({} is returned) or dies (the
    noted processes are returned)."""
    me, noted = os.getpid(), {}
    while True:
        ready, _, _ = select.select([pipe], [], [], INTERVAL_S)
        if ready:
            data = os.read(pipe, 64)
            if data.startswith(DONE):
                return {}
            if not data:
                return noted
        if _stat(driver) is None or _stat(driver)[0] == "Z":
            return noted
        for pid in descendants(driver):
            fields = _stat(pid)
            if pid != me and fields and pid not in noted:
                noted[pid] = fields[19]


def terminate(noted: dict[int, str]) -> None:
    for sig, wait in ((signal.SIGTERM, GRACE_S), (signal.SIGKILL, 0.0)):
        left = [pid for pid, started in noted.items() if alive_as(pid, started)]
        for pid in left:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + wait
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = [pid for pid in left if alive_as(pid, noted[pid])]


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # a Ctrl-C is the driver's to handle
    terminate(watch(int(sys.argv[1]), sys.stdin.fileno()))


if __name__ == "__main__":
    main()
