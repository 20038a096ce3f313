"""TRL's data formats -> token ids with a completion mask, by TRL 1.16's rules.

Standard rows: EOS is appended to the completion and prompt + completion is tokenized as one string.
Conversational rows: the prompt goes through the chat template with the generation prompt, prompt +
completion without it (no EOS added: the completion ends with the template's end-of-turn tokens); the
row's `tools` and `chat_template_kwargs` reach the template both times. The completion starts where the
tokenized prompt and the tokenized prompt + completion first differ: right after the prompt, unless a
token merges across the boundary or the template renders the prompt alone differently (warned once).
Chosen and rejected share the shorter of their two prompts. A preference row without `prompt` has an
implicit one: the longest common prefix of chosen and rejected (TRL's `extract_prompt`).

Unpaired rows (KTO) are {prompt, completion, label: true|false}; a preference row is unpaired into its chosen
(label true) and rejected (label false) answer, each encoded with the prompt on its own, as TRL's KTOTrainer.
"""
from __future__ import annotations

import json
import sys

from jinja2 import TemplateError

from ..errors import UsageError

Example = dict  # {"input_ids": [...], "completion_mask": [...]}
SET_BY_ALIGNKIT = ("conversation", "tokenize", "add_generation_prompt", "return_dict")
_divergence_warned = False  # the divergence warning is printed once per process (one run)


def is_conversational(value) -> bool:
    """A list of chat messages (dicts with a role; an assistant turn may hold tool_calls and no content)."""
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value)


def extract_prompt(chosen, rejected) -> tuple:
    """(prompt, chosen, rejected): the prompt is the longest common prefix of chosen and rejected, message by
    message or character by character; a string prompt leaves the space before the answers to them. As TRL's
    `extract_prompt`, also where one side is a prefix of the other: the last common item stays in the answers,
    so neither is empty. Where they differ from the first item on, the prompt is empty."""
    shortest = min(len(chosen), len(rejected))
    cut = next((i for i in range(shortest) if chosen[i] != rejected[i]), None)
    if cut is None:
        cut = max(shortest - 1, 0)
    elif cut > 0 and chosen[cut - 1] == " ":
        cut -= 1
    return chosen[:cut], chosen[cut:], rejected[cut:]


def template_args(where: str, row: dict) -> dict:
    """The row's `tools` (a list of tool schemas, or its JSON string) and `chat_template_kwargs`, as
    apply_chat_template keyword arguments."""
    tools = row.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{where}: 'tools' is a string but not JSON ({exc.msg})") from exc
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise UsageError(f"{where}: 'tools' must be a list of tool schemas (JSON objects) or its JSON string")
    kwargs = row.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict) or any(k in SET_BY_ALIGNKIT for k in kwargs):
        raise UsageError(f"{where}: 'chat_template_kwargs' must be an object of template variables "
                         f"(not {', '.join(SET_BY_ALIGNKIT)})")
    return {"tools": tools, **kwargs}


def common_prefix_length(ids: list[int], other: list[int]) -> int:
    n = 0
    for a, b in zip(ids, other):
        if a != b:
            break
        n += 1
    return n


def warn_divergence(where: str, dropped: str) -> None:
    global _divergence_warned
    if not _divergence_warned:
        _divergence_warned = True
        print(f"alignkit: {where}: the tokenized prompt is not a prefix of the tokenized prompt + completion (a "
              f"token merges across the boundary, or the chat template renders the prompt alone differently); "
              f"the completion starts where they diverge, leaving the prompt's end {dropped!r} out of the "
              f"training sequence (shown once; other rows may be alike)", file=sys.stderr)


def _chat(tokenizer, messages, add_generation_prompt: bool, template: dict, where: str) -> list[int]:
    try:
        out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                            return_dict=True, **template)
    except (TemplateError, ValueError) as exc:  # the template refused this row (roles, tools, no template)
        raise UsageError(f"{where}: the chat template failed: {str(exc).strip().splitlines()[0]}") from exc
    return list(out["input_ids"])


def encode_prompt(tokenizer, prompt, template: dict | None = None, where: str = "prompt") -> list[int]:
    """A prompt alone, as it precedes a completion: chat template + generation prompt for messages."""
    if is_conversational(prompt):
        return _chat(tokenizer, prompt, True, template or {}, where)
    return tokenizer(prompt)["input_ids"]


