"""Rank 0's long one-off work while the other ranks poll a file: the done path, a timeout, rank 0's error
reaching the waiting ranks, and two real gloo ranks outliving a collective timeout shorter than the work."""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from train.config import InitPartsConfig, ModelConfig, TrainConfig
from train.loop import init_parts_once
from train.rendezvous import RankZeroFailed, run_once_on_rank0, wait_for_file


def write_done(done: Path, text: str = "ok") -> None:
    done.parent.mkdir(parents=True, exist_ok=True)
    done.write_text(text)


def test_rank0_runs_the_work_once_and_a_later_start_reuses_it(tmp_path):
    done, calls = tmp_path / "out" / "DONE", []

    def work():
        calls.append(1)
        write_done(done, "built")

    messages = []
    run_once_on_rank0(done, work, 0, "building", log=messages.append)
    run_once_on_rank0(done, work, 0, "building", log=messages.append)  # a resume: DONE is there
    assert len(calls) == 1 and done.read_text() == "built"
    assert len(messages) == 1 and messages[0].startswith("rank 0: building took ")
    assert not (tmp_path / "out" / "DONE.FAILED").exists()


def test_a_waiting_rank_returns_when_done_appears_and_reports_progress(tmp_path):
    done, messages = tmp_path / "DONE", []
    writer = threading.Timer(0.6, write_done, args=(done,))
    writer.start()
    started = time.monotonic()
    wait_for_file(done, tmp_path / "FAILED", 3, "converting", timeout_s=30, poll_s=0.05, progress_s=0.2,
                  log=messages.append)
    waited = time.monotonic() - started
    writer.join()
    assert 0.6 <= waited < 5
    assert 2 <= len(messages) <= 4, messages
    assert all(m.startswith("rank 3: waiting for rank 0 to finish converting (") and m.endswith(" of at most 30 s)")
               for m in messages), messages


def test_a_waiting_rank_gives_up_after_its_timeout(tmp_path):
    started = time.monotonic()
    with pytest.raises(TimeoutError) as err:
        wait_for_file(tmp_path / "DONE", tmp_path / "FAILED", 1, "converting", timeout_s=0.3, poll_s=0.05)
    assert 0.3 <= time.monotonic() - started < 3
    assert str(err.value) == (f"rank 1: waited 0 s for rank 0 to finish converting, but {tmp_path / 'DONE'} did "
                              f"not appear (timeout_s=0); is rank 0 still running?")


def test_rank0s_error_is_written_and_a_waiting_rank_raises_it(tmp_path):
    done = tmp_path / "DONE"

    def work():
        raise ValueError("the qwen folder has no config.json")

    with pytest.raises(ValueError, match="the qwen folder has no config.json"):
        run_once_on_rank0(done, work, 0, "building the model", log=lambda _: None)
    failed = tmp_path / "DONE.FAILED"
    assert failed.read_text().startswith("ValueError: the qwen folder has no config.json\n\nTraceback")
    started = time.monotonic()
    with pytest.raises(RankZeroFailed) as err:  # no 4 h wait: the marker says rank 0 failed
        run_once_on_rank0(done, work, 1, "building the model", poll_s=0.05)
    assert time.monotonic() - started < 1
    assert str(err.value).startswith(f"rank 1: rank 0 failed building the model ({failed}):\n"
                                     f"ValueError: the qwen folder has no config.json\n")
    # The next attempt's rank 0 clears the old marker before it starts.
    run_once_on_rank0(done, lambda: write_done(done), 0, "building the model", log=lambda _: None)
    assert done.is_file() and not failed.exists()


def test_work_that_returns_without_its_marker_counts_as_failed(tmp_path):
    done = tmp_path / "DONE"
    with pytest.raises(RuntimeError) as err:
        run_once_on_rank0(done, lambda: None, 0, "converting")
    assert str(err.value) == f"converting returned without writing its DONE marker {done}"
    assert (tmp_path / "DONE.FAILED").read_text().startswith(f"RuntimeError: {err.value}\n")


def test_init_parts_once_writes_rank0s_error_for_the_other_ranks(tmp_path, monkeypatch):
    import model.init_parts

    def broken(*args, **kwargs):
        raise FileNotFoundError("/models/qwen/config.json")

    monkeypatch.setattr(model.init_parts, "init_from_parts", broken)
    parts = InitPartsConfig(qwen="/models/qwen", audio_encoder="/models/audio")
    cfg = TrainConfig(run_dir=str(tmp_path / "run"), model=ModelConfig(init_parts=parts))
    with pytest.raises(FileNotFoundError):
        init_parts_once(cfg, tok=None, rank=0)
    failed = tmp_path / "run" / "init.FAILED"
    assert failed.read_text().startswith("FileNotFoundError: /models/qwen/config.json\n")
    with pytest.raises(RankZeroFailed) as err:
        init_parts_once(cfg, tok=None, rank=1)
    assert str(err.value).startswith(f"rank 1: rank 0 failed building the initial model from parts ({failed}):\n"
                                     f"FileNotFoundError: /models/qwen/config.json\n")
    # Done once: every rank then starts from RUN_DIR/init, rank 0 without building anything.
    write_done(tmp_path / "run" / "init" / "DONE")
    for rank in (0, 1):
        got = init_parts_once(cfg, tok=None, rank=rank)
        assert got.model.init_from == str(tmp_path / "run" / "init") and got.model.init_parts.qwen is None


WORK_S, COLLECTIVE_TIMEOUT_S = 4.0, 2.0


def _two_ranks(rank: int, port: int, root: str) -> None:
    """Rank 0's work outlasts the group's collective timeout; afterwards both ranks still all-reduce. Then,
    as a control, a plain barrier against the same delay times out on rank 1."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    done, messages = Path(root) / "work" / "DONE", []

    def work():
        time.sleep(WORK_S)
        write_done(done)

    started = time.monotonic()
    run_once_on_rank0(done, work, rank, "a slow job", poll_s=0.1, progress_s=1.0, log=messages.append)
    waited = time.monotonic() - started
    total = torch.tensor([rank + 1.0])
    dist.all_reduce(total)
    control = "no error"
    try:
        if rank == 0:
            time.sleep(WORK_S)
        dist.barrier()
    except RuntimeError as e:  # DistBackendError is one
        control = f"RuntimeError: {e}"
    result = {"waited": waited, "sum": total.item(), "messages": messages, "control": control}
    (Path(root) / f"rank{rank}.json").write_text(json.dumps(result))
    # Out without the C++ teardown: with the group left broken by the timed-out barrier it can abort the
    # process ("terminate called without an active exception", as train.engine.exit_process explains), and no
    # collective could leave the group cleanly now.
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)


def test_two_ranks_wait_past_the_collective_timeout(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_two_ranks, args=(port, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["sum"] for r in ranks] == [3.0, 3.0]
    assert ranks[1]["waited"] >= WORK_S > 2 * COLLECTIVE_TIMEOUT_S - 1
    assert ranks[1]["messages"][0].startswith("rank 1: waiting for rank 0 to finish a slow job (")
    assert 2 <= len(ranks[1]["messages"]) <= 5
    assert ranks[0]["messages"] in (["rank 0: a slow job took 4 s"], ["rank 0: a slow job took 5 s"])
    # The same delay in a barrier: rank 1 fails after the 2 s collective timeout.
    assert ranks[1]["control"].startswith("RuntimeError: ") and "Timed out" in ranks[1]["control"], ranks[1]
