"""Corpus readers for data.corpus.prepare: a JSONL manifest, a Kaldi data folder, a CSV/TSV manifest (Common Voice's
layout), a folder of audio files with transcripts (beside each, or LibriSpeech's *.trans.txt), a Hugging Face
dataset (save_to_disk folder or parquet), of transcribed audio or of paired source and target speech -> one
list of candidate samples.

Readers only look at text and file names; audio is decoded later, in data.corpus.prepare's worker processes.
A problem with one sample is a Reject with a reason; a problem with the whole corpus is a PrepareError.
A bad line or row (not UTF-8, a missing value, a repeated id) is a Reject of its own, never the file's.
"""
from __future__ import annotations

import collections
import csv
import glob
import gzip
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
    where: Dict[str, Any]  # {"line": 3}, {"utt": "u1"}, {"file": "spk/a.wav"}, {"row": 7}, {"file": "text", "line": 4}
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
    kind: str  # "manifest", "kaldi", "csv", "folder", "hf", "hf_pairs", "conversations" or "preferences"
    source: str  # the path the user gave
    candidates: List[Candidate]
    rejects: List[Reject]
    identity: str = ""  # what else defines the samples (options, dataset files), for resuming
    unit: str = "sample"  # what one candidate is called in messages ("line", "utterance", ...)


def describe(where: Dict[str, Any]) -> str:
    """'line 3', "utterance 'u1'", "file 'spk/a.wav'", 'row 7', "file 'text' line 4": where a sample or a
    rejected line is in its corpus."""
    return " ".join(f"{name} {value}" if isinstance(value, int) else
                    f"{'utterance' if name == 'utt' else name} {value!r}" for name, value in where.items())


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


