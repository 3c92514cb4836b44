"""Processes that die with the one that started them: the launcher's torchrun, and torchrun's ranks.

Each runs in a session of its own (so a terminal's Ctrl-C reaches only the launcher, which forwards it), where
nothing tells it that its parent was SIGKILLed: Linux's parent-death signal (prctl PR_SET_PDEATHSIG) does.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
from pathlib import Path
from typing import Callable, Optional

PR_SET_PDEATHSIG = 1
# Set by the launcher for its torchrun and the ranks: torchrun's parent, which a rank checks (see stay_with_torchrun).
LAUNCHER_PID_ENV = "STEPAUDIO_LAUNCHER_PID"


def parent_death_arm(is_expected_parent: Callable[[int], bool],
                     sig: int = signal.SIGKILL) -> Optional[Callable[[], None]]:
    """A function that asks the kernel to send `sig` to the calling process when its parent exits, then kills
    the process if its parent is not the expected one (the parent died before the request: the process is
    an orphan already, and no signal will come). None where there is no such signal (not Linux).

    libc is looked up here, in the parent, so that the function is safe to call between fork and exec
    (subprocess's preexec_fn)."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]

    def arm() -> None:
        if prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if not is_expected_parent(os.getppid()):
            os.kill(os.getpid(), sig)

    return arm


def parent_of(pid: int) -> Optional[int]:
    """pid's parent (Linux /proc), or None if pid is gone."""
    try:
        # The command name may hold spaces; the parent pid is the 2nd field after its closing ')'.
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def stay_with_torchrun() -> bool:
    """In a rank that torchrun started (TORCHELASTIC_RUN_ID set): SIGKILLed when torchrun exits. Returns
    whether it was armed.

    Started by our launcher, the rank's parent must be a child of the launcher (torchrun), else torchrun died
    before this ran; started by torchrun directly, it must at least not be an orphan of init."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return False
    launcher = os.environ.get(LAUNCHER_PID_ENV)

    def is_torchrun(parent: int) -> bool:
        if (parent_of(parent) == int(launcher)) if launcher else (parent != 1):
            return True
        print(f"torchrun, which started this rank, is gone (parent now {parent}, launcher {launcher or '-'}): "
              f"exiting", file=sys.stderr, flush=True)
        return False

    arm = parent_death_arm(is_torchrun)
    if arm is None:
        return False
    arm()
    return True
