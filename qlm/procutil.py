"""Child processes that do not outlive the process that started them."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys

_PR_SET_PDEATHSIG = 1


def _set_parent_death_signal() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))


def die_with_parent(parent_pid: int) -> None:
    """A process pool's initializer: on Linux the worker gets SIGTERM when the process that
    started it dies, and it exits at once if that one is gone already. A `qlm bench sim`
    killed mid-run otherwise left its runs computing for minutes, slowing whatever was
    measured next."""
    if sys.platform.startswith("linux"):
        _set_parent_death_signal()
    if os.getppid() != parent_pid:
        os._exit(1)


def spawn_dying_with_parent(argv: list[str], **popen_kwargs) -> subprocess.Popen:
    """Popen(argv), where on Linux the kernel sends the child SIGTERM when its parent dies, so a
    launcher or test run killed with SIGKILL leaves no Redis server or service behind.

    util-linux's `setpriv --pdeathsig` asks for the signal and execs argv, so Popen can spawn
    with no Python in the child. A preexec_fn would make Popen fork() and run Python in the
    child, and forking a process whose gRPC threads are mid-call has killed that child before
    its exec. The preexec_fn stays as the fallback where setpriv is missing."""
    if sys.platform.startswith("linux"):
        setpriv = shutil.which("setpriv")
        if setpriv:
            argv = [setpriv, "--pdeathsig", "TERM", "--", *argv]
        else:
            popen_kwargs["preexec_fn"] = _set_parent_death_signal
    return subprocess.Popen(argv, **popen_kwargs)


def stop_process(proc: subprocess.Popen, timeout_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout_s`."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def kill_group(pgid: int) -> None:
    """Kills what is left of a process started with start_new_session=True (its pid is the
    group's id): the processes it started itself (vLLM's engine cores, 2-3 GB each, and a GPU's
    memory), which outlive it when it is SIGKILLed, since a parent-death signal does not pass
    to grandchildren."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
