"""Chat templates render like transformers' apply_chat_template, inside a sandbox with limits."""

from __future__ import annotations

import threading
import time
import tracemalloc

import pytest
import transformers

from ownlm.errors import BadRequest, ChatTemplateError
from ownlm.text.chat import CHATML, ChatTemplate

MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye?"}]


def test_renders_like_transformers(hf_models):
    tok = transformers.AutoTokenizer.from_pretrained(hf_models["llama"])
    want = tok.apply_chat_template(MSGS, tokenize=False, add_generation_prompt=True)
    assert ChatTemplate(tok.chat_template).render(MSGS) == want
    llama2 = ("{{ bos_token }}{% for m in messages %}"
              "{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] | trim + ' [/INST]' }}"
              "{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] | trim + ' ' + eos_token }}"
              "{% endif %}{% endfor %}")
    tok.chat_template = llama2
    tok.bos_token, tok.eos_token = "<|endoftext|>", "<|im_end|>"
    msgs = MSGS[1:]
    assert ChatTemplate(llama2, "<|endoftext|>", "<|im_end|>").render(msgs, add_generation_prompt=False) == \
        tok.apply_chat_template(msgs, tokenize=False)


def test_fallback_is_chatml():
    t = ChatTemplate(None)
    assert t.is_fallback and t.source == CHATML
    assert t.render([{"role": "user", "content": "x"}]) == "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("source", [
    "{{ messages.__class__.__mro__[1].__subclasses__() }}",
    "{{ ''.__class__.__base__.__subclasses__() }}",
    "{{ raise_exception.__globals__ }}",
    "{% set x = messages.append({'role': 'user'}) %}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ '{0.__class__.__mro__}'.format(1) }}",
    "{{ ''.format._env }}",
    "{{ self._TemplateReference__context }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ messages|map(attribute='__class__')|list }}",
    "{{ (messages|first).items.__self__.__class__ }}",
])
def test_sandbox_escape_is_a_clear_error(source):
    with pytest.raises(ChatTemplateError) as e:
        ChatTemplate(source).render([{"role": "user", "content": "x"}])
    assert "chat template" in str(e.value)


def test_runaway_template_is_stopped():
    loop = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    t0 = time.monotonic()
    with pytest.raises(ChatTemplateError) as e:
        ChatTemplate(loop).render([{"role": "user", "content": "x"}], timeout=0.5)
    assert "longer than" in str(e.value) and time.monotonic() - t0 < 5


def test_output_size_is_limited():
    big = "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}"
    with pytest.raises(ChatTemplateError) as e:
        ChatTemplate(big).render([{"role": "user", "content": "x"}])
    assert "exceeds" in str(e.value)


def test_template_errors_and_bad_messages():
    with pytest.raises(ChatTemplateError, match="does not parse"):
        ChatTemplate("{% for %}")
    with pytest.raises(ChatTemplateError, match="refused"):
        ChatTemplate("{{ raise_exception('only user turns') }}").render([{"role": "user", "content": "x"}])
    with pytest.raises(BadRequest):
        ChatTemplate(None).render([{"role": "wizard", "content": "x"}])
    with pytest.raises(BadRequest):
        ChatTemplate(None).render([])


# -- hostile templates: every one is refused with a clear message, quickly and without large allocations ------

def _refused(source, **render_args):
    """Compile and render `source`; return the ChatTemplateError, the seconds and the peak bytes it took."""
    tracemalloc.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(ChatTemplateError) as e:
            ChatTemplate(source).render([{"role": "user", "content": "x"}], **render_args)
        return e.value, time.monotonic() - t0, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


SAFETY_SECONDS, SAFETY_BYTES = 5.0, 200 << 20  # safety bounds for a loaded 2-core machine, not benchmarks
SHARED = "{% set ns = namespace(a=[1], b=[1]) %}" \
         "{% for i in range(60) %}{% set ns.a = [ns.a, ns.a] %}{% set ns.b = [ns.b, ns.b] %}{% endfor %}"
