"""Reading shards: the shard list a config names, the sequential tar reader (retries on I/O errors, a marker
sample where a tar breaks), per-shard sample counts (index.json or a header scan), and the audio-tokenizer
check of the shards' folders. Local files, URLs and pipe: commands alike (data.loading.remote).
"""
from __future__ import annotations

import collections
import gzip
import io
import json
import logging
import re
import tarfile
import time
from typing import Any, Dict, Iterator, List, Optional, Tuple

from webdataset.tariterators import base_plus_ext

from data.loading import remote
from data.codes.tokenizers import audio_tokenizer_hash
from data.shards import INDEX_NAME, MissingIndexError, read_index, shard_paths
from data.codes.encode import TOKENIZER_NAME, read_tokenizer_record

logger = logging.getLogger(__name__)


def resolve_shards(patterns: List[str], key: str = "data.shards") -> List[str]:
    """Tar paths or URLs named by dataset folders, index.json files, tar paths, globs or brace patterns, or
    their URLs (data.shards.shard_paths), in order."""
    if not patterns:
        raise ValueError(f"{key} is empty: expected dataset folders, tar paths or glob patterns")
    paths = shard_paths(list(patterns))
    duplicates = sorted(p for p, n in collections.Counter(paths).items() if n > 1)
    if duplicates:
        # A repeated shard would be trained on twice per epoch and breaks the one-owner split.
        raise ValueError(f"{key} names {duplicates[0]!r} more than once; each shard must appear once")
    return paths


def check_audio_tokenizer(paths: List[str], expected: Optional[str]) -> None:
    """Refuse shards whose folder's tokenizer.json names another audio tokenizer than `expected`."""
    want = audio_tokenizer_hash(expected) if expected else None
    folders = {remote.folder_of(p) for p in paths}
    if None in folders and want is not None:
        logger.warning("pipe: shards have no folder holding a tokenizer.json: data.audio_tokenizer is not "
                       "checked against their audio codes")
    for folder in sorted(f for f in folders if f is not None):
        record = _tokenizer_record(folder)
        if record is None:
            continue  # no codes in this folder: samples that need them are skipped as "missing_codes"
        found = record["hash"]
        if want is None:
            logger.info("dataset folder %s: audio codes made by %s tokenizer %s", folder, record.get("name"), found)
        elif not found.startswith(want):
            raise ValueError(f"dataset folder {folder!r} has audio codes from tokenizer {found} "
                             f"({record.get('name')}), but data.audio_tokenizer names {want}; re-run "
                             "`python -m data.codes` on it with that tokenizer")
        elif not record.get("complete", True):
            raise ValueError(f"dataset folder {folder!r}: data.codes with tokenizer {found} has not finished "
                             "(tokenizer.json says complete=false); re-run it to tokenize the remaining shards")


def _tokenizer_record(folder: str) -> Optional[Dict[str, Any]]:
    """The folder's tokenizer.json (data.codes.encode.read_tokenizer_record), the folder a path or a URL."""
    if not remote.is_url(folder):
        return read_tokenizer_record(folder)
    url = remote.join(folder, TOKENIZER_NAME)
    try:
        record = json.loads(remote.read_bytes(url))
    except FileNotFoundError:
        return None
    except ValueError:  # invalid JSON or UTF-8: refused below, as a local file would be
        record = None
    if not isinstance(record, dict) or not isinstance(record.get("hash"), str):
        raise ValueError(f"{url} is not an audio tokenizer record: expected JSON with a 'hash' "
                         "(written by `python -m data.codes`)")
    return record


IO_RETRY_DELAYS_S: Tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
"""Seconds to wait before each re-open of a shard after an OSError while opening or reading it (a file
briefly missing, a network filesystem's hiccup): len() retries, 7.5 s in all. A re-open skips the samples
already delivered, so none comes out twice or is lost. When they are spent, the rest of that shard is
skipped for the epoch and counted once as "io_error" (named like a "bad_shard"), with the path and the
error logged: as with bad input, one shard's fault does not stop the run, and the metrics say it happened.
A corrupt tar (tarfile's errors, EOFError) is not retried: it would fail the same way again. A URL's stream
resumes a dropped connection at the byte reached on its own (data.loading.remote, the same waits), so only a fault
that outlasts those resumes comes here."""


