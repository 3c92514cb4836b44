"""Corpus readers for data.prepare: a JSONL manifest, a Kaldi data folder, a folder of audio files with
transcripts, a Hugging Face dataset (save_to_disk folder or parquet) -> one list of candidate samples.

Readers only look at text and file names; audio is decoded later, in data.prepare's worker processes.
A problem with one sample is a Reject with a reason; a problem with the whole corpus is a PrepareError.
"""
from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from data.shards import is_valid_key, sanitize_key
from data.tasks import TASKS
from data.tasks.text import TEXT_TASK


class PrepareError(ValueError):
    """The corpus as a whole cannot be prepared (unreadable manifest, missing column, no usable sample)."""


@dataclass
class Blob:
    """Audio held by a dataset rather than a file: `read()` gives its bytes, or a file path to read."""
    identity: str  # changes whenever the audio may have changed (dataset files' size and mtime, row)
    read: Callable[[], Union[bytes, str]]


AudioRef = Union[str, Blob]  # a str is a file path


@dataclass
class Reject:
    order: int  # position in the corpus's own order; the index lists rejects in this order
    where: Dict[str, Any]  # {"line": 3}, {"utt": "u1"}, {"file": "spk/a.wav"} or {"row": 7}
    audio: Optional[str]
    reason: str
    kind: str  # the reason without its details, for the summary line

    def to_json(self) -> dict:
        return {**self.where, "audio": self.audio, "reason": self.reason}


@dataclass
class Candidate:
    order: int
    where: Dict[str, Any]
    key: str
    record: dict  # metadata that goes into the sample's .json (text, speaker, language, ...)
    source: str  # the audio as the corpus names it: stored as "source", shown in rejects
    audio: AudioRef
    target_source: Optional[str] = None  # optional second audio (TTS / S2ST target speech)
    target: Optional[AudioRef] = None
    # A sample of any number of audio members (a conversation: "turn1.flac", ...), member -> (source,
    # AudioRef); when set, `audio` and `target` are unused and the sample may hold no audio at all.
    members: Optional[Dict[str, Tuple[str, AudioRef]]] = None


@dataclass
class Corpus:
    kind: str  # "manifest", "kaldi", "folder", "hf", "conversations" or "preferences"
    source: str  # the path the user gave
    candidates: List[Candidate]
    rejects: List[Reject]
    identity: str = ""  # what else defines the samples (options, dataset files), for resuming
    unit: str = "sample"  # what one candidate is called in messages ("line", "utterance", ...)


def describe(where: Dict[str, Any]) -> str:
    """'line 3', "utterance 'u1'", "file 'spk/a.wav'", 'row 7': where a sample is in its corpus."""
    (name, value), = where.items()
    if isinstance(value, int):
        return f"{name} {value}"
    return f"{'utterance' if name == 'utt' else name} {value!r}"


def _file_key(record: dict, fallback: str) -> str:
    given = record.get("id")
    if isinstance(given, int) and not isinstance(given, bool):
        given = str(given)
    return given if is_valid_key(given) else sanitize_key(fallback)


_BOM = b"\xef\xbb\xbf"


class _BadLine(Exception):
    """One line of a file is unusable: `kind` for the summary, str() the reject reason."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind


def _raw_lines(path: str) -> List[bytes]:
    """The file's lines as bytes, split on "\n" only (a "\r" before it and a UTF-8 BOM are dropped):
    str.splitlines would also split inside a JSON string at U+2028, U+0085, form feeds, ..."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise PrepareError(f"cannot read {path!r}: {exc}") from None
    lines = data[len(_BOM):].split(b"\n") if data.startswith(_BOM) else data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    return [line[:-1] if line.endswith(b"\r") else line for line in lines]


def _decode_line(line: bytes) -> str:
    """The line as text; _BadLine naming the offset of the first byte that is not UTF-8."""
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _BadLine("invalid UTF-8", f"not valid UTF-8 at byte {exc.start}") from None


