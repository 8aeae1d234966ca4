"""Evolutionary merge search: CMA-ES proposes recipes, Ray actors evaluate them in memory with lm-eval.

Modules: config (the search's YAML), genome (vector <-> recipe), evaluator (the Ray evaluator actor and the
HF backend), vllm_backend (the vLLM backend: a worker process in vLLM's own venv), storage (history,
checkpoints, best config), search (the CMA-ES loop and the scheduler), report (plots and summary), demo
(`python -m evolve.demo`: the CPU demonstration).
``ray-merge evolve`` (ray_merge/cli_evolve.py) drives it.
"""
