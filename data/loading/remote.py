"""Shard locations that are not local paths: http(s)://, s3:// and gs:// URLs and webdataset's `pipe:CMD`.

Each opens as a byte stream read front to back, never copied to disk; a dropped connection is resumed at the
first byte not yet delivered, so the tar reader above sees one unbroken stream. Also the helpers that name a
location's folder and file the same way for local paths and URLs (where index.json and tokenizer.json lie).
"""
from __future__ import annotations

import contextlib
import http.client
import io
import logging
import os
import posixpath
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, BinaryIO, Callable, List, Optional, Sequence, Tuple

logger = logging.getLogger(__name__)

PIPE_PREFIX = "pipe:"
RETRY_DELAYS_S: Tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
"""Waits before each new try of a small whole-object read (index.json, tokenizer.json) that failed with an
OSError other than not-found or access-denied: the same schedule as the loader's shard reads."""
TIMEOUT_S = 60.0
"""Seconds an HTTP connect or read may stall before it counts as a dropped connection (and is resumed)."""

_URL_RE = re.compile(r"(https?|s3|gs)://")
_INSTALL = {"s3": "s3fs (`pip install s3fs`, used through fsspec) or the AWS CLI (`aws` on PATH)",
            "gs": "gcsfs (`pip install gcsfs`, used through fsspec) or the Google Cloud CLI (`gcloud` or `gsutil` "
                  "on PATH)"}
# What the cloud CLIs (and cat) print for an object that does not exist: read as FileNotFoundError, so a folder
# without index.json is told apart from a failing network.
_MISSING_RE = re.compile(r"\b404\b|NoSuchKey|Not Found|does not exist|No such file|No URLs matched|"
                         r"matched no objects", re.IGNORECASE)

# (source positioned at the offset, the object's size or None, a tag that changes with its content or None)
OpenAt = Callable[[int], Tuple[Any, Optional[int], Optional[str]]]


def is_url(location: str) -> bool:
    """Whether `location` is an http(s)://, s3:// or gs:// URL."""
    return _URL_RE.match(location) is not None


def is_pipe(location: str) -> bool:
    """Whether `location` is webdataset's `pipe:CMD`: the shard is the command's standard output."""
    return location.startswith(PIPE_PREFIX)


def is_remote(location: str) -> bool:
    """Whether `location` is read through this module rather than opened as a local file."""
    return is_url(location) or is_pipe(location)


def folder_of(location: str) -> Optional[str]:
    """The dataset folder a shard lies in, where its index.json and tokenizer.json are: a local absolute path,
    a URL without query, or None for a pipe: command (whose output has no folder)."""
    if is_pipe(location):
        return None
    if is_url(location):
        parts = urllib.parse.urlsplit(location)
        return urllib.parse.urlunsplit((parts.scheme, parts.netloc, posixpath.dirname(parts.path), "", ""))
    return os.path.dirname(os.path.abspath(location))


def join(folder: str, name: str) -> str:
    """The file `name` in `folder` (a local path or a URL)."""
    return f"{folder.rstrip('/')}/{name}" if is_url(folder) else os.path.join(folder, name)


def name_of(location: str) -> str:
    """A shard's file name, as index.json lists it: the last part of a path or of a URL's path."""
    if is_url(location):
        return posixpath.basename(urllib.parse.urlsplit(location).path)
    return os.path.basename(location)


def url_path(location: str) -> str:
    """The path part of a URL (no query): what says whether it names a shard, an index or a folder."""
    return urllib.parse.urlsplit(location).path


def check_supported(location: str) -> None:
    """Raise ValueError naming `location` when it cannot be read here, and what to install; checked when the
    shards are resolved, so a missing tool stops the run at its start instead of failing every shard."""
    if is_pipe(location):
        if not location[len(PIPE_PREFIX):].strip():
            raise ValueError(f"shard location {location!r}: expected a command after 'pipe:'")
        return
    scheme = urllib.parse.urlsplit(location).scheme
    if scheme in _INSTALL and _fsspec_filesystem(scheme) is None and _cli_command(location) is None:
        raise _unsupported(location, scheme)


def _unsupported(location: str, scheme: str) -> ValueError:
    return ValueError(f"shard location {location!r}: reading {scheme}:// needs {_INSTALL[scheme]}; "
                      "neither is installed here")