HOSTILE = {
    # one C-level step that held the GIL: the thread's timeout could not stop it
    "power": ("{% set n = 3 %}{% set x = (n+6) ** 12000000 %}", "'**' would make a number of 3.8e+07 bits"),
    "power-chained": ("{% set ns = namespace(x=3) %}{% for i in range(40) %}{% set ns.x = ns.x * ns.x %}{% endfor %}",
                      "'*' would make a number"),
    # constant-folded while compiling, outside every limit
    "repeat-constant": ("{{ 'x' * 2000000000 }}", "'*' making 2000000000 characters"),
    # one step that makes gigabytes (these reached 1.6-2.6 GB)
    "tojson-indent": ("{{ messages|tojson(indent=100000000) }}", "tojson would make up to"),
    "indent-lines": ("{{ ('a\n' * 1000000)|indent(1000) }}", "the indent filter would make up to"),
    "indent-width": ("{{ 'a\nb'|indent(2000000000, true) }}", "the indent filter would make up to"),
    "center": ("{{ 'a'|center(2000000000) }}", "the center filter would make up to"),
    "center-method": ("{{ 'a'.center(2000000000) }}", "str.center() would make up to"),
    "ljust-method": ("{{ 'a'.ljust(2000000000) }}", "str.ljust() would make up to"),
    "zfill-method": ("{{ 'a'.zfill(2000000000) }}", "str.zfill() would make up to"),
    "expandtabs": ("{{ ('\t' * 100000).expandtabs(100000) }}", "str.expandtabs() would make up to"),
    "format-filter-width": ("{{ '%99999999d'|format(1) }}", "'%' formatting would make up to"),
    "percent-width": ("{{ '%99999999d' % 1 }}", "'%' formatting would make up to"),
    "percent-star-width": ("{{ '%*d' % (999999999, 1) }}", "'%' formatting would make up to"),
    "percent-precision": ("{{ '%.99999999f' % 1.0 }}", "'%' formatting would make up to"),
    "percent-mapping": ("{{ ('%(a)s' * 100000) % {'a': 'x' * 10000} }}", "'%' formatting would make up to"),
    "percent-in-odd-test": ("{{ '%999999999s' is odd }}", "'%' formatting would make up to"),
    "str-format-width": ("{{ '{:>99999999}'.format(1) }}", "format() would make up to"),
    "str-format-nested-width": ("{{ '{0:{1}}'.format(1, 99999999) }}", "format() would make up to"),
    "list-repeat": ("{{ ([1] * 1000000000)|length }}", "'*' making 1000000000 items"),
    "list-repeat-left": ("{{ (1000000000 * [1])|length }}", "'*' making 1000000000 items"),
    "replace-filter": ("{{ ('a' * 1000000)|replace('a', 'a' * 10000) }}", "the replace filter would make up to"),
    "replace-method": ("{{ ('a' * 1000000).replace('', 'b' * 10000) }}", "str.replace() would make up to"),
    "join-of-repeats": ("{{ (['x' * 1000000] * 100000)|join }}", "the join filter would make up to"),
    "join-separator": ("{{ (['y'] * 100000)|join('x' * 1000000) }}", "the join filter would make up to"),
    "join-method": ("{{ ('x' * 1000000).join(['y'] * 100000) }}", "str.join() would make up to"),
    "batch-fill": ("{{ [1]|batch(1000000000, 0)|list }}", "batch would make up to"),
    "range": ("{{ range(10 ** 10)|list }}", "Range too big"),
    # steps whose time is the product of two lengths
    "strip-long-chars": ("{{ ('a' * 4000000).strip('b' * 4000000 + 'a') }}", "str.strip() of a 4000001-character"),
    "trim-long-chars": ("{{ ('a' * 4000000)|trim('b' * 4000000 + 'a') }}", "trim of a 4000001-character"),
    "rfind-long-needle": ("{{ ('a' * 4000000).rfind('ab' + 'a' * 1000000) }}", "str.rfind() of a 1000002-character"),
    # one step making millions of small objects
    "split-into-pieces": ("{{ ('中 ' * 4000000).split()|length }}", "str.split() would make up to"),
    "list-of-characters": ("{{ ('中' * 4000000)|list|length }}", "listing items would make up to"),
    # a value that shares its parts stands for 2**60 elements: printing, comparing or hashing walks them all
    "shared-print": (SHARED + "{{ ns.a }}", "a value of 5764607523034234879 elements"),
    "shared-compare": (SHARED + "{{ ns.a == ns.b }}", "elements and characters is walked"),
    "shared-in": (SHARED + "{{ ns.a in [ns.b] }}", "elements and characters is walked"),
    "shared-sort": (SHARED + "{{ [ns.a, ns.b]|sort }}", "elements and characters is walked"),
    "shared-eq-test": (SHARED + "{{ [ns.a]|select('eq', ns.b)|list }}", "elements and characters is walked"),
    "shared-tojson": (SHARED + "{{ ns.a|tojson }}", "elements and characters is walked"),
    "shared-concat": (SHARED + "{{ ns.a ~ '' }}", "elements and characters is walked"),
    "shared-format": (SHARED + "{{ '{}'.format(ns.a) }}", "elements and characters is walked"),
    "shared-percent": (SHARED + "{{ '%s' % (ns.a,) }}", "elements and characters is walked"),
    "shared-loop-changed": (SHARED + "{% for x in [ns.a, ns.b] %}{{ loop.changed(x) }}{% endfor %}", "is walked"),
    "shared-tuple-hash": ("{% set ns = namespace(t=(1,)) %}{% for i in range(60) %}{% set ns.t = (ns.t, ns.t) %}"
                          "{% endfor %}{{ {ns.t: 1} }}", "elements and characters is walked"),
    "shared-namespaces": ("{% set ns = namespace(l=1) %}{% for i in range(60) %}"
                          "{% set ns.l = namespace(a=ns.l, b=ns.l) %}{% endfor %}{{ ns.l }}", "is walked"),
    # many steps, each allowed, that together would hold gigabytes before the timeout: the render's budget
    "doubling-text": ("{% set ns = namespace(s='x' * 1000000) %}{% for i in range(40) %}"
                      "{% set ns.s = ns.s ~ ns.s %}{% endfor %}", "'~' would make up to"),
    "doubling-list": ("{% set ns = namespace(l=[1] * 100000) %}{% for i in range(40) %}"
                      "{% set ns.l = ns.l + ns.l %}{% endfor %}", "'+' would make up to"),
    "copies-in-recursion": ("{% macro f(n, s) %}{% set t = s ~ n %}{{ f(n - 1, t) if n else '' }}{% endmacro %}"
                            "{{ f(300, 'x' * 1000000) }}", "already made"),
    "copies-in-a-list": ("{% set ns = namespace(l=[], s='x' * 1000000) %}{% for i in range(5000) %}"
                         "{% set ns.l = ns.l + [ns.s[1:]] %}{% endfor %}", "already made"),
    "block-output": ("{% set s = 'x' * 100000 %}{% set y %}{% for i in range(100000) %}{{ s }}{% endfor %}"
                     "{% endset %}", "joining a block's output would make up to"),
    "sum-of-lists": ("{{ ([[1] * 100000] * 10000)|sum(start=[])|length }}", "'+' would make up to"),
    "spread-args-kept": ("{% set big = [1] * 1000000 %}{% set ns = namespace(l=[]) %}{% for i in range(1000) %}"
                         "{% set ns.l = ns.l + [[1]|select('eq', *big)] %}{% endfor %}", "*args would make up to"),
    "number-growth": ("{% set ns = namespace(x=1) %}{% for i in range(100000) %}{% set ns.x = ns.x + ns.x %}"
                      "{% endfor %}{{ ns.x // 3 }}", "'+' on a number of 4097 bits"),
    "number-from-text": ("{{ ('9' * 4300)|int // 7 }}", "'//' on a number of 14285 bits"),
    "shared-attr-name": (SHARED + "{{ 1|attr(ns.a) }}", "elements and characters is walked"),
    "shared-behind-mapping": (SHARED + "{{ {'k': ns.a}.items().mapping }}", "elements and characters is walked"),
    "shared-set-difference": ("{% set ns = namespace(t=(1,)) %}{% for i in range(60) %}{% set ns.t = (ns.t, ns.t) %}"
                              "{% endfor %}{{ {}.keys() - [ns.t] }}", "elements and characters is walked"),
}


