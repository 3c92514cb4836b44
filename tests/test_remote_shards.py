"""Shards read where clusters keep them: over HTTP from a server started here on 127.0.0.1 (Range requests, a
connection dropped mid-shard), through pipe: commands, the s3/gs command-line tools and fsspec. Each gives the
samples, the resumed continuation and the per-rank shares that the same local folder gives."""
import hashlib
import http.server
import io
import json
import logging
import os
import re
import socket
import tarfile
import threading

import pytest
import torch

import data.loading.remote
import data.loading.shard_reader
from data.loading.loader import DataConfig, build_loader
from data.loading.shard_reader import check_audio_tokenizer, read_shard, resolve_shards, shard_counts
from data.shards import INDEX_FORMAT, ShardWriter, write_index
from tests.test_loader import _good, make_tokenizer

torch.set_num_threads(1)
NUM_SHARDS, PER_SHARD = 3, 8
SHARD = "/ds/shard-000001.tar"


class _ShardServer(http.server.ThreadingHTTPServer):
    """Serves `root` as an object store does: GET with `Range: bytes=N-` (unless `ranges` is off) and an ETag.
    `drops` maps a path to byte counts: its next responses are cut after that many bytes, one per request."""
    daemon_threads = True

    def __init__(self, root):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root, self.ranges, self.drops, self.requests = root, True, {}, []

    def handle_error(self, request, client_address):
        pass  # a reader that stops early (the loader reads only the samples it needs) breaks our pipe


class _Handler(http.server.BaseHTTPRequestHandler):
    """GET only, which is all the loader sends; the request log and the switches live on the server."""

    def do_GET(self):
        server = self.server
        server.requests.append((self.path, self.headers.get("Range")))
        file = server.root / self.path.lstrip("/")
        if not file.is_file():
            self.send_error(404)
            return
        body = file.read_bytes()
        asked = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        start = int(asked[1]) if asked and server.ranges else 0
        self.send_response(206 if asked and server.ranges else 200)
        if asked and server.ranges:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(body) - start))
        self.send_header("ETag", hashlib.sha1(body).hexdigest())
        self.end_headers()
        cuts = server.drops.get(self.path)
        if not cuts:
            self.wfile.write(body[start:])
            return
        self.wfile.write(body[start:start + cuts.pop(0)])
        self.connection.shutdown(socket.SHUT_RDWR)  # the connection drops mid-body
        self.close_connection = True

    def log_message(self, *args):
        pass


class _Clock:
    """Stands in for a module's `time`: records the waits instead of sleeping."""

    def __init__(self):
        self.waits = []

    def sleep(self, seconds):
        self.waits.append(seconds)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """ROOT/ds as data.corpus.prepare writes it: 3 shards of 8 ASR records (FLAC + JSON), index.json with counts."""
    root = tmp_path_factory.mktemp("store")
    writer = ShardWriter(str(root / "ds"), max_samples=PER_SHARD)
    for i in range(NUM_SHARDS * PER_SHARD):
        writer.write(f"s{i // PER_SHARD}_{i % PER_SHARD}", {k: v for k, v in _good(i).items() if k != "txt"})
    write_index(str(root / "ds"), {"format": INDEX_FORMAT, "shards": writer.close()})
    return root


@pytest.fixture(scope="module")
def http_server(root):
    server = _ShardServer(root)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def server(http_server, monkeypatch):
    """The module's server with its switches reset and its request log emptied."""
    monkeypatch.setenv("no_proxy", "127.0.0.1")  # a machine's http_proxy must not stand between
    http_server.ranges, http_server.drops, http_server.requests[:] = True, {}, []
    return http_server


def _base(server):
    return f"http://127.0.0.1:{server.server_port}"


def _local_paths(root):
    return [str(root / "ds" / f"shard-{s:06d}.tar") for s in range(NUM_SHARDS)]


def _raws(paths):
    return [(r["__key__"], r.get("flac"), r.get("json")) for p in paths for r in read_shard(p)]


def _cfg(tok_dir, shards, **kw):
    return DataConfig(**{"shards": shards, "tokenizer": tok_dir, "batch_size": 3, "num_workers": 0,
                         "shuffle_buffer": 4, **kw})


def _batches(cfg, num, rank=0, world_size=1, state=None):
    loader = build_loader(cfg, rank=rank, world_size=world_size, seed=3)
    if state is not None:
        loader.load_state_dict(state)
    return [next(loader) for _ in range(num)], loader


def _same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for name, value in w.items():
            assert torch.equal(g[name], value) if isinstance(value, torch.Tensor) else g[name] == value, name


