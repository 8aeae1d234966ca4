"""The vLLM backend: candidates scored by a vLLM engine loaded once, its weights swapped in place.

vLLM and lm-eval are not installed together: vLLM pins its own torch and transformers, which is what breaks
mergekit-evolve's environments. Here vLLM runs in its own virtual environment — a worker process
(evolve/backends/vllm_worker.py) started with that venv's python — and everything else (ray-merge, lm-eval)
stays in the main one:

- at start-up the evaluator writes the first candidate once (config, safetensors, tokenizer) and the worker
  creates ``vllm.LLM`` on it, with ``worker_extension_cls`` for weight updates;
- per candidate, the merged state dict goes to a safetensors file in /dev/shm and the worker loads it into
  the running engine with ``llm.collective_rpc(...)`` -> ``model_runner.model.load_weights(weights=...)``
  (vLLM's documented in-place update route, as in its RLHF examples), then resets the prefix cache;
- lm-eval scores the engine through ``VLLMWorkerLM``, an lm-eval ``TemplateLM`` whose requests go to the
  worker. lm-eval's own ``VLLM`` model type cannot be used: it builds its own ``vllm.LLM`` from a path and
  imports vllm in lm-eval's process (see lm_eval/models/vllm_causallms.py), which is exactly the shared
  environment this backend avoids. Prompts are tokenized here with the model's Hugging Face tokenizer, as
  ``HFLM`` does, and sent to vLLM as token ids; generated token ids are decoded here too, so both backends
  see the same text.

Which python runs vLLM: ``evaluation.vllm_python``, else $RAY_MERGE_VLLM_PYTHON, else ``.venv-vllm/bin/python``
in the repository.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from typing import Any, Optional

from lm_eval.api.model import TemplateLM

from evolve.backends.common import tokenizer_dir
from evolve.scoring import run_lm_eval, task_manager

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vllm_worker.py")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# model_args this module's LM takes; the rest go to vllm.LLM(...)
LM_ARGS = ("add_bos_token", "max_gen_toks", "max_length", "batch_size")


def vllm_python(configured: Optional[str] = None) -> str:
    for cand in (configured, os.environ.get("RAY_MERGE_VLLM_PYTHON"),
                 os.path.join(REPO, ".venv-vllm", "bin", "python")):
        if cand and os.path.exists(cand):
            return cand
    raise FileNotFoundError(
        "no python with vLLM: set evaluation.vllm_python or $RAY_MERGE_VLLM_PYTHON to the python of a venv "
        "holding vllm (on CPU: bash scripts/install_vllm_venv.sh .venv-vllm)")


class VLLMWorker:
    """The worker process in vLLM's venv, and the socket to it.

    The worker script runs from a private directory that holds a copy of it and the socket, and nothing
    else: that directory is the worker's only path into this project (vLLM's engine processes import
    ``vllm_worker.WeightSwapExtension`` from it). Run from evolve/backends/ itself, this package's
    ``vllm.py`` would shadow the real vllm.
    """

    def __init__(self, python: str, scratch: str, env: Optional[dict] = None, start_timeout: float = 600.0):
        from multiprocessing.connection import Listener

        self.scratch = scratch
        self.log_path = os.path.join(scratch, "vllm_worker.log")
        self.run_dir = tempfile.mkdtemp(prefix="rmv-", dir="/tmp")  # AF_UNIX socket paths must be short
        sock = os.path.join(self.run_dir, "s")
        script = shutil.copy(WORKER, os.path.join(self.run_dir, "vllm_worker.py"))
        key = secrets.token_bytes(16)
        self.listener = Listener(sock, family="AF_UNIX", authkey=key)
        full_env = dict(os.environ)
        full_env.update(env or {})
        full_env["RAY_MERGE_VLLM_ADDRESS"] = sock
        full_env["RAY_MERGE_VLLM_AUTHKEY"] = key.hex()
        full_env["PYTHONPATH"] = self.run_dir  # vLLM's workers import vllm_worker.WeightSwapExtension
        full_env.pop("PYTHONHOME", None)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([python, script], env=full_env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=scratch, start_new_session=True)
        self.conn = None
        box: dict = {}
        t = threading.Thread(target=lambda: box.setdefault("conn", self.listener.accept()), daemon=True)
        t.start()
        deadline = time.time() + start_timeout
        while t.is_alive() and time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the vLLM worker exited ({self.proc.returncode}) at start: {self.log_tail()}")
            t.join(0.2)
        if "conn" not in box:
            self.close()
            raise RuntimeError("the vLLM worker did not connect in time")
        self.conn = box["conn"]

    def log_tail(self, n: int = 600) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, 2)
                f.seek(max(0, f.tell() - 4000))
                lines = [ln for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
            return " | ".join(lines[-4:])[-n:]
        except OSError:
            return ""

    def call(self, cmd: str, payload: Any = None, timeout: Optional[float] = None) -> Any:
        self.conn.send((cmd, payload))
        deadline = None if timeout is None else time.time() + timeout
        while not self.conn.poll(0.5):
            if self.proc.poll() is not None:
                raise RuntimeError(f"the vLLM worker died ({self.proc.returncode}) during {cmd}: {self.log_tail()}")
            if deadline is not None and time.time() > deadline:
                raise TimeoutError(f"the vLLM worker did not answer {cmd} within {timeout}s")
        status, result = self.conn.recv()
        if status != "ok":
            last = [ln for ln in str(result).strip().splitlines() if ln.strip()]
            raise RuntimeError(f"vLLM worker, {cmd}: {last[-1] if last else result}")
        return result

    def close(self) -> None:
        try:
            if self.conn is not None and self.proc.poll() is None:
                self.call("close", timeout=60)
        except Exception:  # noqa: BLE001
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        for c in (self.conn, self.listener):
            try:
                if c is not None:
                    c.close()
            except Exception:  # noqa: BLE001
                pass
        self._log.close()
        shutil.rmtree(self.run_dir, ignore_errors=True)


class VLLMWorkerLM(TemplateLM):
    """lm-eval's view of the vLLM engine in the worker process."""

    def __init__(self, worker: VLLMWorker, tokenizer, max_length: int, add_bos_token: bool = False,
                 max_gen_toks: int = 256, batch_size: Any = None):
        super().__init__()
        self.worker = worker
        self.tokenizer = tokenizer
        self._max_length = max_length
        self.add_bos_token = add_bos_token
        self.max_gen_toks = max_gen_toks
        self.chunk = 4096 if batch_size in (None, "auto") else max(int(batch_size), 1) * 64

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "tokenizer")).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, left_truncate_len=None,
                   **kwargs) -> list[int]:
        special = self.add_bos_token if add_special_tokens is None else add_special_tokens
        ids = self.tokenizer.encode(string, add_special_tokens=bool(special))
        if left_truncate_len:
            ids = ids[-left_truncate_len:]
        return ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        payload = []
        for _, ctx, cont in requests:
            ids = (list(ctx) + list(cont))[-self.max_length:]
            payload.append((ids, min(len(cont), len(ids) - 1)))
        out = []
        for i in range(0, len(payload), self.chunk):
            out += [tuple(r) for r in self.worker.call("loglikelihood", payload[i:i + self.chunk])]
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for (string,) in [r.args for r in requests]:
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(string, add_special_tokens=False), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            res = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows])
            out.append(sum(lp for lp, _ in res))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from lm_eval.models.utils import (
            handle_stop_sequences,
            normalize_gen_kwargs,
            postprocess_generated_text,
        )

        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        prompts, params, stops = [], [], []
        for context, gen_kwargs in [r.args for r in requests]:
            kw = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            until = handle_stop_sequences(kw.pop("until", None), eos=eos)
            max_gen = int(kw.pop("max_gen_toks"))
            do_sample = bool(kw.pop("do_sample", False))
            temperature = float(kw.pop("temperature", 0.0) or 0.0)
            sp = {"max_tokens": max_gen, "stop": until, "temperature": temperature if do_sample else 0.0}
            for k in ("top_p", "top_k", "seed", "min_p", "repetition_penalty"):
                if k in kw:
                    sp[k] = kw[k]
            prompts.append(self.tok_encode(context, left_truncate_len=self.max_length - max_gen))
            params.append(sp)
            stops.append(until)
        texts = []
        for i in range(0, len(prompts), self.chunk):
            for ids in self.worker.call("generate", (prompts[i:i + self.chunk], params[i:i + self.chunk])):
                texts.append(self.tok_decode(ids))
        return [postprocess_generated_text(t, s, None) for t, s in zip(texts, stops)]


