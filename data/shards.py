"""The on-disk shard format shared by every writer and reader: reproducible WebDataset tars, index.json.

A dataset folder holds shard-000000.tar, ... and index.json (counts, durations, checksums, rejects);
see `ShardWriter`, `read_index` and `shard_paths`. Writers write local folders; readers also take the
folder or its shards as URLs or pipe: commands (data.loading.remote), except the commands that open shards as
files, which take `local_shard_paths`.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
from typing import BinaryIO, Collection, Dict, Iterator, Mapping, Optional, Sequence, Tuple, Union

import braceexpand
from webdataset.tariterators import group_by_keys, tar_file_iterator
from webdataset.writer import TarWriter

from data.loading import remote
from data.files import atomic_path, atomic_write

INDEX_NAME = "index.json"
INDEX_FORMAT = 1
SHARD_PATTERN = "shard-%06d.tar"
_SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")  # a URL ending so names a shard; any other names a dataset folder
# WebDataset splits a member name at its first dot into key and extension; a slash would make a folder.
_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
_EXT_RE = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")


def is_valid_key(key: str) -> bool:
    """Whether `key` can name a sample: letters, digits, '_' and '-', not starting with '_' or '-'."""
    return isinstance(key, str) and _KEY_RE.fullmatch(key) is not None


def sanitize_key(text: str) -> str:
    """`text` made into a valid sample key: every other character becomes '_'."""
    key = re.sub(r"[^A-Za-z0-9_-]", "_", text)
    return key if is_valid_key(key) else f"k{key}"


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tar_writer(fileobj: BinaryIO) -> TarWriter:
    """webdataset's TarWriter on an open file, with no time, owner or permissions of this machine in the tar
    headers, so the same samples always give byte-identical tars; write samples with `write_sample`."""
    return TarWriter(fileobj, user="", group="", mode=0o444, mtime=0, encoder=False, keep_meta=True)


def write_sample(tar: TarWriter, key: str, members: Mapping[str, bytes]) -> None:
    """Adds one sample's members ({ext: bytes}) as KEY.EXT, in the order given."""
    for ext, data in members.items():
        # One member a call: TarWriter puts a sample's members in name order, and shards keep the order their
        # writer gives, so they stay byte-identical to the shards written before (whose checksums index.json,
        # prepare_state.json and tokenize_state.json hold).
        tar.write({"__key__": key, ext: data})


def read_samples(path: str, exts: Optional[Collection[str]] = None) -> Iterator[Tuple[str, Dict[str, bytes]]]:
    """(key, {ext: bytes}) of each sample of the local tar at `path`, in file order: webdataset's reader, which
    groups consecutive members by the name up to the first dot of its last part (folders stay in the key), skips
    `__name__` members, and raises ValueError on a member repeated within a sample. With `exts`, only those
    members are kept (a sample with none of them still comes out, empty).

    The loader reads shards with data.loading.shard_reader.read_shard instead, which does more: it retries I/O errors
    and resumes after the samples already delivered, and ends a broken tar with a marker sample."""
    with open(path, "rb") as f:
        files = ({**member, "__url__": path} for member in tar_file_iterator(f))
        for sample in group_by_keys(files, lcase=False, suffixes=set(exts) if exts is not None else None):
            key = sample.pop("__key__")
            del sample["__url__"]
            yield key, sample


class ShardWriter:
    """Writes samples into OUT_DIR/shard-%06d.tar, at most `max_samples` per shard.

    Tar headers carry no time, owner or permissions of this machine, so the same samples always give
    byte-identical shards. A shard is written under a temporary name and renamed when complete.
    `close()` returns one stats dict per shard: name, num_samples, duration_s, sha256. Numbering starts
    at `first_index`, so a resumed preparation can write shard 7 without rewriting 0..6.
    """

    def __init__(self, out_dir: str, max_samples: int = 1000, first_index: int = 0):
        if max_samples < 1:
            raise ValueError(f"shard size must be at least 1 sample, got {max_samples}")
        self.out_dir = out_dir
        self.max_samples = max_samples
        self.first_index = first_index
        self.shards: list[dict] = []
        self._tar: Optional[TarWriter] = None
        self._open: Optional[contextlib.ExitStack] = None  # the open shard: its temporary, file and tar
        os.makedirs(out_dir, exist_ok=True)

    def write(self, key: str, members: dict[str, bytes], duration_s: float = 0.0) -> Optional[dict]:
        """Add one sample: `members` maps an extension ("flac", "json", "codes.npy") to its bytes.

        Returns the stats of the shard this sample completed, else None.
        """
        if not is_valid_key(key):
            raise ValueError(f"sample key {key!r} is invalid: expected letters, digits, '_' or '-' "
                             "(no dots, no slashes)")
        bad = [ext for ext in members if not _EXT_RE.fullmatch(ext)]
        if bad or not members:
            raise ValueError(f"sample {key!r}: member extensions {bad or '(none)'} are invalid")
        if self._tar is None:
            self._open_next()
        write_sample(self._tar, key, members)
        stats = self.shards[-1]
        stats["num_samples"] += 1
        stats["duration_s"] += duration_s
        if stats["num_samples"] >= self.max_samples:
            self._finish()
            return stats
        return None

    def close(self) -> list[dict]:
        if self._tar is not None:
            self._finish()
        return self.shards

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._open is not None:
            self._open.__exit__(exc_type, exc, tb)  # the unfinished shard's temporary is removed

    def _open_next(self) -> None:
        name = SHARD_PATTERN % (self.first_index + len(self.shards))
        with contextlib.ExitStack() as stack:
            tmp_path = stack.enter_context(atomic_path(os.path.join(self.out_dir, name)))
            self._tar = stack.enter_context(tar_writer(stack.enter_context(open(tmp_path, "wb"))))
            self._open = stack.pop_all()  # closed (and renamed) by _finish, or discarded by __exit__
        self.shards.append({"name": name, "num_samples": 0, "duration_s": 0.0, "sha256": ""})

    def _finish(self) -> None:
        self._open.close()  # the tar, its file, then the rename to the shard's name
        self._tar, self._open = None, None
        self.shards[-1]["duration_s"] = round(self.shards[-1]["duration_s"], 6)  # no float-sum noise
        self.shards[-1]["sha256"] = file_sha256(os.path.join(self.out_dir, self.shards[-1]["name"]))


