"""Evolutionary merge search: CMA-ES proposes recipes, Ray actors evaluate them in memory with lm-eval.

Modules, from the bottom up: config (the search's YAML), scoring (lm-eval runs and the combined score),
genome (vector <-> recipe), backends (what scores a merged candidate: ``hf``, or ``vllm`` in vLLM's own venv),
evaluator (the Ray evaluator actor and candidate building), searcher (CMA-ES: ask / tell, its checkpoint
state), storage (history, checkpoints, best config), report (plots and summary), search (the generation
loop: candidates to evaluators, history, checkpoints, resume), demo_models / demo_eval / demo
(``python -m evolve.demo``: the CPU demonstration).
``ray-merge evolve`` (ray_merge/cli/evolve.py) drives it.
"""
