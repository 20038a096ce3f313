"""Unpaired data (KTO): rows, unpaired preference pairs, their mismatched pairs in a batch, bad input."""
import json

import pytest
import torch
from omegaconf import OmegaConf

from alignkit.data.collate import collate_unpaired
from alignkit.data.tasks import arithmetic_rows
from alignkit.data.tokenize import encode_pair, encode_rows, truncate
from alignkit.errors import UsageError
from alignkit.methods.kto import check_data, fix_partners

from conftest import alignkit


def data_cfg(**kw):
    return OmegaConf.create({"max_length": 256, "max_prompt_length": None, **kw})


def chat(role, text):
    return [{"role": role, "content": text}]


def test_unpaired_rows_encode_as_prompt_and_completion(tiny_tokenizer):
    tok = tiny_tokenizer
    rows = [("r1", {"prompt": "ab", "completion": "cd", "label": True}),
            ("r2", {"prompt": chat("user", "2+2?"), "completion": chat("assistant", "5"), "label": False})]
    first, second = encode_rows(tok, rows, data_cfg(), "unpaired")
    for ex, (_, row) in zip((first, second), rows):
        prompt_ids, completion_ids = encode_pair(tok, row["prompt"], row["completion"])
        assert {k: ex[k] for k in ("input_ids", "completion_mask")} == truncate(prompt_ids, completion_ids, 256, None)
        assert ex["completion_ids"] == completion_ids and ex["label"] is row["label"]
    assert tok.decode(first["completion_ids"]) == "cd<|im_end|>" and tok.decode(second["completion_ids"]) == "5<|im_end|>\n"
    # truncated rows keep their whole completion for the mismatched pairs another row's prompt makes
    (short,) = encode_rows(tok, rows[:1], data_cfg(max_length=3), "unpaired")
    assert len(short["input_ids"]) == 3 and len(short["completion_ids"]) == 3


def test_preference_rows_are_unpaired_in_trls_order(tiny_tokenizer):
    """chosen -> label true, rejected -> false, each encoded with the prompt on its own; in blocks of 1000 rows
    the chosen answers come first (as TRL's unpair_preference_dataset), an implicit prompt is extracted first."""
    tok = tiny_tokenizer
    pairs = arithmetic_rows(3, seed=0)
    rows = [(f"p{i}", {k: r[k] for k in ("prompt", "chosen", "rejected")}) for i, r in enumerate(pairs)]
    rows.append(("u", {"prompt": "ab", "completion": "cd", "label": False}))
    rows.append(("implicit", {"chosen": "Q: 1+1? A: 2", "rejected": "Q: 1+1? A: 3"}))
    examples = encode_rows(tok, rows, data_cfg(), "unpaired")
    assert [(e["source"], e["label"]) for e in examples] == [
        (0, True), (1, True), (2, True), (3, False), (4, True), (0, False), (1, False), (2, False), (4, False)]
    for e in examples[:3] + examples[5:8]:
        r = pairs[e["source"]]
        assert e["completion_ids"] == encode_pair(tok, r["prompt"], r["chosen" if e["label"] else "rejected"])[1]
    implicit = [e for e in examples if e["source"] == 4]
    assert [tok.decode(e["completion_ids"]) for e in implicit] == [" 2<|im_end|>", " 3<|im_end|>"]
    assert tok.decode(implicit[0]["input_ids"]) == "Q: 1+1? A: 2<|im_end|>"


@pytest.mark.parametrize("row,message", [
    ({"prompt": "a", "completion": "b", "label": 1}, "'label' must be true or false, not 1"),
    ({"prompt": "a", "completion": "b", "label": "true"}, "'label' must be true or false, not \"true\""),
    ({"prompt": "a", "completion": "b"}, "needs 'prompt', 'completion' and 'label'"),
    ({"completion": "b", "label": True}, "row has no 'prompt' field"),
    ({"prompt": "a", "completion": chat("assistant", "b"), "label": True}, "must both be strings or both be messages"),
])
def test_bad_unpaired_rows(tiny_tokenizer, row, message):
    with pytest.raises(UsageError, match=message):
        encode_rows(tiny_tokenizer, [("f.jsonl line 1", row)], data_cfg(), "unpaired")


def examples_of(rows_ids):
    """Unpaired examples from (prompt ids, completion ids, label), encoded with max_length=5."""
    return [{**truncate(p, c, 5, None), "completion_ids": c, "label": label} for p, c, label in rows_ids]


