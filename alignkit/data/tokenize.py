"""TRL's data formats -> token ids with a completion mask.

Standard rows: prompt then completion, EOS appended to the completion, and
prompt + completion tokenized jointly. Conversational rows: the prompt goes
through the chat template with the generation prompt; the completion is the
rest of the templated prompt + completion conversation (end-of-turn tokens
included), no EOS added. The completion is the token suffix after the prompt.
"""
from __future__ import annotations

import sys

from ..errors import UsageError

Example = dict  # {"input_ids": [...], "completion_mask": [...]}


def is_conversational(value) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


def _chat(tokenizer, messages, add_generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                        return_dict=True)
    return list(out["input_ids"])


def encode_prompt(tokenizer, prompt) -> list[int]:
    """A prompt alone, as it precedes a completion: chat template + generation prompt for messages."""
    if is_conversational(prompt):
        return _chat(tokenizer, prompt, add_generation_prompt=True)
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def encode_pair(tokenizer, prompt, completion) -> tuple[list[int], list[int]]:
    """Return (prompt_ids, completion_ids) for one prompt and one completion."""
    if is_conversational(completion):
        prompt = prompt if prompt is not None else []
        prompt_ids = _chat(tokenizer, prompt, add_generation_prompt=True) if prompt else []
        full = _chat(tokenizer, prompt + completion, add_generation_prompt=False)
    else:
        prompt = prompt or ""
        prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"] if prompt else []
        eos = tokenizer.eos_token or ""
        text = completion if completion.endswith(eos) else completion + eos
        full = tokenizer(prompt + text, add_special_tokens=True)["input_ids"]
    return prompt_ids, full[len(prompt_ids):]


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


def encode_sft(tokenizer, where: str, row: dict, data, completion_only: bool) -> Example | None:
    prompt, completion = sft_parts(where, row)
    if isinstance(completion, str) and prompt is not None and is_conversational(prompt):
        raise UsageError(f"{where}: prompt and completion must both be strings or both be messages")
    ex = truncate(*encode_pair(tokenizer, prompt, completion), data.max_length, data.max_prompt_length)
    if ex is not None and not completion_only:
        ex["completion_mask"] = [1] * len(ex["input_ids"])
    return ex


def encode_preference(tokenizer, where: str, row: dict, data) -> Example | None:
    prompt = _field(where, row, "prompt") if "prompt" in row else None
    chosen, rejected = _field(where, row, "chosen"), _field(where, row, "rejected")
    if is_conversational(chosen) != is_conversational(rejected):
        raise UsageError(f"{where}: 'chosen' and 'rejected' must both be strings or both be messages")
    pair = {}
    if row.get("margin") is not None:
        if not isinstance(row["margin"], (int, float)) or isinstance(row["margin"], bool):
            raise UsageError(f"{where}: 'margin' must be a number")
        pair["margin"] = float(row["margin"])
    for side, completion in (("chosen", chosen), ("rejected", rejected)):
        ex = truncate(*encode_pair(tokenizer, prompt, completion), data.max_length, data.max_prompt_length)
        if ex is None:
            return None
        pair[side] = ex
    return pair


def encode_rows(tokenizer, rows, data, kind: str, completion_only: bool = True) -> list[Example]:
    """Encode every row; rows whose prompt leaves no room for a completion are dropped, and so are
    preference pairs whose chosen and rejected tokens are the same (they carry no preference)."""
    out, same = [], []
    for source, (where, row) in enumerate(rows):
        if kind == "preference":
            ex = encode_preference(tokenizer, where, row, data)
        else:
            ex = encode_sft(tokenizer, where, row, data, completion_only)
        if ex is not None and kind == "preference" and ex["chosen"]["input_ids"] == ex["rejected"]["input_ids"]:
            same.append(where)
        elif ex is not None:
            ex["source"] = source  # the row's place in `rows`: the held-out split is over rows (data/split.py)
            out.append(ex)
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