def open_shard(path: str):
    """The shard opened for reading: a local file, or a URL's or pipe: command's stream (data.loading.remote); the one
    place the loader opens shards (tests inject faults here)."""
    if remote.is_remote(path):
        return remote.open_stream(path, IO_RETRY_DELAYS_S)
    return open(path, "rb")


def _is_transient(error: BaseException) -> bool:
    """Whether a read error may go away on a re-open: an OSError that is not a corrupt gzip stream or a
    file object that cannot do what tarfile asks."""
    return isinstance(error, OSError) and not isinstance(error, (gzip.BadGzipFile, io.UnsupportedOperation))


def read_shard(path: str) -> Iterator[Dict[str, Any]]:
    """Raw samples of one tar ({"__key__", "flac", "json", ...} bytes), members grouped by key in file order.

    A read error (a tar cut off, corrupt blocks) ends the shard with one marker sample named after the
    key being read; every sample completed before it still comes out. An OSError re-opens the file after
    the waits of IO_RETRY_DELAYS_S and goes on after the samples already delivered; once they are spent,
    the marker's "__reason__" is "io_error" instead of "bad_shard".

    Our own reader, not webdataset's (data.shards.read_samples, which the commands use): it groups members the
    same way (webdataset's base_plus_ext, `__name__` members skipped) but must also count the samples completed
    in each pass to resume after them without reading their members, hold back the sample being read when the
    tar breaks, and name it in the marker; webdataset's reader can only raise or drop the rest of the shard.
    """
    delivered, failures = 0, 0
    reading = None  # the key of the first sample not delivered yet, once seen: what a marker names
    while True:
        key, sample, completed = None, None, 0  # completed: samples finished in this pass of the file
        try:
            with open_shard(path) as f, tarfile.open(fileobj=f, mode="r|*") as tar:  # one sequential pass
                for info in tar:
                    if not info.isreg() or _META_MEMBER.match(info.name):
                        continue
                    prefix, ext = base_plus_ext(info.name)
                    if prefix is None:
                        continue
                    if prefix != key:
                        if sample is not None:
                            completed += 1
                            if completed > delivered:
                                delivered, failures = delivered + 1, 0  # progress: the retries start afresh
                                yield sample
                        key, sample = prefix, {"__key__": prefix, "__url__": path}
                        if completed >= delivered:
                            reading = prefix
                    if completed >= delivered:  # members of samples delivered before a re-open are not read
                        sample[ext.lower()] = tar.extractfile(info).read()
            if sample is not None and completed >= delivered:
                yield sample
            return
        except Exception as e:  # a truncated or corrupt tar must not stop training
            error = f"{type(e).__name__}: {e}"
            if _is_transient(e) and failures < len(IO_RETRY_DELAYS_S):
                delay_s = IO_RETRY_DELAYS_S[failures]
                failures += 1
                logger.warning("shard %s: %s after %d samples; re-opening it in %.1f s (retry %d of %d)",
                               path, error, delivered, delay_s, failures, len(IO_RETRY_DELAYS_S))
                time.sleep(delay_s)
                continue
            if _is_transient(e):
                reason = "io_error"
                logger.warning("shard %s: %s persists after %d retries; its rest from sample %s on is skipped "
                               "(io_error)", path, error, failures, reading)
            else:
                reason = "bad_shard"
                logger.warning("shard %s is unreadable from sample %s on (%s); its rest is skipped", path, reading,
                               error)
            # The sample being read when it broke may be incomplete: it becomes the marker.
            yield {"__key__": reading or "<unreadable shard>", "__url__": path, "__error__": error,
                   "__reason__": reason}
            return


