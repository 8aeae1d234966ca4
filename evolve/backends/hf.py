"""The ``hf`` backend: lm-eval's ``HFLM`` on a ``transformers`` model instantiated once per evaluator."""
from __future__ import annotations

import torch

from evolve.backends.common import resolve_device, tokenizer_dir
from evolve.scoring import run_lm_eval, task_manager


class HFBackend:
    """lm-eval's HFLM on a transformers model instantiated once; candidates are swapped in with
    ``load_state_dict``."""

    name = "hf"

    def __init__(self, ev: dict, tasks: list[dict], plan, first_sd: dict, scratch: str):
        from lm_eval.models.huggingface import HFLM
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        self.ev = ev
        self.tasks = tasks
        self.device = resolve_device(ev.get("device", "auto"))
        cfg_dict = dict(plan.out_config)
        model_type = cfg_dict.pop("model_type")
        config = AutoConfig.for_model(model_type, **cfg_dict)
        dtype_name = ev.get("dtype", "float32")
        dtype = getattr(torch, dtype_name) if dtype_name != "auto" else next(iter(first_sd.values())).dtype
        model = AutoModelForCausalLM.from_config(config).to(dtype)
        self.model = model.to(self.device).eval()
        model_keys = set(self.model.state_dict())
        unexpected = sorted(set(first_sd) - model_keys)
        if unexpected:
            raise ValueError(f"merged tensors the model does not have: {unexpected[:3]}")
        self.allowed_missing = model_keys - set(first_sd)  # tied weights and non-persistent buffers
        self.load(first_sd)
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir(plan, scratch))
        args = dict(ev.get("model_args") or {})
        self.lm = HFLM(pretrained=self.model, tokenizer=self.tokenizer, batch_size=ev.get("batch_size", 32), **args)
        self.tm = task_manager(ev.get("include_paths") or [], [t["name"] for t in tasks])

    def load(self, sd: dict) -> None:
        with torch.no_grad():
            missing, unexpected = self.model.load_state_dict(sd, strict=False)
        bad = set(missing) - self.allowed_missing
        if unexpected or bad:
            raise ValueError(f"candidate state dict does not fit the model: missing {sorted(bad)[:3]}, "
                             f"unexpected {sorted(unexpected)[:3]}")
        if self.allowed_missing and hasattr(self.model, "tie_weights"):
            self.model.tie_weights()

    def score(self, subsample=None) -> dict[str, float]:
        """``subsample``: the draw of examples to score on (evolve.subsample); None: the full sets."""
        return run_lm_eval(self.lm, self.tasks, self.ev, self.tm, subsample)

    def close(self) -> None:
        pass
