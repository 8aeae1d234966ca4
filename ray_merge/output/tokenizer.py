"""The output's tokenizer files: the merged vocabulary the planner built, or the donor's files as they are.
"""
from __future__ import annotations

from typing import Callable, Optional


def tokenizer_writer(plan, copy_tokenizer: bool) -> Optional[Callable[[str], None]]:
    """finalize()'s tokenizer_writer for a plan, or None to copy the donor's tokenizer as usual."""
    tp = getattr(plan, "tokenizer", None)
    if tp is None or (tp.files is None and not tp.chat_template):
        return None
    donor_dir = plan.models[plan.donor].path
    return lambda stage: tp.write(stage, donor_dir, copy_tokenizer)