@pytest.mark.parametrize("source,message", list(HOSTILE.values()), ids=list(HOSTILE))
def test_hostile_template_is_refused_quickly_and_small(source, message):
    err, seconds, peak = _refused(source)
    assert message in str(err), str(err)
    assert str(err).startswith("chat template ") and "\n" not in str(err)
    assert seconds < SAFETY_SECONDS and peak < SAFETY_BYTES, (seconds, peak >> 20)


def test_nothing_is_computed_while_compiling():
    # jinja2's optimizer would fold these while the template is compiled, outside every limit
    for source in ["{{ 'x' * 2000000000 }}", "{{ 'x'|center(2000000000) }}", "{{ (9 ** 12000000)|string }}",
                   "{{ [1] * 10 ** 9 }}", "{{ '%99999999d' % 1 }}",
                   "{% autoescape 'x' * 2000000000 %}{% endautoescape %}"]:
        tracemalloc.start()
        t0 = time.monotonic()
        try:
            template = ChatTemplate(source)
            assert time.monotonic() - t0 < SAFETY_SECONDS and tracemalloc.get_traced_memory()[1] < 16 << 20
        finally:
            tracemalloc.stop()
        with pytest.raises(ChatTemplateError, match="exceeds its limits"):
            template.render([{"role": "user", "content": "x"}])


