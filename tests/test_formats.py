"""Every preference format TRL 1.16 accepts: implicit prompts, prompts that are not a token prefix,
`tools` / `chat_template_kwargs`, system turns and earlier exchanges. Expected ids are written out by hand
for the byte-level tiny tokenizer (printable ASCII c -> ord(c) - 29, space 224, newline 202)."""
import json

import pytest
from omegaconf import OmegaConf

from alignkit.data import tokenize
from alignkit.data.tokenize import encode_rows, extract_prompt, row_prompt
from alignkit.errors import UsageError
from alignkit.models.tiny import build_tiny_tokenizer

from conftest import alignkit

IM_START, IM_END, NL = 1, 2, 202
LU, SPACE_Y = 260, 261  # the merged tokens of the tokenizer below: "l"+"u" and " "+"y"
# ChatML plus tools (their names), tool calls and a `thinking` variable: without it, the generation prompt
# opens an empty think block that the full conversation does not have (as Qwen3's template does)
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>tools\n{% for t in tools %}{{ t['name'] }};{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}{% if m['role'] == 'bad' %}{{ raise_exception('no bad roles') }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{% if m['content'] %}{{ m['content'] }}{% endif %}"
    "{% for c in m['tool_calls'] or [] %}call {{ c['name'] }}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% if not thinking %}<think></think>{% endif %}{% endif %}"
)


def b(text: str) -> list[int]:
    return [224 if c == " " else NL if c == "\n" else ord(c) - 29 for c in text]


def turn(role: str, content: str) -> list[int]:
    return [IM_START] + b(f"{role}\n{content}") + [IM_END, NL]


def msg(role, content):
    return {"role": role, "content": content}


def data_cfg(**kw):
    return OmegaConf.create({"max_length": 512, "max_prompt_length": None, **kw})


def encode(tok, *rows, kind="preference", completion_only=True):
    """Encoded rows without their `source` (the row's place, checked by test_heldout)."""
    out = encode_rows(tok, [(f"f.jsonl line {i + 1}", r) for i, r in enumerate(rows)], data_cfg(), kind,
                      completion_only)
    return [{k: v for k, v in e.items() if k != "source"} for e in out]


def masked(prompt: list[int], completion: list[int]) -> dict:
    return {"input_ids": prompt + completion, "completion_mask": [0] * len(prompt) + [1] * len(completion)}


@pytest.fixture
def warnings_fresh(monkeypatch):
    monkeypatch.setattr(tokenize, "_divergence_warned", False)


@pytest.fixture
def tools_tokenizer():
    tok = build_tiny_tokenizer()
    tok.chat_template = TOOLS_TEMPLATE
    return tok


def test_extract_prompt_is_trls_longest_common_prefix():
    hh = "\n\nHuman: Sky?\n\nAssistant: "
    assert extract_prompt(hh + "Blue.", hh + "Red.") == (hh[:-1], " Blue.", " Red.")  # the space goes to the answers
    assert extract_prompt("It is blue", "It is black") == ("It is bl", "ue", "ack")  # cut inside a word
    assert extract_prompt("abc", "abcd") == ("ab", "c", "cd")  # a prefix of the other: the last common item stays
    assert extract_prompt("yes", "no") == ("", "yes", "no")
    assert extract_prompt("yes ", "no") == ("", "yes ", "no")  # (TRL would step back to index -1 here)
    s, u, a, a2 = msg("system", "S"), msg("user", "Q"), msg("assistant", "A"), msg("assistant", "B")
    assert extract_prompt([s, u, a], [s, u, a2]) == ([s, u], [a], [a2])
    assert extract_prompt([u, a], [u, a, u, a2]) == ([u], [a], [a, u, a2])


def test_implicit_string_prompt_anthropic_hh(tiny_tokenizer):
    hh = "\n\nHuman: 2+2?\n\nAssistant:"
    (pair,) = encode(tiny_tokenizer, {"chosen": hh + " 4", "rejected": hh + " 5"})
    assert pair["chosen"] == masked(b(hh), b(" 4") + [IM_END])
    assert pair["rejected"] == masked(b(hh), b(" 5") + [IM_END])


def test_implicit_conversational_prompt_with_system_and_earlier_exchange(tiny_tokenizer):
    history = [msg("system", "Be brief."), msg("user", "Hi"), msg("assistant", "Hello"), msg("user", "2+2?")]
    (pair,) = encode(tiny_tokenizer, {"chosen": history + [msg("assistant", "4")],
                                      "rejected": history + [msg("assistant", "5")]})
    prompt = (turn("system", "Be brief.") + turn("user", "Hi") + turn("assistant", "Hello") + turn("user", "2+2?")
              + [IM_START] + b("assistant\n"))
    assert pair["chosen"] == masked(prompt, b("4") + [IM_END, NL])
    assert pair["rejected"] == masked(prompt, b("5") + [IM_END, NL])


def test_token_merging_across_the_boundary_starts_the_completion_where_ids_diverge(capsys, warnings_fresh):
    tok = build_tiny_tokenizer((("l", "u"), ("Ġ", "y")))
    row = {"prompt": "sky is bl", "chosen": "ue", "rejected": " red"}
    (pair,) = encode(tok, row)
    # "bl" + "ue" tokenizes as b, lu, e: the prompt alone ends in "l", which prompt + chosen does not have. As
    # TRL, chosen and rejected share the shorter prompt, so "l" is rejected's first completion token.
    assert pair["chosen"] == masked(b("sky is b"), [LU] + b("e") + [IM_END])
    assert pair["rejected"] == masked(b("sky is b"), b("l red") + [IM_END])
    (line,) = capsys.readouterr().err.splitlines()
    assert "f.jsonl line 1" in line and "'l'" in line and "diverge" in line
    (sft,) = encode(tok, {"prompt": "Answer: ", "completion": "yes"}, kind="sft")  # SFT rows: the same rule
    assert sft == masked(b("Answer:"), [SPACE_Y] + b("es") + [IM_END])
    assert capsys.readouterr().err == ""  # warned once per run