def _read_lines(path: str) -> List[str]:
    """Every line of a text file (Kaldi tables); PrepareError naming the first line that is not UTF-8."""
    out = []
    for line_no, line in enumerate(_raw_lines(path), start=1):
        try:
            out.append(_decode_line(line))
        except _BadLine as bad:
            raise PrepareError(f"cannot read {path!r}: line {line_no} is {bad}") from None
    return out


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON (Python's extension; write null or a string)")


def _parse_object(line: bytes) -> dict:
    """One JSONL line as an object; _BadLine with the reason for every way a line can be unusable."""
    text = _decode_line(line)
    try:
        record = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise _BadLine("invalid JSON", "invalid JSON: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, NaN / Infinity, an integer over Python's digit limit
        raise _BadLine("invalid JSON", f"invalid JSON: {exc}") from None
    if not isinstance(record, dict):
        raise _BadLine("invalid JSON", f"invalid JSON: expected an object, got {type(record).__name__}")
    try:  # a "\\ud800" escape decodes to a lone surrogate, which no shard's UTF-8 .json can hold
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _BadLine("invalid UTF-8", f"a string holds the lone surrogate "
                                        f"{exc.object[exc.start:exc.end]!r}: not encodable as UTF-8") from None
    return record


def read_jsonl(path: str) -> Tuple[List[Tuple[int, dict]], List[Reject]]:
    """([(line number, object)] of a JSONL file's usable lines, a Reject for each other non-blank line).

    A line is rejected, never the file, when it is not UTF-8 ("not valid UTF-8 at byte N", N counted
    from the line's start, 0 first), not JSON, not an object, or holds a string UTF-8 cannot encode.
    """
    records, rejects = [], []
    for line_no, line in enumerate(_raw_lines(path), start=1):
        if not line.strip():
            continue
        try:
            records.append((line_no, _parse_object(line)))
        except _BadLine as bad:
            rejects.append(Reject(line_no, {"line": line_no}, None, str(bad), bad.kind))
    return records, rejects


# ------------------------------------------------------------------------------------------ manifest

def read_manifest(manifest: str) -> Corpus:
    """JSONL lines of {"audio": path, "text": str, ...}, optional "target_audio": path; relative paths
    resolve against the manifest's folder. Every other field is kept as metadata. A line of task "text"
    may have no "audio": it becomes a sample of its .json alone (plain text for the LM)."""
    base_dir = os.path.dirname(os.path.abspath(manifest))
    lines, rejects = read_jsonl(manifest)
    candidates = []
    for line_no, record in lines:
        where = {"line": line_no}
        audio = record.get("audio")
        task = record.get("task")
        text_only = "audio" not in record and task == TEXT_TASK
        problem = next((f"missing field {name!r}" for name in ("audio", "text")
                        if name not in record and not (name == "audio" and text_only)), None)
        if problem == "missing field 'audio'":
            problem += f" (only a line of task {TEXT_TASK!r} may have no audio)"
        problem = problem or next((f"field {name!r} must be a string, got {type(record[name]).__name__}"
                                   for name in ("audio", "text", "target_audio")
                                   if name in record and not isinstance(record[name], str)), None)
        if problem:
            kind = "missing field" if problem.startswith("missing") else "wrong type"
            rejects.append(Reject(line_no, where, audio if isinstance(audio, str) else None, problem, kind))
            continue
        if "task" in record and not (isinstance(task, str) and task in TASKS):
            rejects.append(Reject(line_no, where, audio, f"field 'task' is {task!r}: expected one of "
                                                         f"{sorted(TASKS)}", "unknown task"))
            continue
        if text_only:  # no audio member at all; data.prepare writes just the .json
            candidates.append(Candidate(line_no, where, _file_key(record, f"text-{line_no:08d}"), record, "", "",
                                        members={}))
            continue
        target = record.get("target_audio")
        stem = os.path.splitext(os.path.basename(audio))[0]
        meta = {k: v for k, v in record.items() if k not in ("audio", "target_audio")}
        candidates.append(Candidate(
            line_no, where, _file_key(record, f"{stem}-{line_no:08d}"), meta, audio,
            os.path.join(base_dir, os.path.expanduser(audio)), target,
            None if target is None else os.path.join(base_dir, os.path.expanduser(target))))
    rejects.sort(key=lambda r: r.order)
    return Corpus("manifest", manifest, candidates, rejects, unit="line")


# --------------------------------------------------------------------------------------------- kaldi

def _kaldi_table(path: str, required: bool) -> Dict[str, tuple]:
    """{utt: (rest of line, line number)} of a Kaldi table file; repeated ids keep the first line."""
    if not os.path.isfile(path):
        if required:
            raise PrepareError(f"Kaldi data folder has no {os.path.basename(path)}: expected {path!r}")
        return {}
    table: Dict[str, tuple] = {}
    for line_no, line in enumerate(_read_lines(path), start=1):
        parts = line.strip().split(maxsplit=1)
        if parts:
            table.setdefault(parts[0], (parts[1] if len(parts) > 1 else "", line_no))
    return table


def read_kaldi(data_dir: str, root: Optional[str] = None) -> Corpus:
    """A Kaldi data folder: wav.scp and text, optional utt2spk and utt2lang.

    Relative paths in wav.scp resolve against `root` (default: the current directory, as Kaldi's own
    tools do). A piped command in wav.scp is rejected, never run: preparing data must not execute
    whatever a downloaded corpus says.
    """
    if os.path.exists(os.path.join(data_dir, "segments")):
        raise PrepareError(f"{os.path.join(data_dir, 'segments')}: Kaldi segments are not supported; "
                           "cut the recordings into one file per utterance first")
    wav_path = os.path.join(data_dir, "wav.scp")
    if not os.path.isfile(wav_path):
        raise PrepareError(f"Kaldi data folder has no wav.scp: expected {wav_path!r}")
    wav_lines = _read_lines(wav_path)
    texts = _kaldi_table(os.path.join(data_dir, "text"), required=True)
    speakers = _kaldi_table(os.path.join(data_dir, "utt2spk"), required=False)
    languages = _kaldi_table(os.path.join(data_dir, "utt2lang"), required=False)
    seen_line: Dict[str, int] = {}
    candidates, rejects = [], []
    for order, line in enumerate(wav_lines):
        parts = line.strip().split(maxsplit=1)
        if not parts:
            continue
        utt, audio = parts[0], (parts[1].strip() if len(parts) > 1 else "")
        where = {"utt": utt}
        if utt in seen_line:
            rejects.append(Reject(order, where, audio or None, f"utterance id repeated in wav.scp (line "
                                  f"{order + 1}, first on line {seen_line[utt]})", "repeated utterance"))
            continue
        seen_line[utt] = order + 1
        problem = None
        if not audio:
            problem = ("no audio path in wav.scp", "no audio path")
        elif audio.endswith("|"):
            problem = ("piped command in wav.scp is not executed", "piped command")
        elif utt not in texts:
            problem = ("no transcript in text", "no transcript")
        if problem:
            rejects.append(Reject(order, where, audio or None, *problem))
            continue
        record = {"id": utt, "text": texts[utt][0]}
        if utt in speakers:
            record["speaker"] = speakers[utt][0]
        if utt in languages:
            record["language"] = languages[utt][0]
        path = os.path.join(root or os.getcwd(), os.path.expanduser(audio))
        candidates.append(Candidate(order, where, _file_key(record, utt), record, audio, path))
    for utt, (_, line_no) in texts.items():
        if utt not in seen_line:
            rejects.append(Reject(len(wav_lines) + line_no, {"utt": utt}, None, "no audio in wav.scp",
                                  "no audio"))
    return Corpus("kaldi", data_dir, candidates, rejects, identity=f"root={root or os.getcwd()}",
                  unit="utterance")


# -------------------------------------------------------------------------------------------- folder

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")
TRANSCRIPT_EXTENSIONS = (".txt", ".lab")


def read_folder(root: str) -> Corpus:
    """Every audio file under `root` (recursively, sorted) with a .txt or .lab transcript of the same
    stem beside it; the speaker is the name of the folder holding the file."""
    if not os.path.isdir(root):
        raise PrepareError(f"audio folder {root!r} does not exist")
    audio_files = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        audio_files += [os.path.join(folder, f) for f in sorted(files)
                        if f.lower().endswith(AUDIO_EXTENSIONS) and not f.startswith(".")]
    candidates, rejects = [], []
    for order, path in enumerate(audio_files):
        rel = os.path.relpath(path, root).replace(os.sep, "/")
        where = {"file": rel}
        stem = os.path.splitext(path)[0]
        transcript = next((stem + ext for ext in TRANSCRIPT_EXTENSIONS if os.path.isfile(stem + ext)), None)
        if transcript is None:
            names = " or ".join(os.path.basename(stem) + ext for ext in TRANSCRIPT_EXTENSIONS)
            rejects.append(Reject(order, where, rel, f"no transcript: expected {names} beside it",
                                  "no transcript"))
            continue
        try:
            with open(transcript, encoding="utf-8") as f:
                text = " ".join(f.read().split())
        except (OSError, UnicodeDecodeError) as exc:
            rejects.append(Reject(order, where, rel, f"unreadable transcript {transcript}: {exc}",
                                  "unreadable transcript"))
            continue
        if not text:
            rejects.append(Reject(order, where, rel, f"empty transcript {transcript}", "empty transcript"))
            continue
        speaker = os.path.basename(os.path.dirname(os.path.abspath(path)))
        candidates.append(Candidate(order, where, sanitize_key(os.path.splitext(rel)[0]),
                                    {"text": text, "speaker": speaker}, rel, path))
    return Corpus("folder", root, candidates, rejects, unit="audio file")


# ------------------------------------------------------------------------------------ Hugging Face

_SPLIT_NAMES = ("train", "validation", "valid", "dev", "test")
_ROWS_PER_READ = 64  # audio cells are read in blocks: one parquet row group read serves many rows


def _files_identity(paths: List[str]) -> str:
    return ";".join(f"{p}:{os.path.getsize(p)}:{os.stat(p).st_mtime_ns}" for p in sorted(paths))


def _parquet_files(path: str, split: str) -> List[str]:
    if os.path.isfile(path):
        return [path]
    files = sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True)) if os.path.isdir(path) \
        else sorted(glob.glob(path, recursive=True))
    if not files:
        raise PrepareError(f"{path!r} is neither a datasets save_to_disk folder nor parquet file(s)")

    def words(p: str) -> List[str]:
        return re.split(r"[/\\._-]", os.path.relpath(p, path) if os.path.isdir(path) else os.path.basename(p))

    chosen = [p for p in files if split in words(p)]
    if chosen:
        return chosen
    if any(name in words(p) for p in files for name in _SPLIT_NAMES):
        raise PrepareError(f"no parquet file of split {split!r} under {path!r}; files: "
                           f"{[os.path.relpath(p, path) for p in files][:5]}")
    return files  # files that name no split at all are all one split