def test_each_row_is_paired_with_the_completion_before_it():
    ex = examples_of([([5, 6], [7], True), ([8], [9, 10], False), ([11, 12, 13], [14, 15, 16], True)])
    batch = collate_unpaired(ex, pad_id=0, max_length=5, packed=True)
    assert batch["count"] == 3 and batch["kl_pairs"] and batch["label"].tolist() == [True, False, True]
    assert batch["counts"] == {"desirable": 2, "undesirable": 1}
    ids, mask = batch["input_ids"].tolist(), batch["completion_mask"].tolist()
    # rows, then (x_i, y_{i-1}) cut to max_length=5: the first row takes the last row's whole completion
    assert ids[:3] == [[5, 6, 7, 0, 0], [8, 9, 10, 0, 0], [11, 12, 13, 14, 15]]  # row 3 cut as encoded
    assert ids[3:] == [[5, 6, 14, 15, 16], [8, 7, 0, 0, 0], [11, 12, 13, 9, 10]]
    assert mask[3:] == [[0, 0, 1, 1, 1], [0, 1, 0, 0, 0], [0, 0, 0, 1, 1]]
    # packed: a row and its pair share the row's prompt; sequences numbered rows first, as the padded rows
    packed = batch["packed"]
    assert packed["tokens"].tolist() == [1, 2, 2, 3, 1, 2]
    assert packed["input_ids"].numel() < batch["input_ids"].numel()
    # fixed partners (a precomputed reference) replace the shift; without the KL term no pairs are built
    fix_partners(ex, 2)
    assert [e["kl_completion_ids"] for e in ex] == [[9, 10], [7], [14, 15, 16]]
    fixed = collate_unpaired(ex, pad_id=0, max_length=5)["input_ids"].tolist()
    assert fixed[3:] == [[5, 6, 9, 10, 0], [8, 7, 0, 0, 0], [11, 12, 13, 14, 15]]
    alone = collate_unpaired(ex, pad_id=0, max_length=5, kl=False, packed=True)
    assert alone["input_ids"].shape[0] == 3 and not alone["kl_pairs"] and alone["packed"]["tokens"].tolist() == [1, 2, 2]


def test_class_balance_warning_and_one_label_error(capsys):
    def cfg(d, u):
        return OmegaConf.create({"method": {"desirable_weight": d, "undesirable_weight": u}})

    labels = [{"label": v} for v in [True] * 3 + [False] * 6]
    check_data(cfg(2.0, 1.0), labels)  # 2 x 3 / (1 x 6) = 1: in the paper's range
    assert capsys.readouterr().err == ""
    check_data(cfg(1.0, 1.0), labels)  # 3 / 6 = 0.5
    err = capsys.readouterr().err
    assert "= 0.5 is outside the paper's [1, 4/3]: e.g. method.desirable_weight in [2, 2.67]" in err
    with pytest.raises(UsageError, match="every training row has label=false"):
        check_data(cfg(1.0, 1.0), labels[3:])


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("rows,extra,message", [
    ([{"prompt": "a", "completion": "b", "label": True}] * 4, [],
     "data: every training row has label=true (4 rows): KTO learns from desirable"),
    ([{"prompt": "a", "completion": "b", "label": True}, {"prompt": "a", "completion": "c", "label": "no"}], [],
     "line 2: 'label' must be true or false, not \"no\""),
    ([], ["train.batch_size=1"], "train.batch_size=1 is out of range: method.loss_type=kto needs > 1 rows"),
    ([], ["method.loss_type=kl"], "Invalid value 'kl'"),
    ([], ["method=orpo", "method.beta=0"], "method.beta=0.0 is out of range"),
])
def test_bad_unpaired_input_is_one_line_and_exit_2(tmp_path, rows, extra, message):
    from alignkit.models.load import resolve_model_dir

    resolve_model_dir("alignkit:tiny")  # built into the test cache here, not by the CLI (its progress bar)
    data = [f"data.path={write_rows(tmp_path / 'rows.jsonl', rows)}"] if rows else []
    done = alignkit("train", "method=kto", "model=tiny", "data.eval_fraction=0", *data, *extra,
                    f"run.dir={tmp_path / 'run'}")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and message in lines[0], done.stderr
    assert not (tmp_path / "run").exists()


def test_an_unpaired_file_trains_and_evaluates(tmp_path):
    from alignkit.eval.run import run_eval
    from alignkit.train import execute, prepare_run

    from conftest import tiny_cfg

    rows = [{"prompt": f"Q{i}?", "completion": " yes" if i % 3 else " no", "label": bool(i % 3)} for i in range(12)]
    run = prepare_run(tiny_cfg(tmp_path, "method=kto", f"data.path={write_rows(tmp_path / 'u.jsonl', rows)}",
                               "data.eval_fraction=0.5", "train.max_steps=1"))
    assert {e["label"] for e in run.eval_examples} == {True, False}
    execute(run)
    result = run_eval([f"run={run.run_dir}"])
    assert result["rows"] == 6 and {"kl", "rewards/chosen", "rewards/rejected", "rewards/margins"} <= set(result)
    assert result["rewards/margins"] == pytest.approx(result["rewards/chosen"] - result["rewards/rejected"])
    assert torch.isfinite(torch.tensor(result["loss"]))