def write_index(out_dir: str, index: dict) -> str:
    """Write index.json last and atomically, so a folder with an index always has complete shards."""
    path = os.path.join(out_dir, INDEX_NAME)
    atomic_write(path, json.dumps(index, indent=1, ensure_ascii=False) + "\n")
    return path


class MissingIndexError(ValueError):
    """A dataset folder without index.json: an error where the folder is what names the shards, the normal
    case where shards named one by one are counted from their tar headers."""


def read_index(out_dir: str) -> dict:
    """The index.json of a prepared dataset folder (a local path or a URL), checked for the fields readers
    rely on."""
    path = remote.join(out_dir, INDEX_NAME)
    try:
        index = json.loads(_read_index_text(out_dir, path))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        found = index.get("format") if isinstance(index, dict) else type(index).__name__
        raise ValueError(f"{path}: format is {found!r}, expected {INDEX_FORMAT}")
    shards = index.get("shards")
    if not isinstance(shards, list) or not all(isinstance(s, dict) and "name" in s for s in shards):
        raise ValueError(f"{path}: 'shards' must be a list of {{'name': ..., ...}}, got {shards!r:.200}")
    return index


def _read_index_text(out_dir: str, path: str) -> str:
    missing = MissingIndexError(f"dataset folder {out_dir!r} has no {INDEX_NAME}: expected the output of "
                                "`python -m data.corpus.prepare`")
    if remote.is_url(out_dir):
        try:
            return remote.read_bytes(path).decode("utf-8")
        except FileNotFoundError:
            raise missing from None
    if not os.path.isfile(path):
        raise missing
    with open(path, encoding="utf-8") as f:
        return f.read()


def shard_paths(spec: Union[str, Sequence[str]]) -> list[str]:
    """Shard files named by `spec`: a dataset folder (its index.json), an index.json, a tar file,
    a glob ("data/*/shard-*.tar"), a brace pattern ("shard-{000000..000009}.tar") or a list of these;
    also a URL or pipe: command naming a folder or shards (see _remote_shard_paths).
    """
    if not isinstance(spec, str):
        paths = [path for item in spec for path in shard_paths(item)]
        if not paths:
            raise ValueError(f"shard spec {spec!r} names no shards")
        return paths
    if remote.is_remote(spec):
        return _remote_shard_paths(spec)
    if os.path.isdir(spec) or os.path.basename(spec) == INDEX_NAME:
        folder = spec if os.path.isdir(spec) else os.path.dirname(spec)
        paths = [os.path.join(folder, shard["name"]) for shard in read_index(folder)["shards"]]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise ValueError(f"shard spec {spec!r}: index lists {missing[0]!r}, which does not exist")
        if not paths:
            raise ValueError(f"shard spec {spec!r}: the index lists no shards")
        return paths
    paths = []
    for pattern in braceexpand.braceexpand(spec):
        matches = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
        matches = [p for p in matches if os.path.isfile(p)]
        if not matches:
            raise ValueError(f"shard spec {spec!r}: nothing matches {pattern!r}")
        paths.extend(matches)
    return paths


def local_shard_paths(spec: Union[str, Sequence[str]], command: str,
                      why: str = "reads its shards as local files") -> list[str]:
    """shard_paths for a command that needs its shards on this machine (it writes beside them, or opens them
    as files): a URL or pipe: spec is refused before any work, naming it, rather than failing later on a
    path that does not exist. `command` and `why` start the message ("data.codes writes next to its
    shards")."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    for item in specs:
        if remote.is_remote(item):
            raise ValueError(f"{command} {why}: {item} is not a local folder or file; copy the shards to a local "
                             "folder first (training and evaluation read shards at URLs through the loader)")
    return shard_paths(specs)


def _remote_shard_paths(spec: str) -> list[str]:
    """Shards named by a URL or pipe: spec, brace patterns expanded as webdataset expands them.

    A URL has no listing to glob: one whose path ends in .tar (.tar.gz, .tgz) is a shard, one ending in
    index.json is that index, any other is a dataset folder whose index.json lists the shards. Each pipe:
    command is one shard. The listed shards are not checked for existence (a request per shard at every
    start): a missing one fails when read, as a local file deleted after the start does.
    """
    paths = []
    for location in braceexpand.braceexpand(spec):
        remote.check_supported(location)
        if remote.is_pipe(location):
            paths.append(location)
            continue
        path = remote.url_path(location)
        if any(c in path for c in "*?["):
            raise ValueError(f"shard spec {spec!r}: a URL cannot be globbed (there is no listing); name its "
                             f"dataset folder (its {INDEX_NAME} lists the shards) or use a brace pattern "
                             "(shard-{000000..000009}.tar)")
        if path.endswith(_SHARD_SUFFIXES):
            paths.append(location)
            continue
        folder = remote.folder_of(location) if path.endswith("/" + INDEX_NAME) else location.rstrip("/")
        listed = [remote.join(folder, shard["name"]) for shard in read_index(folder)["shards"]]
        if not listed:
            raise ValueError(f"shard spec {spec!r}: the index lists no shards")
        paths.extend(listed)
    return paths
