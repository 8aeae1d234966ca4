"""What every backend needs: where the model is scored, and the candidates' tokenizer."""
from __future__ import annotations

import os

from ray_merge.devices import resolve_device  # noqa: F401  (the one device resolution, shared with ray-merge)
from ray_merge.output.tokenizer import tokenizer_writer


def tokenizer_dir(plan, scratch: str) -> str:
    """Where the candidates' tokenizer is: the donor's, or the one the recipe's tokenizer settings build."""
    writer = tokenizer_writer(plan, True)
    if writer is None:
        return plan.models[plan.donor].path
    out = os.path.join(scratch, "tokenizer")
    os.makedirs(out, exist_ok=True)
    writer(out)
    return out