def encode_completions(tokenizer, prompt, completions: list, template: dict | None = None,
                       where: str = "data") -> tuple[list[int], list[list[int]]]:
    """(prompt_ids, [completion_ids per completion]): each prompt + completion is tokenized whole and the
    completions start at the shortest common prefix of the tokenized prompt with them (TRL's prompt_len).
    prompt None (SFT text rows) or an empty conversation: no prompt tokens."""
    template = template or {}
    if is_conversational(completions[0]):
        prompt = prompt or []
        fulls = [_chat(tokenizer, prompt + c, False, template, where) for c in completions]
        prompt_ids = _chat(tokenizer, prompt, True, template, where) if prompt else []  # HF refuses empty chats
    else:
        eos = tokenizer.eos_token or ""
        fulls = [tokenizer((prompt or "") + (c if c.endswith(eos) else c + eos))["input_ids"] for c in completions]
        prompt_ids = tokenizer(prompt)["input_ids"] if prompt is not None else []
    n = min(common_prefix_length(prompt_ids, full) for full in fulls)
    if n < len(prompt_ids):
        warn_divergence(where, tokenizer.decode(prompt_ids[n:]))
    return prompt_ids[:n], [full[n:] for full in fulls]


def encode_pair(tokenizer, prompt, completion, template: dict | None = None,
                where: str = "data") -> tuple[list[int], list[int]]:
    """Return (prompt_ids, completion_ids) for one prompt and one completion."""
    prompt_ids, (completion_ids,) = encode_completions(tokenizer, prompt, [completion], template, where)
    return prompt_ids, completion_ids


def truncate(prompt_ids, completion_ids, max_length: int, max_prompt_length) -> Example | None:
    """Keep the end of a long prompt, the start of a long completion; None if no completion fits."""
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        prompt_ids = prompt_ids[-max_prompt_length:]
    room = max_length - len(prompt_ids)
    if room <= 0:  # the prompt alone fills max_length: nothing left to train on
        return None
    completion_ids = completion_ids[:room]
    return {"input_ids": prompt_ids + completion_ids,
            "completion_mask": [0] * len(prompt_ids) + [1] * len(completion_ids)}


def _field(where: str, row: dict, key: str, kinds=(str, list)):
    if key not in row or row[key] is None:
        raise UsageError(f"{where}: row has no '{key}' field (found: {', '.join(row) or 'nothing'})")
    if not isinstance(row[key], kinds) or (isinstance(row[key], list) and not is_conversational(row[key])):
        raise UsageError(f"{where}: '{key}' must be a string or a list of {{role, content}} messages")
    return row[key]


def sft_parts(where: str, row: dict):
    """(prompt, completion) of an SFT row in any of TRL's three formats."""
    if "text" in row:
        return None, _field(where, row, "text", (str,))
    if "messages" in row:
        msgs = _field(where, row, "messages", (list,))
        if not msgs or msgs[-1]["role"] != "assistant":
            raise UsageError(f"{where}: 'messages' must end with an assistant turn")
        return msgs[:-1], msgs[-1:]
    if "prompt" in row or "completion" in row:
        return _field(where, row, "prompt"), _field(where, row, "completion")
    raise UsageError(f"{where}: an SFT row needs 'text', 'messages' or 'prompt'+'completion' "
                     f"(found: {', '.join(row) or 'nothing'})")


def same_kind(where: str, first: str, a, second: str, b) -> None:
    if is_conversational(a) != is_conversational(b):
        raise UsageError(f"{where}: '{first}' and '{second}' must both be strings or both be messages")


def encode_sft(tokenizer, where: str, row: dict, data, completion_only: bool) -> Example | None:
    prompt, completion = sft_parts(where, row)
    if prompt is not None:
        same_kind(where, "prompt", prompt, "completion", completion)
    ids = encode_pair(tokenizer, prompt, completion, template_args(where, row), where)
    ex = truncate(*ids, data.max_length, data.max_prompt_length)
    if ex is not None and not completion_only:
        ex["completion_mask"] = [1] * len(ex["input_ids"])
    return ex


def preference_parts(where: str, row: dict) -> tuple:
    """(prompt, chosen, rejected) of a preference row, the prompt explicit or implicit (no `prompt` field)."""
    chosen, rejected = _field(where, row, "chosen"), _field(where, row, "rejected")
    same_kind(where, "chosen", chosen, "rejected", rejected)
    if row.get("prompt") is None:
        return extract_prompt(chosen, rejected)
    prompt = _field(where, row, "prompt")
    same_kind(where, "prompt", prompt, "chosen", chosen)
    return prompt, chosen, rejected


def row_prompt(row: dict):
    """A row's prompt for sampling: its `prompt`, or the implicit one of a preference row (None if neither)."""
    if row.get("prompt") is not None or not {"chosen", "rejected"} <= row.keys():
        return row.get("prompt")
    return preference_parts("row", row)[0]


def encode_preference(tokenizer, where: str, row: dict, data) -> Example | None:
    prompt, chosen, rejected = preference_parts(where, row)
    pair = {}
    if row.get("margin") is not None:
        if not isinstance(row["margin"], (int, float)) or isinstance(row["margin"], bool):
            raise UsageError(f"{where}: 'margin' must be a number")
        pair["margin"] = float(row["margin"])
    prompt_ids, answers = encode_completions(tokenizer, prompt, [chosen, rejected], template_args(where, row), where)
    for side, completion_ids in zip(("chosen", "rejected"), answers):
        ex = truncate(prompt_ids, completion_ids, data.max_length, data.max_prompt_length)
        if ex is None:
            return None
        pair[side] = ex
    return pair