_META_MEMBER = re.compile(r"__[^/]*__($|/)")  # what webdataset's tar iterator leaves out


def scan_sample_count(path: str) -> int:
    """Samples in a tar without index.json, from its headers alone, grouped the way read_shard groups them.

    A corrupt tar counts the samples before the damage, the same on every rank. An OSError is retried as
    read_shard does; if it persists this raises, because a count that differs between ranks would give
    them overlapping shares of the epoch. A URL or pipe: stream cannot seek past the members' data, so it is
    read whole (a folder's index.json spares that). Not webdataset's reader: that reads every member's data,
    where the headers are enough.
    """
    mode = "r|*" if remote.is_remote(path) else "r:*"
    for attempt in range(len(IO_RETRY_DELAYS_S) + 1):
        num_samples, key = 0, None
        try:
            with open_shard(path) as f, tarfile.open(fileobj=f, mode=mode) as tar:
                for info in tar:
                    if not info.isreg() or _META_MEMBER.match(info.name):
                        continue
                    prefix, _ = base_plus_ext(info.name)
                    if prefix is not None and prefix != key:
                        num_samples, key = num_samples + 1, prefix
            return num_samples
        except (tarfile.TarError, EOFError, OSError) as e:
            if not _is_transient(e):
                logger.warning("shard %s: counting its samples stopped at %d (%s)", path, num_samples, e)
                return num_samples
            if attempt == len(IO_RETRY_DELAYS_S):
                raise OSError(f"shard {path}: counting its samples failed {attempt + 1} times "
                              f"({type(e).__name__}: {e}); every rank needs the same count, so the loader "
                              "cannot start") from e
            logger.warning("shard %s: %s: %s while counting its samples; retrying in %.1f s", path,
                           type(e).__name__, e, IO_RETRY_DELAYS_S[attempt])
            time.sleep(IO_RETRY_DELAYS_S[attempt])
    raise AssertionError("unreachable")


def _index_counts(folder: str) -> Dict[str, int]:
    """Samples per shard name from `folder`'s index.json (a path or a URL); {} without one. A damaged index
    is warned about, naming the file and what is wrong, and its shards are counted from their headers instead."""
    path = remote.join(folder, INDEX_NAME)
    try:
        shards = read_index(folder)["shards"]
    except MissingIndexError:
        return {}  # bare tars: counting them is the normal way
    except ValueError as e:
        # read_index's messages start with the file's path.
        logger.warning("%s; the samples of its folder's shards are counted from their tar headers instead", e)
        return {}
    counts, bad = {}, []
    for s in shards:
        n = s.get("num_samples")
        if isinstance(n, int) and not isinstance(n, bool) and n >= 0:
            counts[s["name"]] = n
        else:
            bad.append(f"{s['name']}: num_samples={n!r}")
    if bad:
        logger.warning("%s: %d shard(s) without a valid sample count (%s%s); they are counted from their tar "
                       "headers instead", path, len(bad), "; ".join(bad[:3]), "; ..." if len(bad) > 3 else "")
    return counts


def shard_counts(paths: List[str]) -> List[int]:
    """Samples per shard: from its folder's index.json where that lists it, else one scan of its headers.

    A corrupt index.json (invalid JSON, missing fields, a bad num_samples) is warned about and its shards
    scanned rather than refused: the scan reads the tar itself, so every rank gets the same counts and
    equal shares stay equal. (A dataset folder named as the spec still needs a readable index: it is the
    list of shards, see data.shards.shard_paths.) A pipe: command has no folder: its output is scanned.
    """
    by_folder: Dict[str, Dict[str, int]] = {}
    out = []
    for path in paths:
        folder = remote.folder_of(path)
        if folder is not None and folder not in by_folder:
            by_folder[folder] = _index_counts(folder)
        known = by_folder[folder].get(remote.name_of(path)) if folder is not None else None
        out.append(known if known is not None else scan_sample_count(path))
    return out
