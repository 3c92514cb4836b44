"""What a (re)start does to its run folder before training: removes the temporaries a killed attempt left
half-written, and drops the log lines of the steps a resume rolls back."""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import List, Optional

from data.files import atomic_write

# model.checkpoint.save_stepfun's names (the export, RUN_DIR/init's build): `.export.tmp-PID`, `.export.old-PID`.
_PID_TEMPORARY = re.compile(r"^\..+\.(?:tmp|old)-(\d+)$")
# The folders where this project writes temporaries, relative to the run folder.
_TEMPORARY_HOMES = (".", "checkpoints", "checkpoints/universal", "sample_keys")


def process_start_time() -> float:
    """When this process started (wall clock, Linux /proc); now where /proc does not say."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


def _newest_change(path: Path) -> float:
    """The latest modification time of path or anything inside it."""
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for inner in path.rglob("*"):
            try:
                newest = max(newest, inner.lstat().st_mtime)
            except OSError:
                pass  # removed while we looked
    return newest


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _stale_reason(path: Path, started: float) -> Optional[str]:
    named = _PID_TEMPORARY.match(path.name)
    if named and not _pid_alive(int(named.group(1))):
        return f"its process {named.group(1)} is gone"
    if not named and not path.name.endswith(".tmp"):
        return None
    # Without a PID (a checkpoint's step_N.tmp is written by every rank, on every node), or with the PID of a
    # live process that may be unrelated: stale when nothing in it changed since this attempt started.
    changed = _newest_change(path)
    if changed < started:
        return f"unchanged since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(changed))}, before this run started"
    return None


def remove_stale_temporaries(run_dir: str, started: float) -> List[str]:
    """Removes what killed attempts left half-written in run_dir and returns a line per removal.

    Temporaries are `.NAME.tmp-PID` and `.NAME.old-PID` (the export, RUN_DIR/init's build), and `*.tmp`
    (a checkpoint's `step_N.tmp`, `latest.tmp`, a universal conversion, RUN_DIR/init's build, any file written
    through data.files, such as a log that drop_steps_after rewrites), in the run folder, checkpoints/,
    checkpoints/universal/ and sample_keys/. One with a PID goes when no live process
    here has that PID; any goes when nothing in it changed since `started` (this attempt's start).
    Call it on one process (rank 0) before anything of this attempt writes into run_dir: a temporary that
    changed after `started` belongs to a process still running, and stays."""
    removed = []
    root = Path(run_dir)
    for home in _TEMPORARY_HOMES:
        folder = root / home
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            try:
                reason = _stale_reason(path, started)
            except OSError:
                continue  # removed while we looked
            if reason is None:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(f"removed the stale temporary {path} ({reason})")
    return removed


def drop_steps_after(path: Path, step: int) -> int:
    """Rewrites the JSON-lines log at path without its lines of steps after `step` (metrics, evaluations,
    "done", sample keys of steps a resume repeats) or cut short by a kill; returns how many lines went.

    Atomic: a kill leaves the old file or the new one, never a part."""
    if not path.is_file():
        return 0
    text = path.read_text(encoding="utf-8")
    kept, dropped = [], 0
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            dropped += 1  # a line cut short by a kill, which the next append would have joined
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] > step:
            dropped += 1
        else:
            kept.append(line + "\n")
    if dropped or text and not text.endswith("\n"):
        atomic_write(path, "".join(kept))
    return dropped