@pytest.mark.parametrize("source,name", [
    ("{{ (1).to_bytes(2000000000, 'big') }}", "int.to_bytes()"),
    ("{{ 'x'.translate({120: 'y' * 1000}) }}", "str.translate()"),
    ("{{ 'x'.encode() }}", "str.encode()"),
    ("{{ dict.fromkeys(range(100000)) }}", "dict.fromkeys()"),
    ("{{ range(3).index(1) }}", "range.index()"),
])
def test_methods_off_the_list_are_refused(source, name):
    err, seconds, peak = _refused(source)
    assert f"may not call {name}" in str(err)


def test_template_size_shape_and_type_are_checked():
    for source, message in [("{{ x }}" * 10000, "has 70000 characters, more than the 65536 allowed"),
                            ("{{x}}" * 2500, "characters of Python, more than the 262144 allowed"),
                            ("{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}", "does not compile"),
                            ("{{ " + "9" * 5000 + " }}", "does not compile"),
                            ("{{ 'x'|wordwrap(1) }}", "No filter named 'wordwrap'")]:
        err, seconds, peak = _refused(source)
        assert message in str(err) and seconds < SAFETY_SECONDS and peak < SAFETY_BYTES
    for wrong in (123, ["{{ x }}"], {"default": "{{ x }}"}, b"{{ x }}"):
        with pytest.raises(ChatTemplateError, match=f"must be text, not {type(wrong).__name__} "):
            ChatTemplate(wrong)
    err, _, _ = _refused("{{ raise_exception('no\\n' * 100000) }}")
    assert "refused the conversation: no no" in str(err) and len(str(err)) < 400


def test_messages_in_errors_are_one_short_line():
    err, _, _ = _refused("{{ {}['k' * 1000000 ~ '\\n'].y }}")  # jinja2 names the missing key
    assert str(err).startswith("chat template") and "\n" not in str(err) and len(str(err)) < 400


