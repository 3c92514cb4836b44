"""`python -m train RECIPE.yaml [dotted.key=value ...] [--print-config]`."""
from __future__ import annotations

import argparse
import json
import sys

from train.config import ConfigError, deepspeed_config, load_config, to_yaml


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__)
    parser.add_argument("recipe", help="recipe YAML (see recipes/)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. optim.lr=1e-4")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config and the generated DeepSpeed JSON, then exit")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.recipe, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(to_yaml(cfg), end="")
        print("# deepspeed:")
        print(json.dumps(deepspeed_config(cfg), indent=2))
        return 0
    from train.loop import run

    run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
