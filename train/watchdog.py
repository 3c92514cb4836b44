"""The step watchdog: no step progress for a set time -> this rank's thread stacks go to a file, then exit.

It is faulthandler's C-level timer, so it fires even when Python is stuck inside a C call holding the GIL
(a collective waiting for a dead peer, a hung read); every rank runs its own.
"""
from __future__ import annotations

import faulthandler
from pathlib import Path

# faulthandler's own exit status after the dump; the launcher reads it as "watchdog fired".
WATCHDOG_EXIT_CODE = 1


class Watchdog:
    def __init__(self, run_dir: str, rank: int, timeout_s: float):
        self.timeout_s = timeout_s
        self.path = Path(run_dir) / "watchdog" / f"rank_{rank}.txt"
        self.file = None

    def beat(self) -> None:
        """Marks progress: the countdown starts again from timeout_s."""
        if self.timeout_s <= 0:
            return
        if self.file is None:
            # Opened now, not at the hang: a stuck process may be unable to open files.
            self.file = self._open()
        faulthandler.dump_traceback_later(self.timeout_s, exit=True, file=self.file)

    def _open(self):
        """The trace file, in a folder another rank's stop() may remove between our mkdir and open (it removes
        the folder once its own empty file is gone): then make the folder again."""
        for attempt in range(5):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                return open(self.path, "w", encoding="utf-8")
            except FileNotFoundError:
                if attempt == 4:
                    raise

    def stop(self) -> None:
        if self.file is None:
            return
        faulthandler.cancel_dump_traceback_later()
        self.file.close()
        self.file = None
        if self.path.stat().st_size == 0:
            self.path.unlink()  # nothing fired: leave no empty trace file behind
            try:
                self.path.parent.rmdir()
            except OSError:
                pass  # another rank's file is still there
