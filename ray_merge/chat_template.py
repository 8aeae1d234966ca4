"""Chat templates for the merged tokenizer: the recipe's ``chat_template`` field.

``chat_template`` is ``auto`` (the template most input models share), the name of a
built-in template (alpaca, chatml, llama3, mistral, exaone) or a literal Jinja
template. Literal and built-in templates are checked at recipe load by rendering a
sample conversation in a sandboxed Jinja environment, so a broken template fails
before any tensor is read. A literal template is code from the recipe: it is rendered
in a child process under CPU-time and memory limits, and its output is capped, so a
loop that never ends or a string that grows to gigabytes is one error line. The chosen template is written to ``chat_template.jinja``,
the file transformers reads first (it takes priority over the ``chat_template`` key of
tokenizer_config.json, which we drop so the two can never disagree).
"""
from __future__ import annotations

import functools
import json
import logging
import os
import signal
import subprocess
import sys
from collections import Counter
from typing import Callable, Optional

log = logging.getLogger("ray_merge")

TEMPLATE_FILE = "chat_template.jinja"

# Limits for rendering a recipe's template: CPU seconds and address space of the child
# process that renders it, and the characters of the output or of any string or list
# that ``*`` builds (a sample conversation renders to a few hundred).
RENDER_CPU_SECONDS = 5
RENDER_MEMORY_BYTES = 1 << 30
MAX_RENDER_CHARS = 1 << 20

# Our own templates for the common prompt formats. Whitespace is controlled with
# ``{%-``/``-%}`` so they render the same with or without trim_blocks.
BUILTIN_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{%- for m in messages -%}"
        "{{ '<|im_start|>' ~ m['role'] ~ '\\n' ~ m['content'] ~ '<|im_end|>\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    ),
    "llama3": (
        "{{- bos_token -}}"
        "{%- for m in messages -%}"
        "{{ '<|start_header_id|>' ~ m['role'] ~ '<|end_header_id|>\\n\\n' ~ (m['content'] | trim) ~ '<|eot_id|>' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"
    ),
    "mistral": (
        "{%- set ns = namespace(system='', turns=messages) -%}"
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set ns.system = messages[0]['content'] ~ '\\n\\n' -%}"
        "{%- set ns.turns = messages[1:] -%}"
        "{%- endif -%}"
        "{{- bos_token -}}"
        "{%- for m in ns.turns -%}"
        "{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
        "{{- raise_exception('mistral template: after an optional system message, roles must alternate "
        "user/assistant') -}}"
        "{%- endif -%}"
        "{%- if m['role'] == 'user' -%}"
        "{{ '[INST] ' ~ (ns.system if loop.first else '') ~ m['content'] ~ ' [/INST]' }}"
        "{%- elif m['role'] == 'assistant' -%}"
        "{{ ' ' ~ m['content'] ~ eos_token }}"
        "{%- else -%}"
        "{{- raise_exception('mistral template: only system, user and assistant roles are supported') -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
    ),
    "alpaca": (
        "{%- set ns = namespace(first=true) -%}"
        "{%- for m in messages if m['role'] == 'system' -%}"
        "{{ m['content'] | trim }}{{ '\\n\\n' }}"
        "{%- endfor -%}"
        "{%- for m in messages if m['role'] != 'system' -%}"
        "{%- if not ns.first -%}{{ '\\n\\n' }}{%- endif -%}"
        "{%- set ns.first = false -%}"
        "{%- if m['role'] == 'user' -%}{{ '### Instruction:\\n' ~ (m['content'] | trim) }}"
        "{%- elif m['role'] == 'assistant' -%}{{ '### Response:\\n' ~ (m['content'] | trim) ~ eos_token }}"
        "{%- elif m['role'] == 'user_context' -%}{{ '### Input:\\n' ~ (m['content'] | trim) }}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt and (not messages or messages[-1]['role'] != 'assistant') -%}"
        "{{ '\\n\\n### Response:\\n' }}"
        "{%- endif -%}"
    ),
    "exaone": (
        "{%- for m in messages -%}"
        "{%- if loop.first and m['role'] != 'system' -%}{{ '[|system|][|endofturn|]\\n' }}{%- endif -%}"
        "{{ '[|' ~ m['role'] ~ '|]' ~ m['content'] }}"
        "{%- if m['role'] == 'user' -%}{{ '\\n' }}{%- else -%}{{ '[|endofturn|]\\n' }}{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '[|assistant|]' }}{%- endif -%}"
    ),
}