class _Table:
    """Columns of a Hugging Face dataset: metadata read whole, audio cells read in row blocks on demand."""

    def __init__(self, path: str, split: str):
        import pyarrow.compute as pc
        if os.path.isdir(path) and any(os.path.isfile(os.path.join(path, name))
                                       for name in ("dataset_dict.json", "state.json")):
            try:
                import datasets  # only save_to_disk folders need it; parquet is read by pyarrow alone
            except ImportError:
                raise PrepareError(f"{path!r} is a Hugging Face datasets folder: pip install datasets") from None
            ds = datasets.load_from_disk(path)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise PrepareError(f"dataset {path!r} has no split {split!r}; splits: {sorted(ds)}")
                ds = ds[split]
            # The arrow view is memory-mapped and never decodes audio (which would need torchcodec).
            table = ds.with_format("arrow")[:]
            self.base_dir, self.files = path, [c["filename"] for c in ds.cache_files]
            self.num_rows, self.schema = table.num_rows, table.schema
            self._read = lambda cols: table.select(cols)
            self._take = lambda col, start, stop: table.column(col).slice(start, stop - start)
            self._path = lambda col: pc.struct_field(table.column(col), "path")
        else:
            import pyarrow.dataset as pads
            self.files = _parquet_files(path, split)
            self.base_dir = os.path.dirname(self.files[0])
            dataset = pads.dataset(self.files, format="parquet")
            self.num_rows, self.schema = dataset.count_rows(), dataset.schema
            self._read = lambda cols: dataset.to_table(columns=cols)
            self._take = lambda col, start, stop: dataset.take(list(range(start, stop)), columns=[col]).column(0)
            # A projection of the struct's path field reads no audio bytes.
            self._path = lambda col: dataset.to_table(columns={"path": pc.field(col, "path")}).column(0)
        self._blocks: Dict[str, tuple] = {}  # column -> (first row, cells) of the last block read

    def column(self, name: str) -> list:
        return self._read([name]).column(0).to_pylist()

    def paths(self, name: str) -> list:
        """The file name stored with each audio cell (None where there is none), without reading audio."""
        import pyarrow as pa
        kind = self.schema.field(name).type
        if pa.types.is_struct(kind):
            has_path = any(kind.field(i).name == "path" for i in range(kind.num_fields))
            return self._path(name).to_pylist() if has_path else [None] * self.num_rows
        return self.column(name) if pa.types.is_string(kind) or pa.types.is_large_string(kind) \
            else [None] * self.num_rows

    def cell(self, name: str, row: int) -> Any:
        start = row - row % _ROWS_PER_READ
        if self._blocks.get(name, (None,))[0] != start:
            stop = min(start + _ROWS_PER_READ, self.num_rows)
            self._blocks[name] = (start, self._take(name, start, stop).to_pylist())
        return self._blocks[name][1][row - start]


