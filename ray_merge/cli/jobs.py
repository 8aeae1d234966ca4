"""`ray-merge submit`, `ray-merge status`, `ray-merge logs`, `ray-merge stop`: a merge as a Ray job.

`submit` ships the recipe (its local model paths made absolute) in the job's
runtime_env working_dir and runs ``ray-merge run RECIPE OUT --address auto ...`` as
the job's entrypoint on the cluster's head node; the run's workers are Ray actors
on the cluster's nodes. Inputs and the output must be paths every node sees (or hub
ids). Plain ``ray job submit -- ray-merge run RECIPE OUT --address auto --workers N``
works the same way.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time

from ray_merge.cli.run import add_merge_flags, add_run_flags
from ray_merge.errors import UserError

DEFAULT_DASHBOARD = "http://127.0.0.1:8265"


TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


MODEL_KEYS = ("model", "base_model", "tokenizer_source", "source")


ADDRESS_HELP = ("the cluster's dashboard (job API), e.g. http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS, "
                f"an http $RAY_ADDRESS, or {DEFAULT_DASHBOARD})")


def _add_address(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None, metavar="URL", help=ADDRESS_HELP)


def add_parser(sub) -> None:
    p = sub.add_parser("submit", help="run a merge as a Ray job on a cluster; prints the job id",
                       description="Submit `ray-merge run RECIPE OUT --address auto [options]` as a Ray job. "
                                   "The recipe is shipped with the job; model paths and OUT must be visible "
                                   "on the cluster's nodes.")
    _add_run_arguments(p, address_help=ADDRESS_HELP)  # its --address is, here, the dashboard URL
    p.add_argument("--job-id", default=None, help="submission id to use (default: Ray picks one)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the job and its workers, e.g. HF_TOKEN=... (repeatable)")
    p.add_argument("--wait", action="store_true", help="wait for the job to end, print its logs; exit 1 if it failed")
    p.set_defaults(func=cmd_submit)

    st = sub.add_parser("status", help="the status of a submitted merge job")
    st.add_argument("job_id")
    _add_address(st)
    st.add_argument("--wait", action="store_true", help="wait until the job has ended")
    st.set_defaults(func=cmd_status)

    lg = sub.add_parser("logs", help="the logs of a submitted merge job")
    lg.add_argument("job_id")
    _add_address(lg)
    lg.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    lg.set_defaults(func=cmd_logs)

    sp = sub.add_parser("stop", help="stop a submitted merge job (rerun with --resume to finish it)")
    sp.add_argument("job_id")
    _add_address(sp)
    sp.set_defaults(func=cmd_stop)


def _add_run_arguments(p, address_help=None) -> None:
    """`run`'s arguments, as `submit` takes them (and forwards them to the job's `run`)."""
    p.add_argument("recipe", help="mergekit-style YAML recipe")
    add_merge_flags(p)
    add_run_flags(p)
    for action in p._actions:
        if action.dest == "address" and address_help:
            action.help, action.metavar = address_help, "URL"


# ---------------------------------------------------------------------------------------------


def dashboard_address(address) -> str:
    if address:
        return address
    env = os.environ.get("RAY_API_SERVER_ADDRESS")
    if env:
        return env
    env = os.environ.get("RAY_ADDRESS", "")
    if env.startswith(("http://", "https://")):
        return env
    return DEFAULT_DASHBOARD


def _auth_from_env() -> None:
    """Use token authentication when a token is at hand and the mode is unset (Ray 2.60's clusters
    enable it by default, and its clients only send the token with RAY_AUTH_MODE=token)."""
    if os.environ.get("RAY_AUTH_MODE"):
        return
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or os.path.isfile(path):
        if "ray" not in sys.modules:
            os.environ["RAY_AUTH_MODE"] = "token"


def client(address):
    _auth_from_env()
    url = dashboard_address(address)
    try:
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(url)
    except Exception as e:  # connection refused, bad URL, authentication
        raise UserError(_explain(e, url))


def _explain(e: Exception, url: str) -> str:
    msg = " ".join(str(e).split())
    if type(e).__name__ == "AuthenticationError" or "authentication" in msg.lower():
        return (f"the Ray cluster at {url} wants a token: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or "
                f"~/.ray/auth_token) to the cluster's token ({msg[:160]})")
    return f"cannot reach the Ray job API at {url}: {msg[:300]}"


def _call(fn, url: str, *a, **kw):
    try:
        return fn(*a, **kw)
    except RuntimeError as e:
        if "does not exist" in str(e) or "not found" in str(e).lower():
            raise UserError(f"no such job at {url}: {' '.join(str(e).split())[:200]}")
        raise UserError(_explain(e, url))
    except Exception as e:
        if type(e).__name__ in ("AuthenticationError", "ConnectionError", "ClientConnectorError"):
            raise UserError(_explain(e, url))
        raise


def ship_recipe(path: str, overrides: list[str], dest_dir: str) -> str:
    """Copy the recipe into ``dest_dir`` with local model paths made absolute; return its file name."""
    import yaml

    from ray_merge.recipe.load import load_recipe

    load_recipe(path, overrides)  # a bad recipe fails here, not on the cluster
    with open(path) as f:
        data = yaml.safe_load(f)

    def fix(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k in MODEL_KEYS and isinstance(v, str) and not os.path.isabs(v) and os.path.isdir(v):
                    node[k] = os.path.abspath(v)
                else:
                    fix(v)
        elif isinstance(node, list):
            for v in node:
                fix(v)

    fix(data)
    name = os.path.basename(path) or "recipe.yml"
    with open(os.path.join(dest_dir, name), "w") as f:
        yaml.safe_dump(data, f, sort_keys=False)
    return name


def forwarded_run_args(args) -> list[str]:
    """`run` options given to `submit` (non-default values), as command-line words."""
    ref = argparse.ArgumentParser(add_help=False)
    _add_run_arguments(ref)
    words: list[str] = []
    for a in ref._actions:
        if not a.option_strings or a.dest in ("address", "help"):
            continue
        value = getattr(args, a.dest, a.default)
        default = a.default
        if isinstance(default, str) and a.type is not None and value is not None and not isinstance(value, str):
            default = a.type(default)  # e.g. --out-shard-size's "5B" default, parsed
        if value == default:
            continue
        longs = [o for o in a.option_strings if o.startswith("--")] or a.option_strings
        opt = longs[0]
        if isinstance(a, argparse.BooleanOptionalAction):
            words.append(opt if value else "--no-" + opt[2:])
        elif isinstance(a, argparse._StoreTrueAction):
            words.append(opt)
        elif isinstance(a, argparse._StoreFalseAction):
            words.append(opt)
        elif isinstance(a, argparse._CountAction):
            words += [opt] * int(value or 0)
        elif isinstance(a, argparse._AppendAction):
            for v in value or []:
                words += [opt, str(v)]
        elif value is not None:
            words += [opt, str(value)]
    return words


def cmd_submit(args) -> int:
    url = dashboard_address(args.address)
    env_vars = {}
    for item in args.env:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise UserError(f"--env takes KEY=VALUE, got {item!r}")
        env_vars[k] = v
    ship = tempfile.mkdtemp(prefix="ray-merge-job-")
    try:
        name = ship_recipe(args.recipe, args.overrides, ship)
        out = os.path.abspath(args.out)
        entry = ["ray-merge", "run", name, out, "--address", "auto", *forwarded_run_args(args)]
        entrypoint = shlex.join(entry)
        runtime_env = {"working_dir": ship}
        if env_vars:
            runtime_env["env_vars"] = env_vars
        c = client(args.address)
        job_id = _call(c.submit_job, url, entrypoint=entrypoint, runtime_env=runtime_env,
                       submission_id=args.job_id)
    finally:
        import shutil

        shutil.rmtree(ship, ignore_errors=True)
    print(job_id)
    print(f"submitted: {entrypoint}\n  status: ray-merge status {job_id} --address {url}\n"
          f"  logs:   ray-merge logs {job_id} --address {url} --follow", file=sys.stderr)
    if args.wait:
        status = _wait(c, url, job_id)
        print(_call(c.get_job_logs, url, job_id), end="")
        print(f"{job_id}: {status}", file=sys.stderr)
        return 0 if status == "SUCCEEDED" else 1
    return 0


def _wait(c, url: str, job_id: str, poll: float = 1.0) -> str:
    while True:
        status = str(getattr(_call(c.get_job_status, url, job_id), "value", None) or
                     _call(c.get_job_status, url, job_id))
        if status in TERMINAL:
            return status
        time.sleep(poll)


def cmd_status(args) -> int:
    url = dashboard_address(args.address)
    c = client(args.address)
    if args.wait:
        _wait(c, url, args.job_id)
    info = _call(c.get_job_info, url, args.job_id)
    status = getattr(info.status, "value", str(info.status))
    print(f"{args.job_id}: {status}")
    if info.message:
        print(f"  {info.message}")
    if info.entrypoint:
        print(f"  entrypoint: {info.entrypoint}")
    return 0


def cmd_logs(args) -> int:
    url = dashboard_address(args.address)
    c = client(args.address)
    if not args.follow:
        print(_call(c.get_job_logs, url, args.job_id), end="")
        return 0
    import asyncio

    async def tail():
        async for chunk in c.tail_job_logs(args.job_id):
            print(chunk, end="", flush=True)

    try:
        asyncio.run(tail())
    except Exception as e:
        raise UserError(_explain(e, url))
    return 0


def cmd_stop(args) -> int:
    url = dashboard_address(args.address)
    c = client(args.address)
    stopped = _call(c.stop_job, url, args.job_id)
    print(f"{args.job_id}: {'stopping' if stopped else 'already ended'}")
    return 0
