"""Writing a file so that no reader and no kill ever sees half of it: the new content goes to a temporary name
beside the file and is renamed over it once complete (a rename within one folder is atomic). Every package
writes its files this way through these two functions."""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Union

PathLike = Union[str, "os.PathLike[str]"]


@contextlib.contextmanager
def atomic_path(path: PathLike, suffix: str = ".tmp") -> Iterator[str]:
    """Yields the temporary path `path + suffix` for the caller (or a program it runs) to write; when the block
    ends normally it replaces `path`, when it raises the temporary is removed and `path` is left as it was.

    The temporary's name is fixed by `path`, not random: a write that a kill cut short is overwritten by the next
    one, and the run folder's cleaner (train.run_folder) knows `*.tmp` for what it is. A kill itself leaves the
    temporary behind, `path` untouched. `suffix` keeps an extension a writer needs (espeak-ng's ".tmp.wav")."""
    tmp = os.fspath(path) + suffix
    try:
        yield tmp
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    os.replace(tmp, path)


def atomic_write(path: PathLike, data: Union[bytes, str]) -> None:
    """Writes `data` (a str as UTF-8) to `path` through atomic_path: the old content or the new, never a part."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