# ---------------------------------------------------------------------------------------------- http

def test_http_folder_reads_what_the_local_folder_holds(root, server, tok_dir):
    base = _base(server)
    urls = resolve_shards([f"{base}/ds/"])
    assert urls == [f"{base}/ds/shard-{s:06d}.tar" for s in range(NUM_SHARDS)]
    assert resolve_shards([f"{base}/ds/index.json"]) == urls
    assert resolve_shards([f"{base}/ds/shard-{{000000..000002}}.tar"]) == urls
    assert shard_counts(urls) == [PER_SHARD] * NUM_SHARDS  # from the index: no shard fetched to count
    assert {path for path, _ in server.requests} == {"/ds/index.json"}
    local = _raws(_local_paths(root))
    assert _raws(urls) == local and len(local) == 24 and len({k for k, _, _ in local}) == 24
    want, _ = _batches(_cfg(tok_dir, [str(root / "ds")]), 12)  # 36 samples: one epoch and a half
    got, _ = _batches(_cfg(tok_dir, [f"{base}/ds"]), 12)
    _same(got, want)
    assert max(e for b in got for e in b["epochs"]) == 1


@pytest.mark.parametrize("ranges,cuts", [(True, [12_000, 10_000]), (False, [12_000])],
                         ids=["range_requests_twice", "server_without_range"])
def test_dropped_connection_resumes_where_it_stood(root, server, tok_dir, monkeypatch, caplog, ranges, cuts):
    clock = _Clock()
    monkeypatch.setattr(data.loading.remote, "time", clock)
    url = f"{_base(server)}{SHARD}"
    size = os.path.getsize(root / SHARD.lstrip("/"))
    with tarfile.open(root / SHARD.lstrip("/")) as tar:
        last = tar.getmembers()[-1]
    assert sum(cuts) < last.offset_data  # every cut falls inside the shard's samples, before the last one
    want, _ = _batches(_cfg(tok_dir, [str(root / "ds")], shuffle_buffer=0), 8)  # one epoch: 8 x 3 samples
    server.ranges, server.drops = ranges, {SHARD: list(cuts)}
    with caplog.at_level(logging.WARNING, logger="data.loading.remote"):
        got, loader = _batches(_cfg(tok_dir, [f"{_base(server)}/ds"], shuffle_buffer=0), 8)
    _same(got, want)  # the same samples in the same order: nothing lost or repeated
    assert sorted(k for b in got for k in b["keys"]) == sorted(k for k, _, _ in _raws(_local_paths(root)))
    assert loader.stats() == {"skipped": {}, "skipped_keys": []}
    reached = [sum(cuts[:k + 1]) for k in range(len(cuts))]
    assert [r for p, r in server.requests if p == SHARD] == [None] + [f"bytes={n}-" for n in reached]
    assert [r.getMessage() for r in caplog.records] == [
        f"{url}: ConnectionError: the connection closed early at byte {n} of {size}; resuming there in 0.5 s "
        "(retry 1 of 4)" for n in reached]
    assert clock.waits == [0.5] * len(cuts)  # each resume made progress, so the waits started afresh


def test_resume_mid_epoch_over_http_continues_as_local(root, server, tok_dir):
    # Records are 19-27 tokens: a budget of 80 takes 3-4 of the 6 the batcher holds, so it holds some back.
    batching = {"num_workers": 2, "batching": "tokens", "max_tokens": 80, "batch_buffer": 6}
    local_cfg = _cfg(tok_dir, [str(root / "ds")], **batching)
    http_cfg = _cfg(tok_dir, [f"{_base(server)}/ds"], **batching)
    k, m = 5, 12
    want, _ = _batches(local_cfg, k + m)
    _, stopped = _batches(http_cfg, k)
    state = stopped.state_dict()
    assert any(w["pending"] for w in state["workers"])  # the batcher held samples: they must come back
    resumed, _ = _batches(http_cfg, m, state=state)
    _same(resumed, want[k:])
    # A run whose shards moved from local disk to the server resumes the same way.
    _, stopped_local = _batches(local_cfg, k)
    moved, _ = _batches(http_cfg, m, state=stopped_local.state_dict())
    _same(moved, want[k:])


