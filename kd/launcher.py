"""Run a launcher command (``accelerate launch ...`` or ``torchrun ...``) so that a preemption signal ends the job
the same way wherever it lands: every rank saves one checkpoint at the same step and the job exits 0.

What the launchers do on their own (torch 2.13, accelerate 1.15), and why a wrapper is needed:
- torchrun (and ``accelerate launch`` with several processes, which runs torchrun's agent in-process) starts its
  workers in new sessions, so a signal to the launcher's process group never reaches them. On SIGTERM the agent
  forwards the signal, SIGKILLs workers still alive after ``--shutdown_timeout`` (30 s: a large checkpoint is cut
  off) and exits 1 with a ``SignalException`` traceback; SIGUSR1 (not in its ``--signals_to_handle``) kills the
  agent at once and leaves the workers training on as orphans.
- ``accelerate launch`` with one process waits on its child and dies of SIGTERM or SIGUSR1 itself, orphaning it.

The wrapper: (1) becomes a child subreaper, so workers orphaned by a dying launcher become its children, and it
exits only when every one has; (2) starts the launcher with ``PET_SIGNALS_TO_HANDLE=SIGINT`` so that torchrun's
agent neither times workers out nor turns a signal into a failure; (3) forwards SIGTERM/SIGUSR1 it receives,
and the one that killed the launcher, to the workers (the launcher's children, or its orphans). The workers'
own handler (kd.loop.PreemptionFlag) and their per-step all-reduce make every rank save the same step; a signal
sent to one worker alone reaches all of them that way. The job's status is 0 when the workers exited 0.

Nothing is left behind when a process of the chain is killed outright (SIGKILL, which no handler sees): the
launcher gets SIGTERM when the wrapper dies (:func:`die_with_parent`), and a worker whose launcher died while
the wrapper that started it is gone too stops as on a preemption signal (:func:`orphaned`, read by
kd.loop.PreemptionFlag). pipeline.py starts the wrapper the same way, so the whole chain dies with the pipeline.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

import psutil

FORWARDED = (signal.SIGTERM, signal.SIGUSR1)
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36
LAUNCH_PID_ENV = "KD_LAUNCH_PID"  # the wrapper's pid, seen by every worker it launched
_libc = ctypes.CDLL(None, use_errno=True)  # loaded here: a preexec_fn (after fork) only calls it


def become_subreaper() -> None:
    """Linux: orphaned descendants are re-parented to this process instead of init."""
    if _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


def set_death_signal(signum: int) -> None:
    """Linux: this process gets ``signum`` when its parent dies (SIGKILL included); 0: no more. Elsewhere nothing."""
    if sys.platform.startswith("linux") and _libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def die_with_parent(signum: int = signal.SIGTERM):
    """A ``preexec_fn`` for subprocess.Popen: the child gets ``signum`` when the process starting it dies, and at
    once if that happened before the child could ask."""
    parent = os.getpid()

    def arm():
        set_death_signal(signum)
        if os.getppid() != parent:
            os.kill(os.getpid(), signum)
    return arm


def orphaned(first_parent: int) -> bool:
    """Whether a worker started by ``first_parent`` has lost its launch: outside launch.py, that parent died; under
    it, the wrapper (named in the environment) is no longer among its ancestors. A worker the wrapper adopted from
    a launcher that died is not: the wrapper passes on what ended the launcher."""
    wrapper = os.environ.get(LAUNCH_PID_ENV)
    if not wrapper:
        return os.getppid() != first_parent
    try:
        return int(wrapper) not in {p.pid for p in psutil.Process().parents()}
    except (psutil.Error, ValueError):
        return True


def _workers(launcher_pid: int, launcher_alive: bool) -> list[psutil.Process]:
    """The training processes: the launcher's children while it lives, afterwards its orphans (now ours)."""
    try:
        parent = psutil.Process(launcher_pid) if launcher_alive else psutil.Process()
        return [p for p in parent.children() if p.pid != launcher_pid]
    except psutil.NoSuchProcess:
        return []


def _send(processes: list[psutil.Process], signum: int) -> None:
    for p in processes:
        try:
            p.send_signal(signum)
        except psutil.NoSuchProcess:
            pass


def _died_of(status: int, signals: list[int]) -> bool:
    """Whether a launcher's exit status says one of ``signals`` ended it: killed by it (-N), or exiting with the
    shell's 128+N, or with ``sys.exit(-N)`` (256-N; seen from DeepSpeed's torch-elastic agent under load)."""
    return any(status in (-s, 128 + s, 256 - s) for s in signals if s in FORWARDED)


def run(cmd: list[str], poll_s: float = 0.1) -> int:
    """Run ``cmd`` (a launcher command line) to completion, every descendant included; returns the job's status."""
    become_subreaper()
    env = dict(os.environ, PET_SIGNALS_TO_HANDLE=os.environ.get("PET_SIGNALS_TO_HANDLE", "SIGINT"),
               **{LAUNCH_PID_ENV: str(os.getpid())})
    launcher = subprocess.Popen(cmd, env=env, preexec_fn=die_with_parent(signal.SIGTERM))
    pending: list[int] = []  # signals received and not yet delivered to any worker
    received: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: (pending.append(signum), received.append(signum)))
                for s in FORWARDED}
    launcher_status: int | None = None
    worker_failed = False
    try:
        while True:
            if pending:
                workers = _workers(launcher.pid, launcher_status is None)
                if workers:  # before the workers exist the signal waits (the launcher is still starting them)
                    for signum in pending:
                        _send(workers, signum)
                    pending.clear()
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break  # nothing left: the launcher and every orphan have exited
            if pid == 0:
                time.sleep(poll_s)
                continue
            code = os.waitstatus_to_exitcode(status)
            if pid == launcher.pid:
                launcher_status = code
                launcher.returncode = code  # reaped here, not by Popen
                for signum in FORWARDED:  # a preemption signal ended the launcher: its workers must hear it too
                    if _died_of(code, [signum]) and signum not in received:  # (once: not twice what we passed on)
                        pending.append(signum)
                        received.append(signum)
            elif code != 0:
                worker_failed = True
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if launcher_status == 0:
        return 0
    if received and launcher_status is not None and _died_of(launcher_status, received) and not worker_failed:
        return 0  # the launcher died of the signal; its workers saved and exited cleanly
    return launcher_status if launcher_status is not None else 1
