"""The evaluator's backends: what scores a candidate once it is merged in memory.

- ``hf`` (evolve.backends.hf): lm-eval's ``HFLM`` on a ``transformers`` model, weights swapped with
  ``load_state_dict``;
- ``vllm`` (evolve.backends.vllm): a vLLM engine in vLLM's own venv (evolve/backends/vllm_worker.py runs
  there), weights swapped in place.

Each takes the first candidate at start-up, then ``load(state_dict)`` per candidate, ``score()`` and
``close()``.
"""
from __future__ import annotations

from evolve.backends.hf import HFBackend
from evolve.backends.vllm import VLLMBackend

BACKENDS = {"hf": HFBackend, "vllm": VLLMBackend}


def make_backend(ev: dict, tasks: list[dict], plan, first_sd: dict, scratch: str):
    return BACKENDS[ev.get("backend", "hf")](ev, tasks, plan, first_sd, scratch)
