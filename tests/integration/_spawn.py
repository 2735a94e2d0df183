"""Launch a script as a small torch.distributed job on 127.0.0.1, bounded in time.

Used by the distributed tests: each rank is a fresh ``python`` process (gloo, CPU) with the
usual ``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` / ``MASTER_PORT`` environment, so the
worker calls ``dist.init_process_group("gloo")`` as under torchrun. On timeout or when a
rank fails, every process started here is killed (its whole process group) before the
error is raised, so no worker outlives its test. On timeout, every worker still running
first prints each thread's Python stack (``faulthandler``), so a hang names its place.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stat(pid: int | str) -> tuple[int, str] | None:
    """(parent pid, start time) of a process from ``/proc`` (Linux), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[1]), fields[19]
    except (OSError, ValueError, IndexError):
        return None


def _descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, start time) of the processes below ``pid`` (empty where ``/proc`` is missing).
    torchrun starts its workers in sessions of their own, out of reach of a group kill."""
    children: dict[int, list[tuple[int, str]]] = {}
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return []
    for entry in entries:
        st = _stat(entry)
        if st is not None:
            children.setdefault(st[0], []).append((int(entry), st[1]))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child[0])
    return out


def _signal(pid: int, sig: int, group: bool) -> None:
    try:
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _kill(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    """Stop every process started here and everything they started: SIGTERM first (torchrun
    then stops its workers), SIGKILL for whatever is left after a grace period."""
    alive = [p for p in procs if p.poll() is None]
    below = [d for p in alive for d in _descendants(p.pid)]
    for p in alive:
        _signal(p.pid, signal.SIGTERM, group=True)  # the session we started it in
    deadline = time.monotonic() + 10
    for p in alive:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal(p.pid, signal.SIGKILL, group=True)
            p.wait(timeout=10)
    for pid, started in below:
        st = _stat(pid)
        if st is not None and st[1] == started:  # still that process, not a reused pid
            _signal(pid, signal.SIGKILL, group=False)


def _dump_stacks(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    """Make every process still running below ``procs`` print each thread's Python stack
    into its output (SIGABRT, which ``PYTHONFAULTHANDLER`` turns into a dump before the
    abort), so that a hang says where it is; torchrun itself is left to the kill."""
    for p in procs:
        if p.poll() is not None:
            continue
        for pid, started in [(p.pid, ""), *_descendants(p.pid)]:
            st = _stat(pid)
            if st is None or (started and st[1] != started):
                continue
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if any(b"torchrun" in a or b"torch.distributed.run" in a for a in argv[:3]):
                continue
            _signal(pid, signal.SIGABRT, group=False)
    time.sleep(3.0)  # the dumps are written before the abort


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHONFAULTHANDLER="1",  # a fatal signal (an abort at exit, _dump_stacks) prints stacks
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(x for x in [str(ROOT / "src"), env.get("PYTHONPATH")] if x),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra or {})
    return env


@dataclass
class Job:
    """What a finished (or killed) job left: each process's output and exit code."""

    outputs: list[str]
    returncodes: list[int | None]
    timed_out: bool
    timeout: float

    @property
    def ok(self) -> bool:
        return not self.timed_out and all(c == 0 for c in self.returncodes)

    def report(self) -> str:
        what = f"timed out after {self.timeout:.0f}s" if self.timed_out else "finished"
        logs = "\n".join(
            f"----- process {i} -----\n{o[-6000:]}" for i, o in enumerate(self.outputs)
        )
        return f"distributed job {what} (exit codes {self.returncodes})\n{logs}"

    def check(self) -> Job:
        if not self.ok:
            raise AssertionError(self.report())
        return self


def run_commands(commands: Sequence[tuple[Sequence[str], dict[str, str]]], timeout: float) -> Job:
    """Run ``commands`` (argv, extra env) concurrently until all exit, one fails, or
    ``timeout`` seconds pass; every process is killed before this returns."""
    with tempfile.TemporaryDirectory() as tmp:
        procs: list[subprocess.Popen[bytes]] = []
        files = []
        timed_out = False
        try:
            for i, (argv, extra) in enumerate(commands):
                out = open(Path(tmp) / f"out{i}", "wb+")  # noqa: SIM115 (closed below)
                files.append(out)
                procs.append(
                    subprocess.Popen(
                        list(argv),
                        cwd=ROOT,
                        env=_env(extra),
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
            deadline = time.monotonic() + timeout
            while any(p.poll() is None for p in procs):
                if time.monotonic() > deadline:
                    timed_out = True
                    _dump_stacks(procs)
                    break
                if any(p.poll() not in (None, 0) for p in procs):
                    time.sleep(3.0)  # let the other ranks print their side of it
                    break
                time.sleep(0.1)
        finally:
            _kill(procs)
            outputs = []
            for f in files:
                f.seek(0)
                outputs.append(f.read().decode(errors="replace"))
                f.close()
        return Job(outputs, [p.returncode for p in procs], timed_out, timeout)


def run_ranks(
    script: str | Path, args: Sequence[str] = (), nprocs: int = 2, timeout: float = 120.0
) -> Job:
    """Run ``python script *args`` as ranks ``0 .. nprocs-1`` of one job."""
    port = str(free_port())
    commands = [
        (
            [sys.executable, str(script), *args],
            {
                "RANK": str(r),
                "LOCAL_RANK": str(r),
                "WORLD_SIZE": str(nprocs),
                "LOCAL_WORLD_SIZE": str(nprocs),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
            },
        )
        for r in range(nprocs)
    ]
    return run_commands(commands, timeout)
