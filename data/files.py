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


def save_versioned(path: PathLike, fmt: str, version: int, **fields) -> None:
    """torch.save of {"format": fmt, "version": version, **fields} (tensors and plain data only, so it loads
    with weights_only=True), written atomically, its folder made."""
    import torch

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save({"format": fmt, "version": version, **fields}, tmp)


def load_versioned(path: PathLike, fmt: str, version: int, what: str, made_by: str) -> dict:
    """The dict save_versioned wrote, loaded with weights_only=True (a file that would run code is refused).
    A file of another kind or version is a ValueError naming the file, what was expected and the command that
    writes one (`made_by`)."""
    import torch

    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a wrong or damaged file: say which and what was expected
        raise ValueError(f"{path} is not a {what} file ({type(exc).__name__}: {exc})") from None
    if not isinstance(blob, dict) or blob.get("format") != fmt:
        raise ValueError(f"{path} is not a {what} file: expected format {fmt!r} (written by `{made_by}`)")
    if blob.get("version") != version:
        raise ValueError(f"{path}: {what} version {blob.get('version')!r}, expected {version} (write it again with "
                         f"`{made_by}`)")
    return blob
