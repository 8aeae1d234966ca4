"""The `ray-merge` command: one module per command (or per family of commands).

Each module listed in COMMANDS exposes ``add_parser(subparsers)``, which registers its
parsers with a ``func``. Modules import only the options table at import time; a command's
implementation (and torch, Ray, transformers with it) is imported when the command runs, so
``ray-merge --help`` starts fast. Every flag comes from the options table (ray_merge/options.py)
through ray_merge/cli/options.py.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from ray_merge import parallel
from ray_merge.errors import UserError

COMMANDS = [
    "ray_merge.cli.run",  # run
    "ray_merge.cli.plan",  # plan
    "ray_merge.cli.methods",  # methods
    "ray_merge.cli.demo",  # demo
    "ray_merge.cli.jobs",  # submit, status, logs, stop (a merge as a Ray job)
    "ray_merge.cli.lora",  # extract-lora
    "ray_merge.cli.moe",  # moe
    "ray_merge.cli.multi",  # multi
    "ray_merge.cli.evolve",  # evolve (evolutionary merge search, the evolve package)
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ray-merge",
        description="Merge pretrained LLMs with mergekit recipes, in process or across a Ray cluster.",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for mod in COMMANDS:
        importlib.import_module(mod).add_parser(sub)
    return parser


def _version() -> str:
    from ray_merge import __version__

    return f"ray-merge {__version__}"


def _setup_logging(args) -> None:
    level = logging.WARNING
    if getattr(args, "verbose", 0) >= 2:
        level = logging.DEBUG
    elif getattr(args, "verbose", 0) == 1:
        level = logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def _stop_ray() -> None:
    """Disconnect from Ray if an interrupt left it up (the Ray executor and ray_session close their own
    connection on the way out; this stops a local instance that an interrupted start-up left behind)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def main(argv=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parallel.set_thread_defaults()  # before any command imports torch
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args)
    try:
        return args.func(args) or 0
    except UserError as e:
        print(f"ray-merge: error: {e}", file=sys.stderr)
        return UserError.exit_code
    except KeyboardInterrupt as e:
        # Ctrl-C, or SIGTERM/SIGHUP while a local Ray instance ran (an Interrupted, with its exit code)
        _stop_ray()
        how = f"stopped by {e}" if str(e) else "interrupted"
        print(f"ray-merge: {how}; rerun with --resume to continue", file=sys.stderr)
        return getattr(e, "exit_code", 130)
    except BrokenPipeError:  # `ray-merge methods | head`: the reader has gone, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:
        # disk full, permission denied while writing, ...: name the file, no traceback
        where = f" {e.filename}" if getattr(e, "filename", None) else ""
        print(f"ray-merge: error:{where} {e.strerror or e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
