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
import glob
import os
import re
import signal
import stat
import subprocess
import sys
import tempfile
import time

import psutil

FORWARDED = (signal.SIGTERM, signal.SIGUSR1)
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36
LAUNCH_PID_ENV = "KD_LAUNCH_PID"  # the wrapper's pid, seen by every worker it launched
STATUS_DIR_ENV = "KD_WORKER_STATUS_DIR"  # set by run(): each worker records its exit status there
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


def quiet_accelerate(cmd: list[str]) -> list[str]:
    """``accelerate launch ...`` with ``--quiet``: without it a failed worker gets a launcher traceback after its own
    error (accelerate >= 1.16 repeats the worker's whole stderr in it). The worker's real status is kept by
    :func:`run` all the same, so nothing is lost by silencing the launcher."""
    names = [os.path.basename(c) for c in cmd[:3]]
    if names[:2] == ["accelerate", "launch"]:
        at = 2
    elif "accelerate.commands.launch" in cmd[:3]:
        at = cmd.index("accelerate.commands.launch") + 1
    else:
        return cmd
    script = next((i for i in range(at, len(cmd)) if cmd[i].endswith(".py")), len(cmd))
    return cmd if {"-q", "--quiet"} & set(cmd[at:script]) else [*cmd[:at], "--quiet", *cmd[at:]]


def run(cmd: list[str], poll_s: float = 0.1) -> int:
    """Run ``cmd`` (a launcher command line) to completion, every descendant included; returns the job's status:
    0, or the first failed worker's own exit status (a launcher reports 1 whatever its worker said)."""
    become_subreaper()
    status_dir = tempfile.mkdtemp(prefix="kd-worker-status-")
    env = dict(os.environ, PET_SIGNALS_TO_HANDLE=os.environ.get("PET_SIGNALS_TO_HANDLE", "SIGINT"),
               **{LAUNCH_PID_ENV: str(os.getpid()), STATUS_DIR_ENV: status_dir})
    try:
        status = _run(quiet_accelerate(cmd), env, poll_s)
        return 0 if status == 0 else worker_status(status_dir) or status
    finally:
        for path in glob.glob(os.path.join(status_dir, "*")):
            os.unlink(path)
        os.rmdir(status_dir)


def _run(cmd: list[str], env: dict, poll_s: float) -> int:
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


# --------------------------------------------------------------------------------------------- the worker's side
def worker_status(status_dir: str) -> int:
    """The exit status the first worker to fail recorded in ``status_dir`` (0 when none failed)."""
    codes = []
    for path in glob.glob(os.path.join(status_dir, "*.status")):
        with open(path) as f:
            codes.append((os.path.getmtime(path), int(f.read().strip() or 1)))
    failed = sorted(c for c in codes if c[1] != 0)
    return failed[0][1] if failed else 0


def exit_code(code) -> int:
    """What the interpreter makes of ``SystemExit(code)``: None -> 0, an int -> itself, a message -> 1."""
    return 0 if code is None else code if isinstance(code, int) else 1


def run_worker(main, bad_input: tuple[type[BaseException], ...] = ()) -> int:
    """Run a script's ``main()``. An exception of a ``bad_input`` type (e.g. kd.squad.SquadFormatError: its
    message says what is wrong where and how to fix it) is the script's one-paragraph error with status 2, not a
    traceback; every rank reads the same input, so the first rank alone says it. Under :func:`run` (launch.py)
    the status is recorded for the wrapper: a launcher turns every failure into 1, and the pipeline tells bad
    input (2) from a failed run (1) by it."""
    code = 1
    try:
        result = main()
        code = exit_code(result)
        return code
    except SystemExit as err:
        code = exit_code(err.code)
        raise
    except bad_input as err:
        code = 2
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"{os.path.basename(sys.argv[0])}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        status_dir = os.environ.get(STATUS_DIR_ENV)
        if status_dir and os.path.isdir(status_dir):
            path = os.path.join(status_dir, f"{os.getpid()}.status")
            with open(path + ".tmp", "w") as f:
                f.write(str(code))
            os.replace(path + ".tmp", path)


def untee_stderr() -> None:
    """accelerate >= 1.16 pipes a single-process (or DeepSpeed) worker's stderr through the launcher, which echoes
    it and, when the worker fails, raises it all again inside a traceback: every error would reach the user twice.
    When an ancestor ``accelerate`` process holds the reading end of this process's stderr, write to that
    ancestor's own stderr instead, as workers did under accelerate <= 1.15. Anything unexpected: leave it be."""
    try:
        if not stat.S_ISFIFO(os.fstat(2).st_mode):
            return
        ours = os.readlink("/proc/self/fd/2")
        pid = os.getppid()
        for _ in range(4):  # accelerate -> (deepspeed / torch launcher) -> worker
            if pid <= 1:
                return
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                is_accelerate = b"accelerate" in f.read()
            fds = {fd: os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
            if fds.get("2") == ours:  # it shares our stderr: look further up
                pid = psutil.Process(pid).ppid()
                continue
            if is_accelerate and ours in fds.values():
                sys.stderr.flush()
                target = os.open(f"/proc/{pid}/fd/2", os.O_WRONLY | os.O_APPEND)
                os.dup2(target, 2)
                os.close(target)
            return
    except (OSError, psutil.Error):
        return


def error_paragraph(log: str) -> str:
    """A failed script's own message from its log: the last ``<script>: error: ...`` paragraph, else the last line
    of the last traceback (the exception), else the last line."""
    lines = log.rstrip().splitlines()
    starts = [i for i, line in enumerate(lines) if re.match(r"\S+: error: ", line)]
    if starts:
        para = []
        for line in lines[starts[-1]:]:
            if not line.strip():
                break
            para.append(line)
        return "\n".join(para)
    tracebacks = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last):")]
    tail = lines[tracebacks[-1]:] if tracebacks else lines
    exceptions = [line for line in tail if re.match(r"[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b", line)]
    return exceptions[-1] if exceptions else (lines[-1] if lines else "")