def test_rank_shares_over_http_equal_the_local_ones(root, server, tok_dir):
    epoch_keys = []
    for rank in range(2):
        # 24 samples over 2 ranks x 2 workers: 6 per slot, one epoch is 4 batches of 3 per rank.
        want, _ = _batches(_cfg(tok_dir, [str(root / "ds")], num_workers=2), 6, rank, 2)
        got, _ = _batches(_cfg(tok_dir, [f"{_base(server)}/ds"], num_workers=2), 6, rank, 2)
        _same(got, want)
        epoch_keys.append([key for b in got[:4] for key in b["keys"]])
    assert len(set(epoch_keys[0])) == len(set(epoch_keys[1])) == 12
    assert sorted(epoch_keys[0] + epoch_keys[1]) == sorted(k for k, _, _ in _raws(_local_paths(root)))


def test_audio_tokenizer_record_is_read_beside_the_shards(root, server):
    """data.audio_tokenizer is checked against the tokenizer.json in the shards' folder URL."""
    (root / "coded").mkdir(exist_ok=True)
    (root / "coded" / "tokenizer.json").write_text(json.dumps({"name": "kmeans", "hash": "ab" * 32,
                                                                "complete": True}))
    shards = [f"{_base(server)}/coded/shard-000000.tar"]
    check_audio_tokenizer(shards, "ab" * 8)  # the same tokenizer, named by a hash prefix
    with pytest.raises(ValueError) as error:
        check_audio_tokenizer(shards, "cd" * 8)
    assert str(error.value).startswith(f"dataset folder '{_base(server)}/coded' has audio codes from tokenizer "
                                       f"{'ab' * 32} (kmeans), but data.audio_tokenizer names {'cd' * 8}")
    check_audio_tokenizer([f"{_base(server)}{SHARD}"], "cd" * 8)  # no tokenizer.json there: nothing to refuse


# ---------------------------------------------------------------------------------------------- pipe:, s3, gs

def test_pipe_commands_read_like_local_paths(root, tok_dir):
    specs = [f"pipe:cat {p}" for p in _local_paths(root)]
    assert resolve_shards(specs) == specs
    assert shard_counts(specs) == [PER_SHARD] * NUM_SHARDS  # no folder, no index: counted by reading them
    assert _raws(specs) == _raws(_local_paths(root))
    want, _ = _batches(_cfg(tok_dir, [str(root / "ds")]), 10)
    got, _ = _batches(_cfg(tok_dir, specs), 10)
    _same(got, want)


def test_failing_pipe_is_retried_then_an_io_error_naming_the_command(root, monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(data.loading.shard_reader, "time", clock)
    missing = root / "ds" / "shard-000009.tar"
    (marker,) = list(read_shard(f"pipe:cat {missing}"))
    assert marker == {"__key__": "<unreadable shard>", "__url__": f"pipe:cat {missing}", "__reason__": "io_error",
                      "__error__": f"FileNotFoundError: pipe:cat {missing}: the command exited with status 1: "
                                   f"cat: {missing}: No such file or directory"}
    assert clock.waits == [0.5, 1.0, 2.0, 4.0]


def _fake_cli(folder, name, script):
    path = folder / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)


_AWS_MISSING = "fatal error: An error occurred (404) when calling the HeadObject operation: Key does not exist"
_GCLOUD_MISSING = "ERROR: (gcloud.storage.cat) The following URLs matched no objects or files:"


@pytest.fixture
def cloud_clis(root, tmp_path, monkeypatch):
    """`aws` and `gcloud` stand-ins on PATH serving bucket/ds from ROOT/ds, with the real tools' not-found
    messages; no fsspec backend, so the loader goes through the tools."""
    _fake_cli(tmp_path, "aws", f"""[ "$1 $2 $4" = "s3 cp -" ] || exit 2
f="{root}/${{3#s3://bucket/}}"
[ -f "$f" ] || {{ echo "{_AWS_MISSING}" >&2; exit 1; }}
exec cat "$f"
""")
    _fake_cli(tmp_path, "gcloud", f"""[ "$1 $2" = "storage cat" ] || exit 2
f="{root}/${{3#gs://bucket/}}"
[ -f "$f" ] || {{ echo "{_GCLOUD_MISSING}" "$3" >&2; exit 1; }}
exec cat "$f"
""")
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setattr(data.loading.remote, "_fsspec_filesystem", lambda scheme: None)


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_bucket_urls_through_the_cloud_clis(root, tok_dir, cloud_clis, scheme):
    urls = resolve_shards([f"{scheme}://bucket/ds/"])
    assert urls == [f"{scheme}://bucket/ds/shard-{s:06d}.tar" for s in range(NUM_SHARDS)]
    assert shard_counts(urls) == [PER_SHARD] * NUM_SHARDS
    assert _raws(urls) == _raws(_local_paths(root))
    with pytest.raises(ValueError) as error:
        resolve_shards([f"{scheme}://bucket/nowhere"])
    assert str(error.value) == (f"dataset folder '{scheme}://bucket/nowhere' has no index.json: expected the "
                                "output of `python -m data.corpus.prepare`")


