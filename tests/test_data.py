"""Tokenisation, completion masks, truncation, file loading and the built-in task."""
import json

import pytest
from omegaconf import OmegaConf

from alignkit.data.collate import collate_preference, collate_sft
from alignkit.data.load import load_rows, read_path
from alignkit.data.split import held_out_places, split_items
from alignkit.data.tasks import arithmetic_rows, judge_arithmetic
from alignkit.data.tokenize import encode_pair, encode_rows, truncate
from alignkit.errors import UsageError


def data_cfg(**kw):
    base = dict(path=None, task="arithmetic", task_size=8, limit=None, max_length=256, max_prompt_length=None,
                eval_fraction=0.0)
    return OmegaConf.create({**base, **kw})


def test_standard_row_prompt_masked_and_eos_appended(tiny_tokenizer):
    tok = tiny_tokenizer
    prompt_ids, completion_ids = encode_pair(tok, "ab", "cd")
    assert tok.decode(prompt_ids) == "ab"
    assert tok.decode(completion_ids) == "cd<|im_end|>"
    ex = truncate(prompt_ids, completion_ids, 100, None)
    assert ex["completion_mask"] == [0, 0, 1, 1, 1]


def test_conversational_row_completion_is_the_rest_of_the_template(tiny_tokenizer):
    tok = tiny_tokenizer
    prompt = [{"role": "user", "content": "2+2?"}]
    completion = [{"role": "assistant", "content": "4"}]
    prompt_ids, completion_ids = encode_pair(tok, prompt, completion)
    assert tok.decode(prompt_ids) == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    # end-of-turn tokens belong to the completion; no extra EOS is added
    assert tok.decode(completion_ids) == "4<|im_end|>\n"


def test_truncation_keeps_prompt_end_and_completion_start():
    ex = truncate([1, 2, 3, 4], [5, 6, 7], max_length=5, max_prompt_length=2)
    assert ex["input_ids"] == [3, 4, 5, 6, 7]
    ex = truncate([1, 2, 3, 4], [5, 6, 7], max_length=5, max_prompt_length=None)
    assert ex["input_ids"] == [1, 2, 3, 4, 5] and ex["completion_mask"] == [0, 0, 0, 0, 1]
    assert truncate([1, 2, 3, 4, 5], [6], max_length=5, max_prompt_length=None) is None
    assert truncate([1, 2, 3, 4, 5, 6], [7, 8], max_length=5, max_prompt_length=None) is None  # no negative slice


def test_sft_formats_and_masks(tiny_tokenizer):
    rows = [("r1", {"text": "hi"}),
            ("r2", {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}),
            ("r3", {"prompt": "q", "completion": "a"})]
    text, chat, pc = encode_rows(tiny_tokenizer, rows, data_cfg(), "sft")
    assert text["completion_mask"] == [1, 1, 1]  # "h", "i", EOS: all trained
    n_prompt = len(tiny_tokenizer.apply_chat_template([{"role": "user", "content": "q"}],
                                                      add_generation_prompt=True, return_dict=True)["input_ids"])
    assert chat["completion_mask"] == [0] * n_prompt + [1, 1, 1]  # "a", <|im_end|>, "\n"
    assert pc["completion_mask"] == [0, 1, 1]
    (full,) = encode_rows(tiny_tokenizer, rows[2:], data_cfg(), "sft", completion_only=False)
    assert full["completion_mask"] == [1, 1, 1]


def test_collators_pad_right_and_stack_chosen_then_rejected():
    a = {"input_ids": [5, 6, 7], "completion_mask": [0, 1, 1]}
    b = {"input_ids": [8, 9], "completion_mask": [0, 1]}
    batch = collate_sft([a, b], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["count"] == 3  # completion tokens that have a prediction
    pref = collate_preference([{"chosen": a, "rejected": b}], pad_id=0)
    assert pref["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]] and pref["count"] == 1


def test_malformed_jsonl_names_the_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n\n{"prompt": oops}\n')
    with pytest.raises(UsageError, match="line 3: malformed JSON"):
        read_path(str(f))


def test_row_without_chosen_is_named(tmp_path, tiny_tokenizer):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n"
                 + json.dumps({"prompt": "a", "rejected": "c"}) + "\n")
    rows = read_path(str(f))
    with pytest.raises(UsageError, match=r"p.jsonl line 2: row has no 'chosen' field"):
        encode_rows(tiny_tokenizer, rows, data_cfg(), "preference")


def test_missing_file_and_limit(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        read_path(str(tmp_path / "nope.jsonl"))
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"text": str(i)}) + "\n" for i in range(10)))
    assert len(load_rows(data_cfg(path=str(f), task=None, limit=3), seed=0)) == 3


def test_parquet_through_datasets(tmp_path):
    import datasets

    f = tmp_path / "d.parquet"
    datasets.Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}]).to_parquet(str(f))
    ((where, row),) = read_path(str(f))
    assert row == {"prompt": "a", "chosen": "b", "rejected": "c"} and "row 1" in where


def test_arithmetic_task_is_deterministic_and_judged():
    rows = arithmetic_rows(50, seed=3)
    assert rows == arithmetic_rows(50, seed=3)
    assert rows != arithmetic_rows(50, seed=4)
    for r in rows:
        assert judge_arithmetic(r["chosen"][0]["content"], r["answer"]) == 1.0
        assert judge_arithmetic(r["rejected"][0]["content"], r["answer"]) == 0.0
    assert judge_arithmetic("no number here", 3) == 0.0
    assert judge_arithmetic("5 + 2 = 7. The answer is 7.", 7) == 1.0


def test_held_out_split_is_seeded_and_disjoint():
    held = held_out_places(100, 0.1, seed=0)
    assert len(held) == 10 and held == sorted(held) and len(set(held)) == 10
    assert held_out_places(100, 0.1, seed=0) == held
    assert held_out_places(100, 0.1, seed=1) != held
    assert held_out_places(5, 0.0, seed=0) == []
    assert len(held_out_places(3, 0.01, seed=0)) == 1  # at least one row when a fraction is asked for
    assert held_out_places(1, 0.5, seed=0) == []  # never every row
    train, kept = split_items(list("abcdefghij"), [2, 7])
    assert kept == ["c", "h"] and train == list("abdefgij")  # both parts keep the file order


def test_micro_batches_shuffle_per_epoch_or_keep_file_order():
    from alignkit.session.batches import micro_batches

    assert micro_batches(list(range(10)), 4, 0, 0, shuffle=False) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    e0, e1 = micro_batches(list(range(10)), 4, 0, 0), micro_batches(list(range(10)), 4, 0, 1)
    assert sorted(sum(e0, [])) == list(range(10)) and e0 != e1  # a new seeded order each epoch
    assert micro_batches(list(range(10)), 4, 0, 0) == e0