def test_template_rendering_the_prompt_differently_tools_and_kwargs(tools_tokenizer, capsys, warnings_fresh):
    u = [msg("user", "2+2?")]
    rows = [{"prompt": u, "chosen": [msg("assistant", "4")], "rejected": [msg("assistant", "5")],
             "tools": [{"name": "calc"}]},
            {"prompt": u, "chosen": [msg("assistant", "4")], "rejected": [msg("assistant", "5")],
             "tools": json.dumps([{"name": "calc"}, {"name": "web"}]), "chat_template_kwargs": {"thinking": True}}]
    first, second = encode(tools_tokenizer, *rows)
    head = [IM_START] + b("assistant\n")
    # no `thinking`: the prompt alone ends in "<think></think>", dropped; the answer follows "assistant\n"
    assert first["chosen"] == masked(turn("tools", "calc;") + turn("user", "2+2?") + head, b("4") + [IM_END, NL])
    assert first["rejected"] == masked(turn("tools", "calc;") + turn("user", "2+2?") + head, b("5") + [IM_END, NL])
    assert "'<think></think>'" in capsys.readouterr().err
    assert second["chosen"] == masked(turn("tools", "calc;web;") + turn("user", "2+2?") + head, b("4") + [IM_END, NL])
    (sft,) = encode(tools_tokenizer, {"messages": u + [msg("assistant", "4")], "tools": [{"name": "calc"}],
                                      "chat_template_kwargs": {"thinking": True}}, kind="sft")
    assert sft == masked(turn("tools", "calc;") + turn("user", "2+2?") + head, b("4") + [IM_END, NL])


def test_prompt_with_system_turn_tool_call_and_tool_result(tools_tokenizer):
    prompt = [msg("system", "Use tools."), msg("user", "7*6?"),
              {"role": "assistant", "tool_calls": [{"name": "calc"}]},  # no content: a tool call
              msg("tool", "42"), msg("user", "So?")]
    (pair,) = encode(tools_tokenizer, {"prompt": prompt, "chosen": [msg("assistant", "42")],
                                       "rejected": [msg("assistant", "41")], "chat_template_kwargs": {"thinking": 1}})
    ids = (turn("system", "Use tools.") + turn("user", "7*6?") + turn("assistant", "call calc") + turn("tool", "42")
           + turn("user", "So?") + [IM_START] + b("assistant\n"))
    assert pair["chosen"] == masked(ids, b("42") + [IM_END, NL])


def test_bad_rows_are_one_line_errors_naming_the_row(tiny_tokenizer, tools_tokenizer):
    base = {"prompt": "q", "chosen": "a", "rejected": "b"}
    for extra, message in [({"tools": 5}, "'tools' must be a list of tool schemas"),
                           ({"tools": "[calc]"}, "'tools' is a string but not JSON"),
                           ({"tools": ["calc"]}, "'tools' must be a list of tool schemas"),
                           ({"chat_template_kwargs": ["x"]}, "'chat_template_kwargs' must be an object"),
                           ({"chat_template_kwargs": {"tokenize": False}}, "'chat_template_kwargs' must be an object"),
                           ({"chosen": [msg("assistant", "a")], "rejected": [msg("assistant", "b")]},
                            "'prompt' and 'chosen' must both be strings or both be messages")]:
        with pytest.raises(UsageError, match=rf"^f.jsonl line 2: {message}"):
            encode(tiny_tokenizer, base, {**base, **extra})
    with pytest.raises(UsageError, match=r"^f.jsonl line 1: the chat template failed: no bad roles$"):
        encode(tools_tokenizer, {"prompt": [msg("bad", "q")], "chosen": [msg("assistant", "a")],
                                 "rejected": [msg("assistant", "b")]})
    # no common prefix at all is a valid row: the prompt is empty
    (pair,) = encode(tiny_tokenizer, {"chosen": "yes", "rejected": "no"})
    assert pair["chosen"] == masked([], b("yes") + [IM_END])


def test_cli_bad_tools_is_exit_2_one_line(tmp_path):
    data = tmp_path / "prefs.jsonl"
    data.write_text(json.dumps({"chosen": "a", "rejected": "b"}) + "\n"
                    + json.dumps({"chosen": "a", "rejected": "b", "tools": {"name": "calc"}}) + "\n")
    done = alignkit("train", "method=dpo", "model=tiny", f"data.path={data}", f"run.dir={tmp_path / 'run'}")
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1].endswith("prefs.jsonl line 2: 'tools' must be a list of tool "
                                                         "schemas (JSON objects) or its JSON string")
    assert "Traceback" not in done.stderr


def test_sampling_prompts_of_implicit_prompt_rows():
    u, a, a2 = msg("user", "Q"), msg("assistant", "A"), msg("assistant", "B")
    assert row_prompt({"prompt": "q", "chosen": "a", "rejected": "b"}) == "q"
    assert row_prompt({"chosen": "Q: x A: 1", "rejected": "Q: x A: 2"}) == "Q: x A:"
    assert row_prompt({"chosen": [u, a], "rejected": [u, a2]}) == [u]
    assert row_prompt({"messages": [u, a]}) is None