def test_bucket_url_without_a_client_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(data.loading.remote, "_fsspec_filesystem", lambda scheme: None)
    with pytest.raises(ValueError) as error:
        resolve_shards(["s3://bucket/ds/"])
    assert str(error.value) == ("shard location 's3://bucket/ds/': reading s3:// needs s3fs (`pip install s3fs`, "
                                "used through fsspec) or the AWS CLI (`aws` on PATH); neither is installed here")


class _Bucket:
    """Stands in for an fsspec filesystem (s3fs, gcsfs): open(url, "rb") gives a seekable file with `.size` that
    hands out at most 4 KiB per read, as a network does; the first open of `failing` raises ConnectionResetError
    on its first read past byte `fail_after`. `seeks` records where each open of `failing` was positioned."""

    def __init__(self, objects, failing, fail_after):
        self.objects, self.failing, self.fail_after, self.seeks = objects, failing, fail_after, []

    def open(self, url, mode):
        assert mode == "rb"
        if url not in self.objects:
            raise FileNotFoundError(url)
        return _Object(self, url)


class _Object(io.BytesIO):
    def __init__(self, bucket, url):
        super().__init__(bucket.objects[url])
        self.size, self.bucket, self.url = len(bucket.objects[url]), bucket, url
        self.fails = url == bucket.failing and not bucket.seeks

    def seek(self, offset, whence=0):
        if self.url == self.bucket.failing:
            self.bucket.seeks.append(offset)
        return super().seek(offset, whence)

    def readinto(self, buffer):
        if self.fails and self.tell() > self.bucket.fail_after:
            raise ConnectionResetError(104, "Connection reset by peer")
        return super().readinto(memoryview(buffer)[:4096])


def test_fsspec_reads_and_resumes_at_the_byte_reached(root, monkeypatch, caplog):
    objects = {f"s3://bucket/ds/{p.name}": p.read_bytes() for p in (root / "ds").iterdir()}
    url = "s3://bucket/ds/shard-000001.tar"
    bucket = _Bucket(objects, url, 20_000)
    monkeypatch.setattr(data.loading.remote, "_fsspec_filesystem", lambda scheme: bucket)
    monkeypatch.setattr(data.loading.remote, "time", _Clock())
    urls = resolve_shards(["s3://bucket/ds"])
    assert shard_counts(urls) == [PER_SHARD] * NUM_SHARDS
    with caplog.at_level(logging.WARNING, logger="data.loading.remote"):
        assert _raws(urls) == _raws(_local_paths(root))
    reached = 20_480  # the first 4 KiB boundary past byte 20000
    assert bucket.seeks == [0, reached]
    assert [r.getMessage() for r in caplog.records] == [
        f"{url}: ConnectionResetError: [Errno 104] Connection reset by peer at byte {reached} of "
        f"{len(objects[url])}; resuming there in 0.5 s (retry 1 of 4)"]


# ---------------------------------------------------------------------------------------------- errors

def test_missing_folder_or_shard_and_unreachable_server_are_named(server, monkeypatch):
    base = _base(server)
    with pytest.raises(ValueError) as error:
        resolve_shards([f"{base}/nowhere/"])
    assert str(error.value) == (f"dataset folder '{base}/nowhere' has no index.json: expected the output of "
                                "`python -m data.corpus.prepare`")
    with pytest.raises(ValueError, match="a URL cannot be globbed"):
        resolve_shards([f"{base}/ds/*.tar"])
    clock = _Clock()
    monkeypatch.setattr(data.loading.shard_reader, "time", clock)
    monkeypatch.setattr(data.loading.remote, "time", clock)
    # A shard named alone: no index.json beside it, so it is counted by reading it, and it is not there.
    url = f"{base}/nowhere/shard-000000.tar"
    with pytest.raises(OSError) as error:
        shard_counts([url])
    assert str(error.value) == (f"shard {url}: counting its samples failed 5 times (FileNotFoundError: {url}: "
                                "HTTP 404 Not Found); every rank needs the same count, so the loader cannot start")
    assert clock.waits == [0.5, 1.0, 2.0, 4.0]
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    clock.waits.clear()
    with pytest.raises(OSError) as error:
        resolve_shards([f"http://127.0.0.1:{port}/ds"])
    assert str(error.value) == (f"http://127.0.0.1:{port}/ds/index.json: cannot connect ([Errno 111] Connection "
                                "refused)")
    assert clock.waits == [0.5, 1.0, 2.0, 4.0]