def _raw_lines(path: str, gunzip: bool = False) -> List[bytes]:
    """The file's lines as bytes, split on "\n" only (a "\r" before it and a UTF-8 BOM are dropped):
    str.splitlines would also split inside a JSON string at U+2028, U+0085, form feeds, ...
    gunzip: the file is gzip-compressed."""
    try:
        with (gzip.open if gunzip else open)(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:  # EOFError: a gzip stream cut short
        raise PrepareError(f"cannot read {path!r}: {exc}") from None
    lines = data[len(_BOM):].split(b"\n") if data.startswith(_BOM) else data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    return [line[:-1] if line.endswith(b"\r") else line for line in lines]


def read_lines(path: str) -> List[Tuple[int, str, Optional[_BadLine]]]:
    """(line number, text, None) for each line of a text file (gunzipped when its name ends in .gz), or
    (line number, "", fault) for a line that is not UTF-8 (str(fault): "not valid UTF-8 at byte N"; fault.kind
    for the summary): a bad line is the caller's to reject, never the file's."""
    out: List[Tuple[int, str, Optional[_BadLine]]] = []
    for line_no, raw in enumerate(_raw_lines(path, gunzip=path.endswith(".gz")), start=1):
        try:
            out.append((line_no, _decode_line(raw), None))
        except _BadLine as bad:
            out.append((line_no, "", bad))
    return out


def _decode_line(line: bytes) -> str:
    """The line as text; _BadLine naming the offset of the first byte that is not UTF-8."""
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _BadLine("invalid UTF-8", f"not valid UTF-8 at byte {exc.start}") from None


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
        if text_only:  # no audio member at all; data.corpus.prepare writes just the .json
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

def _kaldi_lines(path: str) -> List[Tuple[int, Optional[str], str, Optional[_BadLine]]]:
    """(line number, utterance id, rest of the line, fault or None) of each non-blank line of a Kaldi
    table file. A line that is not UTF-8 has a fault; its id is None where the first field itself is not
    UTF-8, so nothing says which utterance the line was about."""
    out = []
    for line_no, raw in enumerate(_raw_lines(path), start=1):
        fields = raw.split(maxsplit=1)
        if not fields:
            continue
        try:
            parts = _decode_line(raw).strip().split(maxsplit=1)
        except _BadLine as bad:
            try:
                utt: Optional[str] = fields[0].decode("utf-8")
            except UnicodeDecodeError:
                utt = None
            out.append((line_no, utt, "", bad))
            continue
        out.append((line_no, parts[0], parts[1].strip() if len(parts) > 1 else "", None))
    return out


@dataclass
class _KaldiTable:
    """One table file (text, utt2spk, utt2lang): the values of its good lines, the faults of its bad ones.
    Orders are the corpus order of the line (its file's base + its line number), for sorting rejects."""
    values: Dict[str, Tuple[str, int]]  # utt -> (value, order)
    faults: Dict[str, Tuple[int, str, str]]  # utt -> (order, reason naming file and line, kind)
    rejects: List[Reject]  # lines no utterance answers for: an unreadable id, a repeated id
    end: int  # the order after its last line: the next file's base


def _kaldi_table(path: str, name: str, what: str, required: bool, order_base: int) -> _KaldiTable:
    """The `id value` table file at `path`, called `name` in messages, whose value per utterance is its
    `what` ("transcript", "speaker", ...): a Kaldi table or a LibriSpeech *.trans.txt.

    A line that is not UTF-8 or has no value is a fault of its utterance (which is then rejected, the
    reason naming file and line); where its id is unreadable, or repeats an earlier line's (the first
    line counts), the line is rejected by itself, named by file and line."""
    if not os.path.isfile(path):
        if required:
            raise PrepareError(f"Kaldi data folder has no {name}: expected {path!r}")
        return _KaldiTable({}, {}, [], order_base)
    lines = _kaldi_lines(path)
    table = _KaldiTable({}, {}, [], order_base + (lines[-1][0] if lines else 0))
    first_line: Dict[str, int] = {}
    for line_no, utt, value, bad in lines:
        order, where = order_base + line_no, {"file": name, "line": line_no}
        if utt is None:
            table.rejects.append(Reject(order, where, None, str(bad), bad.kind))
        elif utt in first_line:
            table.rejects.append(Reject(order, where, None, f"utterance {utt!r} repeated (first on line "
                                        f"{first_line[utt]})", "repeated utterance"))
        else:
            first_line[utt] = line_no
            if bad is not None:
                table.faults[utt] = (order, f"{name} line {line_no}: {bad}", bad.kind)
            elif not value:
                table.faults[utt] = (order, f"{name} line {line_no}: no {what} after the utterance id", f"no {what}")
            else:
                table.values[utt] = (value, order)
    return table


def read_kaldi(data_dir: str, root: Optional[str] = None) -> Corpus:
    """A Kaldi data folder: wav.scp and text, optional utt2spk and utt2lang.

    Relative paths in wav.scp resolve against `root` (default: the current directory, as Kaldi's own
    tools do). A piped command in wav.scp is rejected, never run: preparing data must not execute
    whatever a downloaded corpus says. A bad line of any file (not UTF-8, no value, a repeated id) is
    rejected with the file and line named, and takes down at most the one utterance it describes.
    """
    if os.path.exists(os.path.join(data_dir, "segments")):
        raise PrepareError(f"{os.path.join(data_dir, 'segments')}: Kaldi segments are not supported; "
                           "cut the recordings into one file per utterance first")
    wav_path = os.path.join(data_dir, "wav.scp")
    if not os.path.isfile(wav_path):
        raise PrepareError(f"Kaldi data folder has no wav.scp: expected {wav_path!r}")
    wav_lines = _kaldi_lines(wav_path)
    tables = []
    for name, what, required in (("text", "transcript", True), ("utt2spk", "speaker", False),
                                 ("utt2lang", "language", False)):
        tables.append(_kaldi_table(os.path.join(data_dir, name), name, what, required,
                                   tables[-1].end if tables else (wav_lines[-1][0] if wav_lines else 0)))
    texts, speakers, languages = tables
    # The first fault of each utterance, text's before utt2spk's before utt2lang's.
    faults: Dict[str, Tuple[int, str, str]] = {}
    for table in reversed(tables):
        faults.update(table.faults)
    seen_line: Dict[str, int] = {}
    candidates = []
    rejects = [r for table in tables for r in table.rejects]
    for line_no, utt, audio, bad in wav_lines:
        order = line_no - 1
        if utt is None:
            rejects.append(Reject(order, {"file": "wav.scp", "line": line_no}, None, str(bad), bad.kind))
            continue
        where = {"utt": utt}
        if utt in seen_line:
            rejects.append(Reject(order, where, audio or None, f"utterance id repeated in wav.scp (line "
                                  f"{line_no}, first on line {seen_line[utt]})", "repeated utterance"))
            continue
        seen_line[utt] = line_no
        problem = None
        if bad is not None:
            problem = (f"wav.scp line {line_no}: {bad}", bad.kind)
        elif not audio:
            problem = ("no audio path in wav.scp", "no audio path")
        elif audio.endswith("|"):
            problem = ("piped command in wav.scp is not executed", "piped command")
        elif utt in faults:
            problem = faults[utt][1:]
        elif utt not in texts.values:
            problem = ("no transcript in text", "no transcript")
        if problem:
            rejects.append(Reject(order, where, audio or None, *problem))
            continue
        record = {"id": utt, "text": texts.values[utt][0]}
        if utt in speakers.values:
            record["speaker"] = speakers.values[utt][0]
        if utt in languages.values:
            record["language"] = languages.values[utt][0]
        path = os.path.join(root or os.getcwd(), os.path.expanduser(audio))
        candidates.append(Candidate(order, where, _file_key(record, utt), record, audio, path))
    for utt, (_, order) in texts.values.items():
        if utt not in seen_line:
            rejects.append(Reject(order, {"utt": utt}, None, "no audio in wav.scp", "no audio"))
    for utt, (order, reason, kind) in faults.items():
        if utt not in seen_line:  # a bad line of an utterance wav.scp does not hold: still named
            rejects.append(Reject(order, {"utt": utt}, None, reason, kind))
    rejects.sort(key=lambda r: r.order)
    return Corpus("kaldi", data_dir, candidates, rejects, identity=f"root={root or os.getcwd()}",
                  unit="utterance")


# ----------------------------------------------------------------------------------------------- csv

# Columns of Common Voice's TSVs stored under the names the rest of the framework reads (data.corpus.stats counts
# speakers and languages); a column already called by the new name wins over the renamed one.
CSV_RENAMES = {"client_id": "speaker", "locale": "language"}
CSV_DELIMITERS = {"auto": None, ",": ",", "\\t": "\t", "\t": "\t"}


def _csv_fields(line: str, delimiter: str) -> List[str]:
    """The fields of one line. A TSV has no quoting (Common Voice's sentences hold bare quotes); a CSV
    quotes as csv.writer does, within the line: a field cannot span lines."""
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    try:
        return next(csv.reader([line], delimiter=delimiter, quoting=quoting, strict=True), [])
    except csv.Error as exc:
        raise _BadLine("malformed line", f"malformed line: {exc}") from None


def read_csv(path: str, audio_column: str = "path", text_column: str = "sentence", delimiter: str = "auto",
             audio_dir: Optional[str] = None) -> Corpus:
    """A CSV or TSV manifest with a header line: Common Voice's layout by default (validated.tsv: client_id,
    path, sentence, up_votes, ..., with the audio in a clips/ folder beside it).

    delimiter: "auto" (a tab where the header has one, else a comma), "," or "\t". A relative audio path
    resolves against `audio_dir` when given, else the file's folder or its clips/ folder, the first that
    holds it. The text column is stored as "text"; every other non-empty column as metadata under its own
    name, client_id as "speaker" and locale as "language" (CSV_RENAMES); an "id" column that is a valid key
    names the sample. A header that is unreadable or lacks the audio or text column is a PrepareError; a bad
    line (not UTF-8, malformed, another number of fields than the header, empty text, no audio file) is a
    Reject named by its line, and the rest are kept."""
    if delimiter not in CSV_DELIMITERS:
        raise PrepareError(f"delimiter {delimiter!r}: expected one of {sorted(CSV_DELIMITERS)}")
    lines = [(n, text, bad) for n, text, bad in read_lines(path) if bad is not None or text.strip()]
    if not lines:
        raise PrepareError(f"{path!r} is empty: expected a header line naming its columns")
    header_no, header_line, bad = lines[0]
    if bad is not None:
        raise PrepareError(f"{path}:{header_no}: the header line is {bad}")
    sep = CSV_DELIMITERS[delimiter] or ("\t" if "\t" in header_line else ",")
    try:
        header = [name.strip() for name in _csv_fields(header_line, sep)]
    except _BadLine as bad:
        raise PrepareError(f"{path}:{header_no}: the header line is {bad}") from None
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise PrepareError(f"{path}:{header_no}: the header names column(s) {repeated} more than once")
    for role, name in (("audio", audio_column), ("text", text_column)):
        if name not in header:
            raise PrepareError(f"{path}:{header_no}: no {role} column {name!r} in the header; columns: {header} "
                               f"(delimiter {sep!r}; --{role}-column names another)")
    if audio_dir is not None and not os.path.isdir(audio_dir):
        raise PrepareError(f"audio folder {audio_dir!r} does not exist")
    folder = os.path.dirname(os.path.abspath(path))
    search = [os.path.abspath(audio_dir)] if audio_dir else [folder, os.path.join(folder, "clips")]
    renames = {old: new for old, new in CSV_RENAMES.items() if new not in header}
    candidates, rejects = [], []
    for line_no, line, bad in lines[1:]:
        where = {"line": line_no}
        try:
            if bad is not None:
                raise bad
            fields = _csv_fields(line, sep)
            if len(fields) != len(header):
                raise _BadLine("wrong number of fields", f"{len(fields)} fields, the header has {len(header)}")
        except _BadLine as fault:
            rejects.append(Reject(line_no, where, None, str(fault), fault.kind))
            continue
        row = dict(zip(header, fields))
        audio, text = row[audio_column].strip(), " ".join(row[text_column].split())
        problem = None
        if not text:
            problem = (f"column {text_column!r} is empty: expected the transcript", "empty text")
        elif not audio:
            problem = (f"column {audio_column!r} is empty: expected an audio file", "no audio path")
        else:
            expanded = os.path.expanduser(audio)
            places = [expanded] if os.path.isabs(expanded) else [os.path.join(d, expanded) for d in search]
            resolved = next((p for p in places if os.path.isfile(p)), None)
            if resolved is None:
                problem = (f"no audio file {audio!r}" + ("" if os.path.isabs(expanded) else
                                                         f" in {' or '.join(search)}"), "missing audio")
        if problem:
            rejects.append(Reject(line_no, where, audio or None, *problem))
            continue
        record = {renames.get(name, name): value.strip() for name, value in row.items()
                  if name not in (audio_column, text_column) and value.strip()}
        record["text"] = text
        stem = os.path.splitext(os.path.basename(audio))[0]
        candidates.append(Candidate(line_no, where, _file_key(record, f"{stem}-{line_no:08d}"), record, audio,
                                    resolved))
    identity = json.dumps([audio_column, text_column, sep, search])
    return Corpus("csv", path, candidates, rejects, identity=identity, unit="line")


# -------------------------------------------------------------------------------------------- folder

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")
TRANSCRIPT_EXTENSIONS = (".txt", ".lab")


LIBRISPEECH_TRANSCRIPTS = ".trans.txt"  # LibriSpeech: one SPEAKER-CHAPTER.trans.txt of "ID TEXT" lines per folder


def _transcript_file(path: str) -> str:
    """The words of a .txt/.lab transcript, whitespace joined; _BadLine naming the first line that is not
    UTF-8, or that the file cannot be read."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise _BadLine("unreadable transcript", f"unreadable transcript {path}: {exc.strerror}") from None
    lines = data[len(_BOM):].split(b"\n") if data.startswith(_BOM) else data.split(b"\n")
    words = []
    for line_no, line in enumerate(lines, start=1):
        try:
            words += _decode_line(line).split()
        except _BadLine as bad:
            raise _BadLine(bad.kind, f"transcript {path} line {line_no}: {bad}") from None
    return " ".join(words)


def read_folder(root: str) -> Corpus:
    """Every audio file under `root` (recursively, sorted) with a .txt or .lab transcript of the same
    stem beside it, or else a line `STEM TEXT` in a *.trans.txt file of its folder (LibriSpeech's layout).
    The speaker is the name of the folder holding the file; for a *.trans.txt line, the stem's part before
    its first "-" where it has one (LibriSpeech's SPEAKER-CHAPTER-UTTERANCE).

    A *.trans.txt line that is not UTF-8 or has no text rejects the one audio file it transcribes (the
    reason naming file and line); a line whose id is unreadable or repeated is rejected by itself."""
    if not os.path.isdir(root):
        raise PrepareError(f"audio folder {root!r} does not exist")
    audio_files, trans_files = [], []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        visible = [os.path.join(folder, f) for f in sorted(files) if not f.startswith(".")]
        audio_files += [p for p in visible if p.lower().endswith(AUDIO_EXTENSIONS)]
        trans_files += [p for p in visible if p.endswith(LIBRISPEECH_TRANSCRIPTS)]
    rejects = []
    trans: Dict[str, Dict[str, Tuple[str, int]]] = collections.defaultdict(dict)  # folder -> stem -> value
    trans_names: Dict[str, List[str]] = collections.defaultdict(list)  # folder -> its *.trans.txt files
    faults: Dict[Tuple[str, str], Tuple[int, str, str]] = {}  # (folder, stem) -> fault
    order_base = len(audio_files)
    for path in trans_files:
        rel = os.path.relpath(path, root).replace(os.sep, "/")
        table = _kaldi_table(path, rel, "transcript", True, order_base)
        order_base = table.end
        folder = os.path.dirname(path)
        trans[folder].update(table.values)
        trans_names[folder].append(rel)
        faults.update(((folder, utt), fault) for utt, fault in table.faults.items())
        rejects += table.rejects
    candidates = []
    for order, path in enumerate(audio_files):
        rel = os.path.relpath(path, root).replace(os.sep, "/")
        where = {"file": rel}
        stem = os.path.splitext(path)[0]
        folder, name = os.path.split(stem)
        speaker = os.path.basename(os.path.dirname(os.path.abspath(path)))
        transcript = next((stem + ext for ext in TRANSCRIPT_EXTENSIONS if os.path.isfile(stem + ext)), None)
        if transcript is not None:
            try:
                text = _transcript_file(transcript)
            except _BadLine as bad:
                rejects.append(Reject(order, where, rel, str(bad), bad.kind))
                continue
        elif (folder, name) in faults:
            rejects.append(Reject(order, where, rel, *faults.pop((folder, name))[1:]))
            continue
        elif name in trans.get(folder, {}):
            text = trans[folder][name][0]
            speaker = name.split("-", 1)[0] if "-" in name else speaker
        else:
            names = " or ".join(name + ext for ext in TRANSCRIPT_EXTENSIONS)
            listed = f", or a line '{name} ...' in {' or '.join(trans_names[folder])}" if folder in trans_names else ""
            rejects.append(Reject(order, where, rel, f"no transcript: expected {names} beside it{listed}",
                                  "no transcript"))
            continue
        if not text:
            rejects.append(Reject(order, where, rel, f"empty transcript {transcript}", "empty transcript"))
            continue
        candidates.append(Candidate(order, where, sanitize_key(os.path.splitext(rel)[0]),
                                    {"text": text, "speaker": speaker}, rel, path))
    for (folder, utt), (order, reason, kind) in faults.items():  # bad lines of ids with no audio file
        rejects.append(Reject(order, {"utt": utt}, None, reason, kind))
    rejects.sort(key=lambda r: r.order)
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


def _cells(column) -> list:
    """A column's cells as Python values, where a string cell that is not UTF-8 is a _BadLine naming the
    byte: pyarrow's own to_pylist would fail the whole column for it."""
    import pyarrow as pa
    kind = column.type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        return column.to_pylist()
    out = []
    for cell in column.cast(pa.large_binary() if pa.types.is_large_string(kind) else pa.binary()).to_pylist():
        try:
            out.append(None if cell is None else _decode_line(cell))
        except _BadLine as bad:
            out.append(bad)
    return out


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
        return _cells(self._read([name]).column(0))

    def paths(self, name: str) -> list:
        """The file name stored with each audio cell (None where there is none), without reading audio."""
        import pyarrow as pa
        kind = self.schema.field(name).type
        if pa.types.is_struct(kind):
            has_path = any(kind.field(i).name == "path" for i in range(kind.num_fields))
            return _cells(self._path(name)) if has_path else [None] * self.num_rows
        return self.column(name) if pa.types.is_string(kind) or pa.types.is_large_string(kind) \
            else [None] * self.num_rows

    def cell(self, name: str, row: int) -> Any:
        """An audio cell: the bytes of datasets' Audio struct, or the bytes or path string itself."""
        import pyarrow as pa
        import pyarrow.compute as pc
        start = row - row % _ROWS_PER_READ
        if self._blocks.get(name, (None,))[0] != start:
            stop = min(start + _ROWS_PER_READ, self.num_rows)
            block = self._take(name, start, stop)
            if pa.types.is_struct(block.type) and block.type.get_field_index("bytes") >= 0:
                block = pc.struct_field(block, "bytes")  # its path (maybe not UTF-8) comes from paths()
            self._blocks[name] = (start, _cells(block))
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


def _hf_candidates(table: _Table, split: str, audio_column: str, target_column: Optional[str],
                   texts: Dict[str, str], fixed: Dict[str, Any], non_empty: bool) -> tuple:
    """(candidates, rejects) of a table's rows: `texts` maps record field -> column (each cell must be a
    string, with `non_empty` not blank either), `fixed` adds the same fields to every record, and every
    other scalar column is kept as metadata."""
    meta_cols = [n for n in table.schema.names if n not in (audio_column, target_column)]
    meta_values = {n: table.column(n) for n in meta_cols}
    audio_paths = table.paths(audio_column)
    target_paths = table.paths(target_column) if target_column else None
    candidates, rejects = [], []
    for row in range(table.num_rows):
        where = {"row": row}
        cells = [(n, meta_values[n][row]) for n in meta_cols] + [(audio_column, audio_paths[row])] + (
            [(target_column, target_paths[row])] if target_column else [])
        bad_cell = next(((n, value) for n, value in cells if isinstance(value, _BadLine)), None)
        if bad_cell is not None:
            name, bad = bad_cell
            rejects.append(Reject(row, where, f"row {row}", f"column {name!r}: {bad}", bad.kind))
            continue
        record = {field: meta_values[column][row] for field, column in texts.items()}
        record.update((n, meta_values[n][row]) for n in meta_cols if n not in texts.values() and
                      isinstance(meta_values[n][row], (str, int, float, bool)))
        record.update(fixed)
        source, audio = _hf_audio(table, audio_column, row, audio_paths[row])
        bad = next(((column, record[field]) for field, column in texts.items()
                    if not isinstance(record[field], str) or (non_empty and not record[field].strip())), None)
        if bad is not None:
            column, value = bad
            problem = (f"column {column!r} is {value!r}: expected non-empty text", "empty text") \
                if isinstance(value, str) else (f"column {column!r} must be a string, got {type(value).__name__}",
                                                "wrong type")
            rejects.append(Reject(row, where, source, *problem))
            continue
        target_source, target = (_hf_audio(table, target_column, row, target_paths[row])
                                 if target_column else (None, None))
        candidates.append(Candidate(row, where, _file_key(record, f"{split}-{row:08d}"), record, source,
                                    audio, target_source, target))
    return candidates, rejects


def _check_columns(path: str, table: _Table, roles: List[Tuple[str, Optional[str]]]) -> None:
    names = list(table.schema.names)
    for role, name in roles:
        if name is not None and name not in names:
            raise PrepareError(f"dataset {path!r} has no {role} column {name!r}; columns: {names}")


def read_hf(path: str, audio_column: str = "audio", text_column: str = "text", split: str = "train",
            target_column: Optional[str] = None) -> Corpus:
    """A local Hugging Face dataset (save_to_disk folder, or parquet file(s) / folder / glob).

    `split` picks a split of a DatasetDict, or the parquet files whose names say it. Scalar columns
    other than the audio ones are kept as metadata, the text column as "text"; an "id" column that is
    a valid key names the sample. A relative audio path resolves against the dataset's folder.
    """
    table = _Table(path, split)
    _check_columns(path, table, [("audio", audio_column), ("text", text_column), ("target audio", target_column)])
    candidates, rejects = _hf_candidates(table, split, audio_column, target_column, {"text": text_column}, {},
                                         non_empty=False)
    identity = json.dumps([_files_identity(table.files), audio_column, text_column, split, target_column])
    return Corpus("hf", path, candidates, rejects, identity=identity, unit="row")


def read_hf_pairs(path: str, source_audio_column: str = "source_audio", target_audio_column: str = "target_audio",
                  source_text_column: Optional[str] = None, target_text_column: Optional[str] = None,
                  split: str = "train", source_language: Optional[str] = None,
                  target_language: Optional[str] = None, task: str = "s2st") -> Corpus:
    """Paired speech (speech-to-speech translation) from a local Hugging Face dataset or parquet file(s),
    read as read_hf reads them: per row a source and a target audio (datasets' Audio, bytes or a path),
    optional source and target texts (stored as "text" and "translation", each a non-empty string where
    its column is named), the languages and `task` written into every record.

    The source audio becomes the sample's `flac`, the target its `target.flac`; a row whose audio is
    missing or undecodable is rejected by data.corpus.prepare when it decodes it, named by its row.
    """
    if task not in TASKS:
        raise PrepareError(f"task {task!r} is not a registered task: expected one of {sorted(TASKS)}")
    table = _Table(path, split)
    _check_columns(path, table, [("source audio", source_audio_column), ("target audio", target_audio_column),
                                 ("source text", source_text_column), ("target text", target_text_column)])
    texts = {field: column for field, column in (("text", source_text_column), ("translation", target_text_column))
             if column is not None}
    fixed = {name: value for name, value in (("task", task), ("source_language", source_language),
                                             ("target_language", target_language)) if value is not None}
    candidates, rejects = _hf_candidates(table, split, source_audio_column, target_audio_column, texts, fixed,
                                         non_empty=True)
    identity = json.dumps([_files_identity(table.files), source_audio_column, target_audio_column, texts, fixed,
                           split])
    return Corpus("hf_pairs", path, candidates, rejects, identity=identity, unit="row")