def open_stream(location: str, retry_delays_s: Sequence[float]) -> BinaryIO:
    """`location` (a URL or pipe:CMD) opened for one sequential read.

    http(s) and s3/gs through fsspec resume a dropped connection at the byte reached, waiting `retry_delays_s`
    between consecutive failed tries (progress starts them afresh); once spent, the OSError names the location.
    pipe: commands and the cloud CLIs cannot start mid-object: a non-zero exit is an OSError for the caller to
    retry. An error while opening is raised at once, naming the location.
    """
    if is_pipe(location):
        return io.BufferedReader(_run(location, location[len(PIPE_PREFIX):], shell=True))
    scheme = urllib.parse.urlsplit(location).scheme
    if scheme in ("http", "https"):
        open_at = _http_open_at(location)
    else:
        filesystem = _fsspec_filesystem(scheme)
        if filesystem is None:
            command = _cli_command(location)
            if command is None:
                raise _unsupported(location, scheme)
            return io.BufferedReader(_run(location, command, shell=False))
        open_at = _fsspec_open_at(filesystem, location)
    try:
        return io.BufferedReader(_ResumingReader(location, open_at, retry_delays_s), buffer_size=1 << 16)
    except (OSError, http.client.HTTPException) as e:
        raise _naming(e, location) from e


def read_bytes(location: str, retry_delays_s: Sequence[float] = RETRY_DELAYS_S) -> bytes:
    """The whole (small) object at `location`. FileNotFoundError when it does not exist, for the caller to
    judge (a folder without index.json is normal); other OSErrors are tried again after `retry_delays_s`,
    since every rank reads it at start and one rank's network blip should not end the run."""
    for attempt in range(len(retry_delays_s) + 1):
        try:
            with open_stream(location, ()) as f:
                return f.read()
        except (FileNotFoundError, PermissionError):
            raise
        except OSError as e:
            if attempt == len(retry_delays_s):
                raise
            logger.warning("%s; reading it again in %.1f s (retry %d of %d)", e, retry_delays_s[attempt],
                           attempt + 1, len(retry_delays_s))
            time.sleep(retry_delays_s[attempt])
    raise AssertionError("unreachable")


class _Changed(OSError):
    """The object is not what the first connection read (another size or tag): resuming would splice two."""


class _ResumingReader(io.RawIOBase):
    """One object read front to back over connections that may drop. A connection error, or an end before the
    size the first connection announced, reconnects at the first byte not yet delivered, so no byte is read
    twice or lost."""

    def __init__(self, location: str, open_at: OpenAt, retry_delays_s: Sequence[float]):
        super().__init__()
        self.location, self._open_at, self._delays = location, open_at, tuple(retry_delays_s)
        self.position = 0
        self._source, self._size, self._tag = open_at(0)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        failures = 0  # consecutive tries without a byte: a read that returns resets them
        while True:
            try:
                if self._source is None:
                    self._reconnect()
                n = self._source.readinto(buffer)
                if not n and len(buffer) and self._size is not None and self.position < self._size:
                    raise ConnectionError("the connection closed early")
                self.position += n
                return n
            except (OSError, http.client.HTTPException) as e:
                self._close_source()
                if isinstance(e, (FileNotFoundError, PermissionError, _Changed)) or failures == len(self._delays):
                    raise _naming(e, self.location) from e
                delay_s = self._delays[failures]
                failures += 1
                logger.warning("%s: %s: %s at byte %d of %s; resuming there in %.1f s (retry %d of %d)",
                               self.location, type(e).__name__, e, self.position, self._size, delay_s, failures,
                               len(self._delays))
                time.sleep(delay_s)

    def _reconnect(self) -> None:
        source, size, tag = self._open_at(self.position)
        if (size, tag) != (self._size, self._tag):
            source.close()
            raise _Changed(f"{self.location} changed while being read (size {self._size} -> {size}, "
                           f"tag {self._tag} -> {tag})")
        self._source = source

    def _close_source(self) -> None:
        if self._source is not None:
            source, self._source = self._source, None
            source.close()

    def close(self) -> None:
        self._close_source()
        super().close()


