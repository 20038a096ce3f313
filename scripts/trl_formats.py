"""Preference rows in each format TRL 1.16 accepts, for `compare_trl.py --formats` (made up here, no download).

- implicit_strings: Anthropic-HH rows without `prompt` ("\\n\\nHuman: ...\\n\\nAssistant: ..."), one of them
  multi-turn and one whose answers share the start of a word (the implicit prompt ends inside " blue"/" black").
- implicit_conversational: UltraFeedback-style message lists without `prompt`: a system turn, earlier exchanges.
- not_token_prefix: string prompts whose last token merges with the answer (" bl" + "ue" -> " blue", ": " +
  "yes" -> ": yes"), and one that does not, so chosen and rejected share the shorter prompt.
- tools_kwargs_history: conversational prompts with a system turn, an earlier exchange holding a tool call and
  its result, `tools` (a JSON string, as datasets store it) and `chat_template_kwargs`. SmolLM2's chat template
  ignores tools and template variables, so this case gives both sides the same model with TOOLS_TEMPLATE: ChatML
  that lists the tools in the system turn, renders tool calls, and opens an empty think block in the generation
  prompt unless enable_thinking is true (as Qwen3's does), so the prompt alone is rendered differently from the
  prompt + completion conversation.
"""
from __future__ import annotations

import json
from pathlib import Path

TOOLS_TEMPLATE = (
    "{% if tools or messages[0]['role'] == 'system' %}{{ '<|im_start|>system\\n' }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% endif %}"
    "{% if tools %}{{ '\\n\\n# Tools\\n' }}{% for tool in tools %}{{ tool | tojson }}{{ '\\n' }}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}{% if message['content'] %}{{ message['content'] }}{% endif %}"
    "{% for call in message['tool_calls'] or [] %}{{ '<tool_call>' + call['function']['name'] + ' ' }}"
    "{{ call['function']['arguments'] + '</tool_call>' }}{% endfor %}{{ '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if not enable_thinking %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}{% endif %}"
)


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def hh(*turns: str) -> str:
    return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns))


IMPLICIT_STRINGS = [
    {"chosen": hh("What color is the sky on a clear day?", "Blue."),
     "rejected": hh("What color is the sky on a clear day?", "Green.")},
    {"chosen": hh("Hi!", "Hello, how can I help?", "Name a prime number.", "7 is prime."),
     "rejected": hh("Hi!", "Hello, how can I help?", "Name a prime number.", "8 is prime.")},
    {"chosen": hh("What color is the ocean?", "It is blue."),
     "rejected": hh("What color is the ocean?", "It is black.")},
]

IMPLICIT_CONVERSATIONAL = [
    {"chosen": [msg("user", "What is 2 + 3?"), msg("assistant", "2 + 3 = 5.")],
     "rejected": [msg("user", "What is 2 + 3?"), msg("assistant", "2 + 3 = 6.")]},
    {"chosen": [msg("system", "Answer in one word."), msg("user", "Capital of France?"), msg("assistant", "Paris")],
     "rejected": [msg("system", "Answer in one word."), msg("user", "Capital of France?"), msg("assistant", "Lyon")]},
    {"chosen": [msg("user", "Hi"), msg("assistant", "Hello!"), msg("user", "Say a color."), msg("assistant", "Red.")],
     "rejected": [msg("user", "Hi"), msg("assistant", "Hello!"), msg("user", "Say a color."),
                  msg("assistant", "I cannot.")]},
]

NOT_TOKEN_PREFIX = [
    {"prompt": "The color of the sky is bl", "chosen": "ue.", "rejected": " red."},
    {"prompt": "Is water wet? Answer: ", "chosen": "yes", "rejected": "no"},
    {"prompt": "2 + 2 =", "chosen": " 4", "rejected": " 5"},
]

CALC = [{"type": "function", "function": {
    "name": "calculator", "description": "Evaluate an arithmetic expression.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}]


def tool_history(question: str, expression: str, result: str) -> list[dict]:
    call = {"type": "function", "function": {"name": "calculator",
                                             "arguments": json.dumps({"expression": expression})}}
    return [msg("system", "You are a careful assistant."), msg("user", question),
            {"role": "assistant", "content": "", "tool_calls": [call]}, msg("tool", result),
            msg("user", "So what is the answer?")]


TOOLS_KWARGS_HISTORY = [
    {"prompt": tool_history("What is 7 * 6?", "7 * 6", "42"), "chosen": [msg("assistant", "It is 42.")],
     "rejected": [msg("assistant", "It is 48.")], "tools": json.dumps(CALC),
     "chat_template_kwargs": {"enable_thinking": False}},
    {"prompt": tool_history("What is 9 + 10?", "9 + 10", "19"), "chosen": [msg("assistant", "19.")],
     "rejected": [msg("assistant", "21.")], "tools": json.dumps(CALC),
     "chat_template_kwargs": {"enable_thinking": True}},
    {"prompt": tool_history("What is 12 / 4?", "12 / 4", "3"), "chosen": [msg("assistant", "3")],
     "rejected": [msg("assistant", "4")], "tools": json.dumps(CALC),
     "chat_template_kwargs": {"enable_thinking": False}},
]

# name -> (rows, chat template or None for the model's own)
FORMATS = {
    "implicit_strings": (IMPLICIT_STRINGS, None),
    "implicit_conversational": (IMPLICIT_CONVERSATIONAL, None),
    "not_token_prefix": (NOT_TOKEN_PREFIX, None),
    "tools_kwargs_history": (TOOLS_KWARGS_HISTORY, TOOLS_TEMPLATE),
}


def with_template(model_dir: str, template: str, target: Path) -> str:
    """A model dir that is model_dir (its files linked) with another chat template."""
    target.mkdir(parents=True)
    for f in Path(model_dir).iterdir():
        if f.name != "chat_template.jinja":
            (target / f.name).symlink_to(f.resolve())
    config = json.loads((target / "tokenizer_config.json").read_text())
    if "chat_template" in config:  # older tokenizers keep it here
        (target / "tokenizer_config.json").unlink()
        (target / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    (target / "chat_template.jinja").write_text(template)
    return str(target)


def write_case(name: str, model_dir: str, where: Path) -> tuple[str, str, int]:
    """(model dir, data file, rows) for one format, under the folder `where`."""
    rows, template = FORMATS[name]
    data = where / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = with_template(model_dir, template, where / f"{name}-model") if template else model_dir
    return model, str(data), len(rows)
