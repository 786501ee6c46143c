"""The processes of a bench run: start, wait until they listen, read their CPU and memory, stop.

Each process runs in its own session, so stopping it (and, as a last resort, killing its
process group) touches nothing the harness did not start.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PROXY_CORE = 0
CLIENT_CORE = 1


class StartError(Exception):
    """A process that did not come up; the message says why (with its last output lines)."""


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports on 127.0.0.1 that nothing listens on right now."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def is_listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def pinned(command: Sequence[str], core: int | None) -> list[str]:
    """`command` run by `taskset -c CORE` (taskset execs it: the pid stays the command's)."""
    return list(command) if core is None else ["taskset", "-c", str(core), *command]


class Proc:
    """One started process (and whatever it forks), its output in `workdir`."""

    def __init__(self, name: str, command: Sequence[str], workdir: Path, cwd: Path | None = None):
        self.name = name
        self.workdir = workdir
        self.log_path = workdir / f"{name}.log"
        with open(self.log_path, "wb") as log:
            self.popen = subprocess.Popen(
                list(command),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def __repr__(self) -> str:
        return f"<Proc {self.name} pid={self.popen.pid} rc={self.popen.poll()}>"

    @property
    def pid(self) -> int:
        return self.popen.pid

    def wait_listening(self, ports: Sequence[int], timeout: float = 15.0) -> None:
        """Return once every port accepts; StartError if the process exits or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise StartError(f"{self.name} exited with {self.popen.returncode}: {self.tail()}")
            if all(is_listening(port) for port in ports):
                return
            time.sleep(0.05)
        raise StartError(f"{self.name} not listening after {timeout:g}s: {self.tail()}")

    def tail(self, lines: int = 6) -> str:
        """The last lines of its output (and of an nginx error log), for error messages."""
        texts = [self.log_path.read_text(errors="replace")]
        error_log = self.workdir / "error.log"
        if error_log.exists():
            texts.append(error_log.read_text(errors="replace"))
        last = "\n".join(texts).strip().splitlines()[-lines:]
        return " | ".join(last) if last else "(no output)"

    def tree(self) -> list[int]:
        """The pid and every live descendant's (workers of nginx or grayproxy)."""
        return process_tree(self.pid)

    def cpu_seconds(self) -> float:
        """utime + stime of the whole tree so far."""
        return sum(cpu_seconds(pid) for pid in self.tree())

    def peak_rss_kb(self) -> int:
        """The largest VmHWM (peak resident set) of any process in the tree, in KiB."""
        return max((peak_rss_kb(pid) for pid in self.tree()), default=0)

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.popen.wait()
        # nginx workers or grayproxy workers left behind by an unclean exit
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)


def process_tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            parent = parent_pid(int(entry))
            if parent is not None:
                children.setdefault(parent, []).append(int(entry))
    tree, pending = [], [root]
    while pending:
        pid = pending.pop()
        tree.append(pid)
        pending.extend(children.get(pid, ()))
    return tree


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (which may hold spaces)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return parse_stat(text)


def parse_stat(text: str) -> list[str]:
    """Split a /proc/PID/stat line; index 0 is the state (field 3 of proc(5))."""
    return text[text.rindex(")") + 2 :].split()


def parent_pid(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[1])


def cpu_seconds(pid: int) -> float:
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    return stat_cpu_seconds(fields)


def stat_cpu_seconds(fields: Sequence[str]) -> float:
    """utime + stime (proc(5) fields 14 and 15) in seconds."""
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def peak_rss_kb(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    return parse_vm_hwm(status)


def parse_vm_hwm(status: str) -> int:
    """VmHWM from /proc/PID/status, in KiB (0 if absent, as for kernel threads)."""
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


@dataclass(frozen=True, slots=True)
class CoreTicks:
    """A core's jiffies since boot: running anything, of which serving interrupts, in all."""

    busy: int
    irq: int
    total: int


def core_times() -> dict[int, CoreTicks]:
    return parse_proc_stat(Path("/proc/stat").read_text())


def parse_proc_stat(text: str) -> dict[int, CoreTicks]:
    cores = {}
    for line in text.splitlines():
        name, *values = line.split()
        if name.startswith("cpu") and name != "cpu":
            # user nice system idle iowait irq softirq steal (guest time is inside user)
            ticks = [int(value) for value in values[:8]] + [0] * (8 - len(values[:8]))
            idle = ticks[3] + ticks[4]
            cores[int(name[3:])] = CoreTicks(sum(ticks) - idle, ticks[5] + ticks[6], sum(ticks))
    return cores


def core_shares(
    before: dict[int, CoreTicks], after: dict[int, CoreTicks], core: int
) -> tuple[float, float]:
    """Between two core_times() readings: the share of time `core` was busy, and the part of
    it spent on interrupts (the kernel's network work, charged to no process)."""
    total = after[core].total - before[core].total
    if not total:
        return 0.0, 0.0
    busy = after[core].busy - before[core].busy
    return busy / total, (after[core].irq - before[core].irq) / total
