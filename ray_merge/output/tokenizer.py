"""The output's tokenizer files: the merged vocabulary the planner built, or the donor's files as they are.
"""
from __future__ import annotations

import logging
import os
import shutil
from typing import Callable, Optional

from ray_merge.chat_template import write_chat_template
from ray_merge.io.tokenizers import TOKENIZER_FILES
from ray_merge.planner.plan import Plan
from ray_merge.planner.vocab import TokenizerPlan

log = logging.getLogger("ray_merge")


def write_tokenizer(tp: Optional[TokenizerPlan], stage: str, donor_dir: str, copy_tokenizer: bool) -> None:
    """Write the output tokenizer into ``stage``: the merged one the planner built, else (with
    ``copy_tokenizer``) the donor's files, with the recipe's chat template if it sets one."""
    tp = tp or TokenizerPlan(source=None)
    if tp.files is not None:
        for rel, data in sorted(tp.files.items()):
            path = os.path.join(stage, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
        return
    if not copy_tokenizer:
        if tp.chat_template:
            log.warning("chat_template given but --no-copy-tokenizer: no tokenizer, so no template, written")
        return
    copied = False
    for name in TOKENIZER_FILES:
        src = os.path.join(donor_dir, name)
        if os.path.exists(src):
            shutil.copyfile(src, os.path.join(stage, name))
            copied = True
    if tp.chat_template:
        if copied:
            write_chat_template(stage, tp.chat_template)
        else:
            log.warning("chat_template given but the donor model has no tokenizer files; template not written")


def tokenizer_writer(plan: Plan, copy_tokenizer: bool) -> Optional[Callable[[str], None]]:
    """finalize()'s tokenizer_writer for a plan, or None to copy the donor's tokenizer as usual."""
    tp = plan.tokenizer
    if tp is None or (tp.files is None and not tp.chat_template):
        return None
    donor_dir = plan.models[plan.donor].path
    return lambda stage: write_tokenizer(tp, stage, donor_dir, copy_tokenizer)