def _http_open_at(url: str) -> OpenAt:
    """Opens `url` at a byte offset with a Range request; a server that ignores Range (200, the whole body)
    has the bytes before the offset read and dropped instead."""

    def open_at(offset: int) -> Tuple[http.client.HTTPResponse, Optional[int], Optional[str]]:
        request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
        try:
            response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
        except urllib.error.HTTPError as e:
            e.close()
            kind = {404: FileNotFoundError, 410: FileNotFoundError, 401: PermissionError, 403: PermissionError}
            raise kind.get(e.code, OSError)(f"{url}: HTTP {e.code} {e.reason}") from None
        except urllib.error.URLError as e:
            raise OSError(f"{url}: cannot connect ({e.reason})") from None
        tag = response.headers.get("ETag")
        if response.status == 206:
            found = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", ""))
            if found is None or int(found[1]) != offset:
                response.close()
                raise _Changed(f"{url}: asked for the bytes from {offset}, got Content-Range "
                               f"{response.headers.get('Content-Range')!r}")
            return response, None if found[2] == "*" else int(found[2]), tag
        length = response.headers.get("Content-Length")
        size = int(length) if length and length.isdigit() else None
        skipped = 0
        while skipped < offset:
            chunk = response.read(min(offset - skipped, 1 << 20))
            if not chunk:
                response.close()
                raise ConnectionError(f"the connection closed at byte {skipped} while skipping to byte {offset}")
            skipped += len(chunk)
        return response, size, tag

    return open_at


def _fsspec_filesystem(scheme: str):
    """fsspec's filesystem for s3 / gs when its backend (s3fs, gcsfs) is installed, else None."""
    try:
        import fsspec
        return fsspec.filesystem(scheme)
    except ImportError:
        return None


def _fsspec_open_at(filesystem, url: str) -> OpenAt:
    def open_at(offset: int) -> Tuple[Any, Optional[int], Optional[str]]:
        f = filesystem.open(url, "rb")
        f.seek(offset)
        return f, getattr(f, "size", None), None

    return open_at


def _cli_command(url: str) -> Optional[List[str]]:
    """The cloud CLI command that writes the object at `url` to stdout, if that CLI is on PATH."""
    if url.startswith("s3://"):
        return ["aws", "s3", "cp", url, "-"] if shutil.which("aws") else None
    if shutil.which("gcloud"):
        return ["gcloud", "storage", "cat", url]
    return ["gsutil", "cat", url] if shutil.which("gsutil") else None


def _run(location: str, command, shell: bool) -> "_PipeReader":
    stderr = tempfile.TemporaryFile()  # a file, not a pipe: a chatty command cannot block on a full pipe
    try:
        # Its own process group, so closing the stream early ends the shell's children as well.
        process = subprocess.Popen(command, shell=shell, stdout=subprocess.PIPE, stderr=stderr, bufsize=0,
                                   start_new_session=True)
    except OSError as e:
        stderr.close()
        raise OSError(f"{location}: cannot run {command!r} ({e})") from None
    return _PipeReader(location, process, stderr)


class _PipeReader(io.RawIOBase):
    """A command's standard output; at its end a non-zero exit status is an OSError naming the location with
    the end of stderr (FileNotFoundError when stderr says the object does not exist)."""

    def __init__(self, location: str, process: subprocess.Popen, stderr):
        super().__init__()
        self.location, self._process, self._stderr = location, process, stderr

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self._process.stdout.readinto(buffer)
        if not n and len(buffer):
            status = self._process.wait()
            if status:
                self._stderr.seek(0)
                said = self._stderr.read()[-2000:].decode("utf-8", "replace").strip()
                kind = FileNotFoundError if _MISSING_RE.search(said) else OSError
                raise kind(f"{self.location}: the command exited with status {status}: {said}")
        return n

    def close(self) -> None:
        if not self.closed:
            if self._process.poll() is None:  # closed before the end: nobody will read the rest
                with contextlib.suppress(ProcessLookupError):  # it may end between the poll and the kill
                    os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait()
            self._process.stdout.close()
            self._stderr.close()
        super().close()


def _naming(error: BaseException, location: str) -> OSError:
    """`error` as an OSError whose message names `location`, keeping the not-found / access-denied classes
    that callers act on."""
    if isinstance(error, OSError) and location in str(error):
        return error
    kind = next((k for k in (FileNotFoundError, PermissionError) if isinstance(error, k)), OSError)
    return kind(f"{location}: {type(error).__name__}: {error}")