SAMPLE_CONVERSATION = [
    {"role": "user", "content": "Hello, who are you?"},
    {"role": "assistant", "content": "I am a merged model."},
    {"role": "user", "content": "What can you do?"},
]


@functools.lru_cache(maxsize=1)
def _bounded_environment_class():
    from jinja2.exceptions import SecurityError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedSandboxedEnvironment(ImmutableSandboxedEnvironment):
        """jinja2's immutable sandbox that also refuses ``*`` and ``**`` results too large to build."""

        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context, operator, left, right):
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_RENDER_CHARS:
                        raise SecurityError(f"'*' would build a sequence of {len(seq) * n} items, more than "
                                            f"{MAX_RENDER_CHARS}")
            if operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 \
                    and right * abs(left).bit_length() > 4096:
                raise SecurityError("'**' would build a number of more than 4096 bits")
            return super().call_binop(context, operator, left, right)

    return BoundedSandboxedEnvironment


def _environment():
    import jinja2.ext

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def strftime_now(fmt):
        import datetime

        return datetime.datetime.now().strftime(fmt)

    env = _bounded_environment_class()(trim_blocks=True, lstrip_blocks=True,
                                       extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, **_: json.dumps(
        x, indent=indent, ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def render_sample(template: str, messages: Optional[list] = None) -> str:
    """Render a sample conversation; raises ValueError with a one-line reason on failure.

    The output is capped at MAX_RENDER_CHARS; the time and memory a template takes are
    bounded by ``check_chat_template``, which calls this in a child process.
    """
    parts, size = [], 0
    try:
        compiled = _environment().from_string(template)
        for part in compiled.generate(messages=messages or SAMPLE_CONVERSATION, add_generation_prompt=True,
                                      bos_token="<s>", eos_token="</s>", tools=None, documents=None):
            parts.append(part)
            size += len(part)
            if size > MAX_RENDER_CHARS:
                break
    except MemoryError:
        raise ValueError(f"needs more than {RENDER_MEMORY_BYTES >> 20} MiB of memory") from None
    except Exception as e:  # noqa: BLE001 - syntax errors, raise_exception, sandbox violations, type errors
        lineno = getattr(e, "lineno", None)
        where = f" (line {lineno})" if lineno else ""
        raise ValueError(f"{type(e).__name__}{where}: {' '.join(str(e).split())}") from None
    if size > MAX_RENDER_CHARS:
        raise ValueError(f"renders more than {MAX_RENDER_CHARS} characters")
    return "".join(parts)


def check_chat_template(value, err: Callable[[str, str], Exception]) -> None:
    """Validate the recipe's ``chat_template`` value; ``err(key, message)`` builds the UserError."""
    if value is None:
        return
    if not isinstance(value, str) or not value.strip():
        raise err("chat_template", "must be 'auto', a built-in template name or a Jinja template string")
    if value == "auto":
        return
    template = builtin_or_literal(value)
    if template is None:
        raise err("chat_template", f"unknown chat template {value!r} (use auto, "
                                   f"{', '.join(sorted(BUILTIN_TEMPLATES))}, or a Jinja template)")
    if value in BUILTIN_TEMPLATES:  # ours: rendered here
        try:
            problem, empty = None, not render_sample(template).strip()
        except ValueError as e:
            problem, empty = str(e), False
    else:
        problem, empty = _render_in_child(template)
    if problem:
        raise err("chat_template", f"template does not render a sample conversation: {problem}")
    if empty:
        raise err("chat_template", "template renders a sample conversation as an empty string")


# The child: limits first, then jinja2 and the template (read from stdin); one line of JSON out.
_CHILD = """
import json, resource, sys
sys.path[:0] = json.loads(sys.argv[1])
cpu, memory = int(sys.argv[2]), int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
from ray_merge.chat_template import render_sample
try:
    result = {"empty": not render_sample(sys.stdin.read()).strip()}
except ValueError as e:
    result = {"problem": str(e)}
print(json.dumps(result))
"""


@functools.lru_cache(maxsize=64)  # a search loads the same recipe template many times
def _render_in_child(template: str) -> tuple[Optional[str], bool]:
    """Render the sample conversation in a child process under the limits: (problem or None, empty)."""
    wall = 6 * RENDER_CPU_SECONDS  # CPU time is the limit; wall time only guards against a stuck child
    try:
        proc = subprocess.run(
            [sys.executable, "-I", "-c", _CHILD, json.dumps(sys.path), str(RENDER_CPU_SECONDS),
             str(RENDER_MEMORY_BYTES)],
            input=template, capture_output=True, text=True, timeout=wall, check=False,
        )
    except subprocess.TimeoutExpired:
        return f"takes more than {wall} s", False
    if proc.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return f"takes more than {RENDER_CPU_SECONDS} s of CPU time", False
    try:
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return f"the renderer failed (exit code {proc.returncode}: {last[:300]})", False
    return result.get("problem"), bool(result.get("empty"))


def builtin_or_literal(value: str) -> Optional[str]:
    """The template text for a built-in name or a literal template; None for anything else."""
    if value in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[value]
    if "{" in value:
        return value
    return None


def read_model_template(model_dir: str) -> Optional[str]:
    """The default chat template a model's tokenizer would load, read from its files."""
    path = os.path.join(model_dir, TEMPLATE_FILE)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    path = os.path.join(model_dir, "tokenizer_config.json")
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                tmpl = json.load(f).get("chat_template")
        except (OSError, ValueError, AttributeError):
            return None
        if isinstance(tmpl, list):  # the legacy list of named templates
            tmpl = next((t.get("template") for t in tmpl if isinstance(t, dict) and t.get("name") == "default"),
                        None)
        if isinstance(tmpl, dict):
            tmpl = tmpl.get("default")
        return tmpl if isinstance(tmpl, str) else None
    return None


def resolve_chat_template(value: Optional[str], model_dirs: list[str]) -> Optional[str]:
    """The template text to write, or None to leave the tokenizer's own template alone.

    ``auto`` picks the template most input models share (ties: the first in recipe
    order, base model first); None when no input has one.
    """
    if not value:
        return None
    if value != "auto":
        return builtin_or_literal(value)
    found = []
    for d in model_dirs:
        t = read_model_template(d)
        if t and t.strip():
            found.append(t.strip())
    if not found:
        log.warning("chat_template: auto: no input model has a chat template; none written")
        return None
    choice, count = Counter(found).most_common(1)[0]
    log.info("chat_template: auto: chose the template shared by %d of %d models", count, len(found))
    return choice


def write_chat_template(out_dir: str, template: str) -> None:
    """Write the template where transformers reads it; drop competing copies in tokenizer_config.json."""
    with open(os.path.join(out_dir, TEMPLATE_FILE), "w", encoding="utf-8") as f:
        f.write(template)
    cfg_path = os.path.join(out_dir, "tokenizer_config.json")
    if os.path.isfile(cfg_path):
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
        if "chat_template" in cfg:
            del cfg["chat_template"]
            with open(cfg_path, "w", encoding="utf-8") as f:
                json.dump(cfg, f, indent=2, ensure_ascii=False)
                f.write("\n")
