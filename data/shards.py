"""The on-disk shard format shared by every writer and reader: reproducible WebDataset tars, index.json.

A dataset folder holds shard-000000.tar, ... and index.json (counts, durations, checksums, rejects);
see `ShardWriter`, `read_index` and `shard_paths`. Writers write local folders; readers also take the
folder or its shards as URLs or pipe: commands (data.remote), except the commands that open shards as
files, which take `local_shard_paths`.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import re
import tarfile
from typing import Optional, Sequence, Union

import braceexpand

from data import remote

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
        self._tar: tarfile.TarFile | None = None
        self._tmp_path = ""
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
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = 0, 0o444, 0, 0, "", ""
            self._tar.addfile(info, io.BytesIO(data))
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
        elif self._tar is not None:
            self._tar.close()
            os.remove(self._tmp_path)

    def _open_next(self) -> None:
        name = SHARD_PATTERN % (self.first_index + len(self.shards))
        self._tmp_path = os.path.join(self.out_dir, name + ".tmp")
        self._tar = tarfile.open(self._tmp_path, "w", format=tarfile.PAX_FORMAT)
        self.shards.append({"name": name, "num_samples": 0, "duration_s": 0.0, "sha256": ""})

    def _finish(self) -> None:
        self._tar.close()
        self._tar = None
        self.shards[-1]["duration_s"] = round(self.shards[-1]["duration_s"], 6)  # no float-sum noise
        path = os.path.join(self.out_dir, self.shards[-1]["name"])
        os.replace(self._tmp_path, path)
        self.shards[-1]["sha256"] = file_sha256(path)


def write_index(out_dir: str, index: dict) -> str:
    """Write index.json last and atomically, so a folder with an index always has complete shards."""
    path = os.path.join(out_dir, INDEX_NAME)
    tmp_path = path + ".tmp"
    with open(tmp_path, "w", encoding="utf-8") as f:
        json.dump(index, f, indent=1, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp_path, path)
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
                                "`python -m data.prepare`")
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
    path that does not exist. `command` and `why` start the message ("data.tokenize writes next to its
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