def test_long_loops_still_hit_the_time_limit():
    err, seconds, peak = _refused("{% set ns = namespace(l=[]) %}{% for i in range(100000) %}"
                                  "{% for j in range(100000) %}{% set ns.l = [ns.l, 1] %}{% endfor %}{% endfor %}",
                                  timeout=0.5)
    assert "longer than 0.5s" in str(err) and seconds < SAFETY_SECONDS and peak < SAFETY_BYTES
    # and the render itself stopped (an injected timeout swallowed by a weakref callback is sent again)
    assert not [t for t in threading.enumerate() if t.name == "ownlm-template" and t.is_alive()]


def test_space_and_line_break_tables_are_complete():
    from ownlm.text import sandbox
    assert sandbox._SPACES == "".join(c for c in map(chr, range(0x110000)) if c.isspace())
    breaks = "".join(c for c in map(chr, range(0x110000)) if len(("a" + c + "b").splitlines()) == 2)
    assert sandbox._LINE_BREAKS == breaks


# -- real models' templates (written from the structure of Llama 3.1's, Gemma's, Qwen3's and Mistral's) --------
# They must keep rendering exactly as transformers renders them.

LLAMA31 = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\n\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. " }}
    {{- "To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, ' }}
    {{- '"parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{%- if tools_in_user_message and not tools is none %}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
    {%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, ' }}
    {{- '"parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'
            + message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

GEMMA = r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

QWEN3 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string
          and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if '</think>' in content %}
            {%- set reasoning_content = content.split('</think>')[0].rstrip('\n')
                    .split('<think>')[-1].lstrip('\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n')
                    + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}
"""

MISTRAL = r"""{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate "
                                + "user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {%- for tool in tools %}
                {%- set tool = tool.function %}
                {{- '{"type": "function", "function": {' }}
                {%- for key, val in tool.items() if key != "return" %}
                    {%- if val is string %}
                        {{- '"' + key + '": "' + val + '"' }}
                    {%- else %}
                        {{- '"' + key + '": ' + val|tojson }}
                    {%- endif %}
                    {%- if not loop.last %}
                        {{- ", " }}
                    {%- endif %}
                {%- endfor %}
                {{- "}}" }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- else %}
                    {{- "]" }}
                {%- endif %}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
        {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\n\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- "[TOOL_CALLS] [" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}
                {{- ", " }}
            {%- else %}
                {{- "]" + eos_token }}
            {%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- elif message["role"] == "tool" %}
        {%- if message.content is defined and message.content.content is defined %}
            {%- set content = message.content.content %}
        {%- else %}
            {%- set content = message.content %}
        {%- endif %}
        {{- '[TOOL_RESULTS] {"content": ' + content|string + ", " }}
        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}
            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
        {%- endif %}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, "
                            + "with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city.",
    "parameters": {"type": "object", "required": ["city"],
                   "properties": {"city": {"type": "string", "description": "Name, e.g. \"Paris\" <é>"}}}}}]
CALL = {"role": "assistant", "content": "", "tool_calls": [
    {"id": "abc123XYZ", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
RESULT = {"role": "tool", "tool_call_id": "abc123XYZ", "content": "22°C and sunny"}
THINKING = [MSGS[0], MSGS[1], {"role": "assistant", "content": "<think>\nhm\n</think>\n\nHello."}, MSGS[3]]
REAL = {
    "llama3.1": (LLAMA31, MSGS, None), "llama3.1-tools": (LLAMA31, [MSGS[0], MSGS[1], CALL, RESULT], TOOLS),
    "gemma": (GEMMA, MSGS, None),
    "qwen3": (QWEN3, THINKING, None), "qwen3-tools": (QWEN3, [MSGS[1], CALL, RESULT, RESULT], TOOLS),
    "mistral": (MISTRAL, MSGS, None), "mistral-tools": (MISTRAL, [MSGS[1], CALL, RESULT], TOOLS),
}


@pytest.mark.parametrize("source,messages,tools", list(REAL.values()), ids=list(REAL))
def test_real_templates_render_like_transformers(source, messages, tools):
    from transformers.utils.chat_template_utils import render_jinja_template

    want = render_jinja_template([messages], tools=tools, chat_template=source, add_generation_prompt=True,
                                 bos_token="<s>", eos_token="</s>")[0][0]
    got = ChatTemplate(source, "<s>", "</s>").render(messages, tools=tools, documents=None)
    assert got == want


def test_generation_markers_render_like_transformers():
    from transformers.utils.chat_template_utils import render_jinja_template

    source = ("{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}<end>"
              "{% endgeneration %}{% else %}{{ m.role }}: {{ m.content }}\n{% endif %}{% endfor %}")
    want = render_jinja_template([MSGS], chat_template=source)[0][0]
    assert ChatTemplate(source).render(MSGS) == want


def test_real_templates_keep_their_checks():
    with pytest.raises(ChatTemplateError, match="refused the conversation: Conversation roles must alternate"):
        ChatTemplate(GEMMA).render([MSGS[1], MSGS[1]])
    bad_id = {**CALL, "tool_calls": [{**CALL["tool_calls"][0], "id": "short"}]}
    with pytest.raises(ChatTemplateError, match="Tool call IDs should be alphanumeric strings with length 9"):
        ChatTemplate(MISTRAL).render([MSGS[1], bad_id], tools=TOOLS)


def test_long_conversation_renders_within_the_limits():
    # ~1M characters over 2000 turns: well inside the time limit and the render's budget, same text as transformers
    from transformers.utils.chat_template_utils import render_jinja_template

    msgs = [MSGS[0]]
    for i in range(1000):
        msgs += [{"role": "user", "content": f"question {i} " + "word " * 100},
                 {"role": "assistant", "content": f"<think>\n{i}\n</think>\n\nanswer 🙂 " + "ans " * 100}]
    for source in (LLAMA31, QWEN3, MISTRAL, None):
        t0 = time.monotonic()
        got = ChatTemplate(source).render(msgs, timeout=SAFETY_SECONDS)
        assert time.monotonic() - t0 < SAFETY_SECONDS
        want = render_jinja_template([msgs], chat_template=source or CHATML, add_generation_prompt=True,
                                     bos_token="", eos_token="")[0][0]
        assert got == want


# -- the bounded filters, methods and operators behave as jinja2's own --------------------------------------------

KITCHEN_SINK = r"""{% macro row(k, v, sep=': ') %}{{ k }}{{ sep }}{{ v }}
{% if caller is defined %}[{{ caller() }}]{% endif %}
{% endmacro %}
{% set ns = namespace(total=0, names=[]) %}
{% for m in messages %}{% set ns.total = ns.total + m.content|length %}{% set ns.names = ns.names + [m.role] %}
{% endfor %}
{{ ns.total }} {{ ns.names|join(',') }} {{ ns.names|unique|list }} {{ ns.names|sort(reverse=true)|first }}
{{ ns }}
{{ messages|map(attribute='role')|join('|') }} {{ messages|selectattr('role', 'eq', 'user')|list|length }}
{{ messages|rejectattr('role', 'in', ['system'])|map(attribute='content')|map('upper')|join(' / ') }}
{% for g in messages|groupby('role') %}{{ g.grouper }}={{ g.list|length }};{% endfor %}
{{ messages|groupby('role')|first }}
{{ {'b': 2, 'a': 1, 'C': 3}|dictsort }} {{ {'b': 2, 'a': 1}|dictsort(by='value', reverse=true) }}
{{ {'B': 1, 'a': 2}|dictsort(true) }}
{{ [3, 1, 2]|sort }} {{ ['b', 'A', 'c']|sort }} {{ ['b', 'A', 'c']|sort(case_sensitive=true) }}
{{ [1, 2, 3]|sum }} {{ [{'x': 2}, {'x': 5}]|sum(attribute='x') }}
{{ [[1], [2, 3]]|sum(start=[]) }} {{ [4, 2, 9]|min }} {{ ['b', 'A']|max }}
{{ [{'n': 'b'}, {'n': 'a'}]|min(attribute='n') }} {{ []|max }}
{{ [{'a': 2, 'b': 1}, {'a': 1, 'b': 2}]|sort(attribute='a,b') }} {{ ['a', 'A', 'b']|unique|list }}
{{ ['a', 'A']|unique(case_sensitive=true)|list }}
{{ range(7)|batch(3, 'x')|list }} {{ range(7)|batch(3)|list }} {{ range(7)|slice(3)|list }}
{{ range(7)|slice(3, 0)|list }} {{ 'Hello World'|reverse }} {{ [1, 2, 3]|reverse|list }}
{{ 'hi'|center(9) }}|{{ 'a\nb\n\nc'|indent(2) }}|{{ 'a\nb'|indent('> ', first=true, blank=true) }}
|{{ 'x\r\ny'|indent }}
{{ '%s=%05.1f %d%% %r %c %x' % ('x', 3.14159, 50, 'q', 65, 255) }} {{ '%(a)s-%(b)s'|format(a=1, b=2) }}
{{ '%s/%s'|format(1, 2) }} {{ '%s' % [1, 'a'] }}
{{ '{}-{:>5}-{name}'.format(1, 'ab', name='n') }} {{ '{0[0]}'.format(['z']) }}
{{ 'x{a}y'.format_map({'a': 1}) }} {{ '{!r:>8}'.format('q') }} {{ '{:,.2f}'.format(1234.5) }}
{{ 'hello world-foo(bar'|title }} {{ 'hello'|capitalize }} {{ ' a b  c '|wordcount }} {{ '  pad  '|trim }}
|{{ 'xxaxx'|trim('x') }}
{{ 'aaa'|replace('a', 'bb', 2) }} {{ 'aaa'|replace('a', 'b') }} {{ 'a long sentence here'|truncate(9) }}
{{ 'short'|truncate(9) }} {{ '<b>'|e }} {{ '<b>'|safe }} {{ 5|string ~ 'x' }}
{{ 'a,b,,c'.split(',') }} {{ 'a b\tc'.split() }} {{ 'a,b,c'.rsplit(',', 1) }} {{ 'l1\nl2'.splitlines() }}
{{ '-'.join(['x', 'y']) }} {{ ''.join('abc'|reverse) }}
{{ 'abc'.startswith(('x', 'a')) }} {{ 'abcabc'.rfind('b') }} {{ 'abc'.upper() }} {{ '  x '.strip() }}
{{ 'a'.ljust(3, '.') }}{{ '7'.zfill(3) }} {{ 'abc'.find('c') }} {{ 'abc'.count('b') }}
{{ 'ab\tc'.expandtabs(4) }} {{ 'a-b'.partition('-') }} {{ 'a-b-c'.rpartition('-') }}
{{ 'prefix_x'.removeprefix('prefix_') }} {{ 'Ab'.swapcase() }} {{ 'x'.isalpha() }}
{{ [1, 2, 2].count(2) }} {{ [1, 2].index(2) }} {{ {'a': 1}.get('a') }} {{ {'a': 1}.get('z', 'd') }}
{{ {'a': 1}.items()|list }} {{ (1, 2) + (3,) }} {{ {'a': 1}.keys()|list }}
{{ 2 ** 10 }} {{ 2 ** -1 }} {{ 7 // 2 }} {{ 7 % 3 }} {{ -3 }} {{ +3 }} {{ 7 / 2 }} {{ 'ab' * 3 }}
{{ 3 * 'ab' }} {{ [0] * 3 }} {{ 'a' ~ 1 ~ none ~ [1] }} {{ 1.5 * 2 }} {{ 10 - 3 }}
{{ 4 is divisibleby 2 }} {{ 3 is odd }} {{ 4 is even }} {{ 'A' is upper }} {{ 'a' is lower }} {{ 1 in [1, 2] }}
{{ 'x' is in 'xyz' }} {{ 'upper' is filter }} {{ 'odd' is test }}
{{ [1, 2] == [1, 2] }} {{ (1, 2) < (1, 3) }} {{ 1 < 2 < 3 }} {{ {(1, 2): 'tuple key'}[(1, 2)] }}
{{ [1, 2, 3][1:] }} {{ 'abcdef'[::2] }} {{ 'abcdef'[-2:] }} {{ messages[-1].role }}
{% call row('k', 'v') %}inside{% endcall %} {{ row('a', 1, sep='=') }}
{% set block %}{% for i in range(3) %}{{ i }}{% if i == 1 %}{% break %}{% endif %}{% endfor %}{% endset %}
{{ block }}
{% filter upper %}filtered {{ 'text' }}{% endfilter %}
{% for i in range(5) %}{% if i is odd %}{% continue %}{% endif %}{{ loop.index }}{{ loop.cycle('a', 'b') }}
{{ loop.changed(i // 2) }}{{ loop.length }}{% endfor %}
{% for x in messages|map(attribute='role') %}{{ loop.revindex }}{% endfor %}
{% for k, v in {'a': 1}.items() %}{{ k }}{{ v }}{% endfor %}{% for a, b in [(1, 2)] %}{{ a + b }}{% endfor %}
{% set c = cycler('x', 'y') %}{{ c.next() }}{{ c.next() }}{{ c.next() }}{{ c.current }}
{% set j = joiner('+') %}{% for i in range(3) %}{{ j() }}{{ i }}{% endfor %}
{{ dict(a=1, b=[2]) }} {{ dict([('k', 'v')]) }} {{ dict({'z': 0}, y=1) }} {{ namespace(x=1).x }}
{{ namespace({'q': 2}).q }} {{ {'x': [1, {'y': 'é'}]}|tojson }} {{ [1]|tojson(indent=2) }}
{{ {'b': 1, 'a': [1, 2]}|tojson(sort_keys=true, separators=[',', ':']) }} {{ 'é'|tojson(ensure_ascii=true) }}
{{ undefined_var|default('dflt') }} {{ ''|default('e', true) }}
{{ 3.7|int }} {{ '42'|int + 1 }} {{ 'x'|int(5) }} {{ '2.5'|float }} {{ 2.567|round(1) }}
{{ 2.5|round(0, 'floor') }} {{ -3|abs }} {{ 1234567|filesizeformat }} {{ messages|first|length }}
{{ [1, 2, 3]|last }}
{{ 'x'|list }} {{ (1, 2)|list }} {{ {'a': 1}|list }} {{ {'a': 1}|items|list }} {{ 'hello'[1:3]|upper }}
{{ [3, 1]|sort|join }} {{ [1, 2]|join(', ') }} {{ messages|join(',', attribute='role') }}
{{ messages|length }} {{ 'abc'|length }} {{ messages|count }} {{ [1, none]|select|list }}
{{ [1, 2, 3]|reject('odd')|list }} {{ [1, 2, 3]|map('string')|join }} {{ ['a', 'b']|map('upper')|list }}
{% autoescape true %}{% set y = '<y>'|safe %}{{ '<x>' ~ y }} {{ ['<a>', '<b>'|safe]|join(', ') }} {{ '<' }}
{{ ('<i>'|safe) + '<' }} {{ '%s' % ('<'|safe) }}{% endautoescape %}
{% if messages[0].role is defined and not missing is defined and none is none and true is true %}ok{% endif %}
{{ self }} {{ loop is undefined }} {{ range(3) }} {{ [1, 2]|sum(start=10) }} {{ ['x', 'y']|sort|first }}
{{ ({'a': 1}|dictsort)[0][1] }}
"""


def test_bounded_filters_methods_and_operators_render_like_jinja2():
    import json
    import re

    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, sort_keys=False, separators=None: json.dumps(
        x, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys, separators=separators)
    want = env.from_string(KITCHEN_SINK).render(messages=MSGS, add_generation_prompt=True, bos_token="", eos_token="")
    got = ChatTemplate(KITCHEN_SINK).render(MSGS)
    assert re.sub(r" at 0x[0-9a-f]+", "", got) == re.sub(r" at 0x[0-9a-f]+", "", want)