def _hf_audio(table: _Table, column: str, row: int, path: Optional[str]) -> tuple:
    """(source name, AudioRef) of one audio cell: {"bytes", "path"} as datasets' Audio stores it, raw
    bytes, or a path string. Bytes win over the path, as in datasets; a cell with neither reads as ""."""
    source = path or f"row {row}"
    resolved = os.path.join(table.base_dir, os.path.expanduser(path)) if path else ""

    def read() -> Union[bytes, str]:
        cell = table.cell(column, row)
        data = cell.get("bytes") if isinstance(cell, dict) else cell
        return bytes(data) if isinstance(data, (bytes, bytearray)) and data else resolved
    return source, Blob(f"{column}:{row}", read)


def read_hf(path: str, audio_column: str = "audio", text_column: str = "text", split: str = "train",
            target_column: Optional[str] = None) -> Corpus:
    """A local Hugging Face dataset (save_to_disk folder, or parquet file(s) / folder / glob).

    `split` picks a split of a DatasetDict, or the parquet files whose names say it. Scalar columns
    other than the audio ones are kept as metadata, the text column as "text"; an "id" column that is
    a valid key names the sample. A relative audio path resolves against the dataset's folder.
    """
    table = _Table(path, split)
    names = list(table.schema.names)
    for role, name in (("audio", audio_column), ("text", text_column), ("target audio", target_column)):
        if name is not None and name not in names:
            raise PrepareError(f"dataset {path!r} has no {role} column {name!r}; columns: {names}")
    meta_cols = [n for n in names if n not in (audio_column, target_column)]
    meta_values = {n: table.column(n) for n in meta_cols}
    audio_paths = table.paths(audio_column)
    target_paths = table.paths(target_column) if target_column else None
    candidates, rejects = [], []
    for row in range(table.num_rows):
        where = {"row": row}
        record = {"text": meta_values[text_column][row]}
        record.update((n, meta_values[n][row]) for n in meta_cols if n != text_column and
                      isinstance(meta_values[n][row], (str, int, float, bool)))
        source, audio = _hf_audio(table, audio_column, row, audio_paths[row])
        if not isinstance(record["text"], str):
            rejects.append(Reject(row, where, source, f"column {text_column!r} must be a string, got "
                                  f"{type(record['text']).__name__}", "wrong type"))
            continue
        target_source, target = (_hf_audio(table, target_column, row, target_paths[row])
                                 if target_column else (None, None))
        candidates.append(Candidate(row, where, _file_key(record, f"{split}-{row:08d}"), record, source,
                                    audio, target_source, target))
    identity = json.dumps([_files_identity(table.files), audio_column, text_column, split, target_column])
    return Corpus("hf", path, candidates, rejects, identity=identity, unit="row")
