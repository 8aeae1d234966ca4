"""Run one tool on many recipes in one process, to pay for importing torch and transformers once.

    python batch.py mergekit  CONFIG OUT [CONFIG OUT ...]   # with the mergekit side venv's python
    python batch.py ray-merge CONFIG OUT [CONFIG OUT ...]   # with the project's python

Each merge is the tool's own command line called in process (``mergekit-yaml CONFIG OUT --random-seed 0``,
``ray-merge run CONFIG OUT --random-seed 0 --quiet``). Beside each OUT it writes OUT.log (what the tool
printed) and OUT.rc (its exit status: 0, or 1 for an exception). compare.py's ``check_batch`` reads them.
A merge that fails leaves no OUT behind.
"""
from __future__ import annotations

import os
import shutil
import sys
import traceback


def _mergekit(config: str, out: str) -> int:
    from mergekit.scripts.run_yaml import main

    main.main(args=[config, out, "--random-seed", "0"], standalone_mode=False)
    return 0


def _ray_merge(config: str, out: str) -> int:
    from ray_merge.cli import main

    return main(["run", config, out, "--random-seed", "0", "--quiet"])


def run_one(tool, config: str, out: str) -> int:
    """Run ``tool`` with fds 1 and 2 going to OUT.log; return its exit status."""
    shutil.rmtree(out, ignore_errors=True)
    sys.stdout.flush(), sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(out + ".log", "w") as log:
        os.dup2(log.fileno(), 1), os.dup2(log.fileno(), 2)
        try:
            rc = tool(config, out) or 0
        except SystemExit as e:  # a command line that exits
            rc = e.code if isinstance(e.code, int) else 1
        except BaseException:  # noqa: BLE001 - any failure is this recipe's, not the batch's
            traceback.print_exc()
            rc = 1
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])
    if rc != 0:
        shutil.rmtree(out, ignore_errors=True)
    with open(out + ".rc", "w") as f:
        f.write(f"{rc}\n")
    return rc


def main(argv: list[str]) -> int:
    if len(argv) < 3 or len(argv) % 2 != 1 or argv[0] not in ("mergekit", "ray-merge"):
        raise SystemExit(__doc__.split("\n\n")[1])
    tool = _mergekit if argv[0] == "mergekit" else _ray_merge
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for config, out in zip(argv[1::2], argv[2::2]):
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        print(f"{os.path.basename(out)}: exit {run_one(tool, config, out)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
