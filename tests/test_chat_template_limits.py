"""A recipe's chat template is rendered under limits (issue #14): output size, `*` and `**` results, CPU time
and memory; a template over a limit is one error, and the sandbox still refuses escapes."""
from __future__ import annotations

import pytest

from ray_merge.chat_template import MAX_RENDER_CHARS, check_chat_template, render_sample


class Refused(Exception):
    pass


def _err(key, msg):
    return Refused(f"{key}: {msg}")


def _refusal(template: str) -> str:
    with pytest.raises(Refused) as e:
        check_chat_template(template, _err)
    msg = str(e.value)
    assert msg.startswith("chat_template: ") and "\n" not in msg
    return msg


@pytest.mark.parametrize("template, fragment", [
    ("{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}",
     f"renders more than {MAX_RENDER_CHARS} characters"),
    ("{{ 'x' * 4000000000 }}", "'*' would build"),
    ("{{ 4000000000 * 'xy' }}", "'*' would build"),
    ("{{ [1, 2] * 4000000000 }}", "'*' would build"),
    ("{{ 10 ** 100000000 }}", "'**' would build"),
    ("{{ 'x'|center(2000000000) }}", "memory"),
    (("{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}"
      "{{ ns.s|length }}"), "memory"),
])
def test_templates_over_the_limits_are_refused(template, fragment):
    assert fragment in _refusal(template)


def test_a_template_that_never_ends_is_stopped():
    template = "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}x"
    assert "s of CPU time" in _refusal(template)


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ raise_exception.__globals__ }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ self._TemplateReference__context }}",
    "{{ (messages|first).update({'role': 'x'}) }}",
    "{{ messages.append(1) }}",
    "{{ '{0.__class__}'.format('') }}",
    "{{ lipsum.__globals__['os'] }}",
])
def test_sandbox_escapes_are_still_refused(template):
    """Refused, or read as undefined (an empty rendering, which is refused too)."""
    msg = _refusal(template)
    assert "does not render" in msg or "empty string" in msg


def test_ordinary_templates_still_render():
    template = ("{% for m in messages %}{{ m['role'] ~ ': ' ~ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}{{ '-' * 3 }}{{ 2 ** 10 }}")
    check_chat_template(template, _err)
    assert render_sample(template).endswith("assistant: ---1024")
    for name in ("chatml", "llama3", "mistral", "alpaca", "exaone"):
        check_chat_template(name, _err)


def test_render_sample_caps_its_output_in_process():
    with pytest.raises(ValueError, match="renders more than"):
        render_sample("{% for a in range(2000) %}{{ 'x' * 1000 }}{% endfor %}")
