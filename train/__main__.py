"""`python -m train RECIPE.yaml [dotted.key=value ...] [stages=[name,...]] [--print-config]`.

A recipe with `stages` runs as a curriculum (train.curriculum); `stages=[name]` runs only those stages.
"""
from __future__ import annotations

import argparse
import json
import sys

from launch.accelerate import accelerate_overrides, check_accelerate_processes
from train.curriculum import plan, run_curriculum
from train.engine import deepspeed_config, shutdown_distributed
from train.lifeline import stay_with_torchrun
from train.loop import run
from train.recipe import ConfigError, load_config, stage_config, to_yaml


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__)
    parser.add_argument("recipe", help="recipe YAML (see recipes/)")
    parser.add_argument("overrides", nargs="*",
                        help="dotted.key=value overrides, e.g. optim.lr=1e-4; stages=[name] runs only that stage")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config and the generated DeepSpeed JSON (per stage), then exit")
    args = parser.parse_args(argv)
    stay_with_torchrun()  # a rank torchrun started dies with it, even in a session of its own
    try:
        # Started by `accelerate launch`: its settings (processes, DeepSpeed stage, precision) become overrides
        # that the command line's own still override.
        check_accelerate_processes()
        cfg = load_config(args.recipe, accelerate_overrides() + list(args.overrides))
        if cfg.stages:
            plan(cfg)  # a selected stage whose starting export is missing fails here, before any work
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(to_yaml(cfg), end="")
        resolved = [(f"stage {i} {s.name}: ", stage_config(cfg, i)) for i, s in enumerate(cfg.stages)]
        for label, one in resolved or [("", cfg)]:
            if label:
                print(f"# {label}resolved config:")
                print(to_yaml(one), end="")
            print(f"# {label}deepspeed:")
            print(json.dumps(deepspeed_config(one), indent=2))
        return 0
    if cfg.stages:
        run_curriculum(cfg)
    else:
        run(cfg)
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    from train.engine import exit_process

    exit_process(main())  # not sys.exit: see train.engine.exit_process