class VLLMBackend:
    """Evaluator backend (see evolve.backends.make_backend)."""

    name = "vllm"

    def __init__(self, ev: dict, tasks: list[dict], plan, first_sd: dict, scratch: str):
        from transformers import AutoTokenizer

        self.ev = ev
        self.tasks = tasks
        self.scratch = scratch
        self.device = "vllm"
        model_dir = os.path.join(scratch, "model")
        self._write_model(model_dir, plan, first_sd, scratch)
        args = dict(ev.get("model_args") or {})
        lm_args = {k: args.pop(k) for k in LM_ARGS if k in args}
        cfg = plan.out_config
        max_len = int(lm_args.get("max_length") or cfg.get("max_position_embeddings") or 2048)
        llm_kwargs = {"model": model_dir, "tokenizer": model_dir, "dtype": ev.get("dtype", "float32"),
                      "seed": 0, "enforce_eager": True, "max_model_len": max_len}
        llm_kwargs.update(args)
        env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
               "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind"),
               "OMP_NUM_THREADS": str(ev.get("torch_threads") or max(1, int(ev.get("num_cpus") or 1))),
               "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
               "TOKENIZERS_PARALLELISM": "false"}
        self.worker = VLLMWorker(vllm_python(ev.get("vllm_python")), scratch, env)
        try:
            self.info = self.worker.call("init", llm_kwargs)
        except Exception:
            self.worker.close()
            raise
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.lm = VLLMWorkerLM(self.worker, self.tokenizer, max_len,
                               add_bos_token=bool(lm_args.get("add_bos_token", False)),
                               max_gen_toks=int(lm_args.get("max_gen_toks", 256)),
                               batch_size=lm_args.get("batch_size", ev.get("batch_size")))
        self.tm = task_manager(ev.get("include_paths") or [], [t["name"] for t in tasks])
        self._n = 0

    @staticmethod
    def _write_model(model_dir: str, plan, sd: dict, scratch: str) -> None:
        """The first candidate, once: what vLLM loads its engine from."""
        from safetensors.torch import save_file

        os.makedirs(model_dir, exist_ok=True)
        with open(os.path.join(model_dir, "config.json"), "w") as f:
            json.dump(plan.out_config, f, indent=1)
        save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(model_dir, "model.safetensors"))
        tok = tokenizer_dir(plan, scratch)
        donor = plan.models[plan.donor].path
        for src in (tok, donor):
            for name in os.listdir(src):
                if (name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "added_tokens",
                                     "chat_template", "generation_config"))
                        and not os.path.exists(os.path.join(model_dir, name))):
                    shutil.copy(os.path.join(src, name), os.path.join(model_dir, name))

    def load(self, sd: dict) -> None:
        from safetensors.torch import save_file

        self._n += 1
        shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else self.scratch
        path = os.path.join(shm, f"rm-vllm-{os.getpid()}-{self._n}.safetensors")
        try:
            save_file({k: v.contiguous() for k, v in sd.items()}, path)
            self.worker.call("load", path)
        finally:
            try:
                os.unlink(path)
            except OSError:
                pass

    def score(self, subsample=None) -> dict[str, float]:
        """``subsample``: the draw of examples to score on (evolve.subsample); None: the full sets."""
        return run_lm_eval(self.lm, self.tasks, self.ev, self.tm, subsample)

    def close(self) -> None:
        self.worker.close()
