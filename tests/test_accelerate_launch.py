"""`accelerate launch` as a launcher on two CPU processes: its torchrun path (`--multi_gpu`) and a DeepSpeed
config file train the same two ranks as torchrun; what its environment says becomes config overrides, and
a process it started alone although two were asked for is recognised."""
from __future__ import annotations

import json
import socket
import sys
import textwrap
from pathlib import Path

import pytest

from launch.accelerate import accelerate_overrides, check_accelerate_processes
from tests.conftest import REPO, data_overrides, run_cli

ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
CPU = {"STEPAUDIO_DEVICE": "cpu", "CUDA_VISIBLE_DEVICES": ""}
DEEPSPEED_CONFIG = textwrap.dedent("""\
    compute_environment: LOCAL_MACHINE
    distributed_type: DEEPSPEED
    deepspeed_config:
      zero_stage: 2
      gradient_accumulation_steps: 1
      zero3_init_flag: false
    mixed_precision: 'no'
    num_machines: 1
    machine_rank: 0
    use_cpu: false
    """)


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def train_args(run_dir: Path, data: dict, *overrides: str) -> list:
    return ["-m", "train", "recipes/demo/asr.yaml", f"run_dir={run_dir}", *data_overrides(data), "model.preset=tiny",
            "data.batch_size=2", "data.num_workers=1", "eval.shards=[]", "optim.warmup_steps=2",
            "optim.decay_steps=6", "metrics.log_every=1", "checkpoint.export=false", "checkpoint.every_steps=4",
            "max_steps=4", *overrides]


def losses(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="module")
def torchrun_losses(espeak_data, tmp_path_factory) -> dict:
    run_dir = tmp_path_factory.mktemp("torchrun") / "run"
    run_cli(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            *train_args(run_dir, espeak_data), env=CPU)
    return losses(run_dir)


def test_accelerate_multi_gpu_path_trains_two_cpu_ranks_like_torchrun(espeak_data, torchrun_losses, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", free_port(),
                   *train_args(run_dir, espeak_data), env=CPU)
    assert "device cpu, fp32, ZeRO-0" in proc.stdout + proc.stderr
    assert losses(run_dir) == torchrun_losses and sorted(torchrun_losses) == [1, 2, 3, 4]
    step_dir = run_dir / "checkpoints" / "step_00000004"
    assert sorted(p.name for p in step_dir.glob("rank_*.pt")) == ["rank_00000.pt", "rank_00001.pt"]


def test_accelerate_deepspeed_config_trains_two_zero2_cpu_ranks(espeak_data, torchrun_losses, tmp_path):
    (tmp_path / "ds.yaml").write_text(DEEPSPEED_CONFIG)
    run_dir = tmp_path / "run"
    # The zero stage is given twice until `python -m train` applies accelerate_overrides (see README).
    proc = run_cli(ACCELERATE, "launch", "--config_file", str(tmp_path / "ds.yaml"), "--num_processes", "2",
                   "--main_process_port", free_port(), *train_args(run_dir, espeak_data, "engine.zero_stage=2"),
                   env=CPU)
    assert "device cpu, fp32, ZeRO-2" in proc.stdout + proc.stderr
    step_dir = run_dir / "checkpoints" / "step_00000004"
    assert len(list(step_dir.glob("*zero_pp_rank_*_optim_states.pt"))) == 2  # optimizer state split over 2 ranks
    got = losses(run_dir)
    assert sorted(got) == [1, 2, 3, 4]
    assert all(abs(got[s] - torchrun_losses[s]) < 1e-5 for s in got), (got, torchrun_losses)


def test_accelerate_environment_becomes_overrides_and_a_lone_process_is_refused(tmp_path):
    (tmp_path / "ds.yaml").write_text(DEEPSPEED_CONFIG)
    probe = tmp_path / "probe.py"
    probe.write_text(textwrap.dedent("""
        import json, os
        from launch.accelerate import accelerate_overrides, check_accelerate_processes
        try:
            check_accelerate_processes()
            lone = None
        except ValueError as e:
            lone = str(e)
        record = {"rank": os.environ.get("RANK"), "overrides": accelerate_overrides(), "lone": lone}
        with open(os.path.join(os.environ["PROBE_DIR"], f"{os.getpid()}.json"), "w") as f:
            json.dump(record, f)
        """))
    runs = iter(range(100))

    def probe_run(*launch_args: str) -> list:
        # One file per process: two ranks printing to one pipe can interleave their lines.
        out = tmp_path / f"probe_{next(runs)}"
        out.mkdir()
        env = {**CPU, "PYTHONPATH": str(REPO), "PROBE_DIR": str(out)}
        run_cli(ACCELERATE, "launch", *launch_args, "--main_process_port", free_port(), str(probe), env=env)
        return sorted((json.loads(p.read_text()) for p in out.glob("*.json")), key=lambda r: str(r["rank"]))

    ds = probe_run("--config_file", str(tmp_path / "ds.yaml"), "--num_processes", "2")
    assert [r["rank"] for r in ds] == ["0", "1"] and {r["lone"] for r in ds} == {None}
    assert all(r["overrides"] == ["engine.zero_stage=2", "engine.grad_accum_steps=1"] for r in ds)
    bf16 = probe_run("--multi_gpu", "--num_processes", "2", "--mixed_precision", "bf16")
    assert [(r["rank"], r["overrides"], r["lone"]) for r in bf16] == [("0", ["engine.precision=bf16"], None),
                                                                      ("1", ["engine.precision=bf16"], None)]
    # No GPUs and no --multi_gpu: accelerate starts one process for --num_processes 2.
    lone = probe_run("--num_processes", "2")
    assert len(lone) == 1 and lone[0]["rank"] is None and "add --multi_gpu" in lone[0]["lone"].lower()
    single = probe_run("--num_processes", "1")
    assert len(single) == 1 and single[0]["lone"] is None

    # What accelerate can say that this framework takes elsewhere: refused, naming the variable.
    base = {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_USE_DEEPSPEED": "true"}
    with pytest.raises(ValueError, match=r"ACCELERATE_DEEPSPEED_CONFIG_FILE='ds.json' .*under engine.deepspeed"):
        accelerate_overrides({**base, "ACCELERATE_DEEPSPEED_CONFIG_FILE": "ds.json"})
    with pytest.raises(ValueError, match=r"--mixed_precision fp16 .*fp32 or bf16"):
        accelerate_overrides({"ACCELERATE_MIXED_PRECISION": "fp16"})
    assert accelerate_overrides({**base, "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "none",
                                 "ACCELERATE_GRADIENT_CLIPPING": "0.5"}) == ["optim.grad_clip=0.5"]
    assert accelerate_overrides({}) == [] and check_accelerate_processes({"MASTER_ADDR": "x"}) is None