def unpaired_parts(where: str, row: dict) -> list[tuple]:
    """[(prompt, completion, label)] of a row for unpaired learning: an unpaired row's own, or a preference
    row's chosen (label true) and rejected (label false) answers."""
    if "label" not in row and {"chosen", "rejected"} <= row.keys():
        prompt, chosen, rejected = preference_parts(where, row)
        return [(prompt, chosen, True), (prompt, rejected, False)]
    prompt, completion = _field(where, row, "prompt"), _field(where, row, "completion")
    same_kind(where, "prompt", prompt, "completion", completion)
    if "label" not in row:
        raise UsageError(f"{where}: an unpaired row needs 'prompt', 'completion' and 'label' (true or false), or "
                         f"'chosen' and 'rejected' (found: {', '.join(row)})")
    if not isinstance(row["label"], bool):
        raise UsageError(f"{where}: 'label' must be true or false, not {json.dumps(row['label'])}")
    return [(prompt, completion, row["label"])]


def encode_unpaired(tokenizer, where: str, row: dict, data) -> list[Example]:
    """The row's unpaired examples: {input_ids, completion_mask, label, completion_ids (before truncation:
    a mismatched pair puts this completion after another prompt)}; those with no room for a completion dropped."""
    out = []
    for prompt, completion, label in unpaired_parts(where, row):
        prompt_ids, completion_ids = encode_pair(tokenizer, prompt, completion, template_args(where, row), where)
        ex = truncate(prompt_ids, completion_ids, data.max_length, data.max_prompt_length)
        if ex is not None:
            out.append({**ex, "label": label, "completion_ids": completion_ids})
    return out


UNPAIR_BLOCK = 1000  # TRL unpairs preference rows in blocks of 1000 (datasets' map batches)


def encode_row(tokenizer, where: str, row: dict, data, kind: str, completion_only: bool = True) -> list[Example]:
    """One row's examples for a data kind (sft, preference, unpaired); [] when it has no room for a completion."""
    if kind == "unpaired":
        return encode_unpaired(tokenizer, where, row, data)
    if kind == "preference":
        ex = encode_preference(tokenizer, where, row, data)
    else:
        ex = encode_sft(tokenizer, where, row, data, completion_only)
    return [] if ex is None else [ex]


def encode_rows(tokenizer, rows, data, kind: str, completion_only: bool = True) -> list[Example]:
    """Encode every row; rows whose prompt leaves no room for a completion are dropped, and so are
    preference pairs whose chosen and rejected tokens are the same (they carry no preference).

    Unpaired examples come in TRL's order: in each block of UNPAIR_BLOCK rows, every row's first example (an
    unpaired row, a pair's chosen answer), then the pairs' rejected answers."""
    out, same, order = [], [], []
    for source, (where, row) in enumerate(rows):
        for half, ex in enumerate(encode_row(tokenizer, where, row, data, kind, completion_only)):
            if kind == "preference" and ex["chosen"]["input_ids"] == ex["rejected"]["input_ids"]:
                same.append(where)
                continue
            ex["source"] = source  # the row's place in `rows`: the held-out split is over rows (data/split.py)
            out.append(ex)
            order.append((source // UNPAIR_BLOCK, half, source))
    out = [ex for _, ex in sorted(zip(order, out), key=lambda pair: pair[0])]
    if same and not out:
        raise UsageError(f"data: 'chosen' equals 'rejected' in every row (e.g. {same[0]}), so there is no "
                         f"preference to learn: check which columns hold the chosen and rejected answers")
    if same:
        print(f"alignkit: dropped {len(same)} rows whose 'chosen' equals 'rejected' (first: {same[0]})",
              file=sys.stderr)
    if not out:
        raise UsageError(f"data: every row was dropped: no prompt leaves room for a completion within "
                         f"data.max_length={data.max_length}; raise data.max_length or cap prompts with "
                         f"data.max_prompt_length")
    return out


def encode_prompts(tokenizer, rows, data, max_new_tokens: int) -> list[dict]:
    """Prompt-only rows (online methods) -> {"prompt_ids", "row", "source"}; long prompts keep their last tokens.
    The whole row goes along: its other columns reach the reward (the gold answer, a reward function's kwargs)."""
    keep = min(data.max_prompt_length or data.max_length, data.max_length - max_new_tokens)
    if keep < 1:
        raise UsageError(f"data.max_length={data.max_length} leaves no room for a prompt before "
                         f"method.max_new_tokens={max_new_tokens}")
    out = []
    for source, (where, row) in enumerate(rows):
        if row.get("prompt") is None:
            raise UsageError(f"{where}: a row for an online method needs a 'prompt' (found: "
                             f"{', '.join(row) or 'nothing'})")
        out.append({"prompt_ids": encode_prompt(tokenizer, row["prompt"])[-keep:], "row": row, "source": source})
    return out
