"""Prompt and prefix tuning: virtual tokens line up with the labels, and generation with the KV cache is right."""
import pytest
import torch

from alignkit.errors import UsageError
from alignkit.generation.sample import generate, prompt_ids
from alignkit.forward.logps import forward_token_logps, sequence_logps
from alignkit.forward.scores import last_token_scores
from alignkit.forward.virtual import input_positions
from alignkit.train import prepare_run

from conftest import tiny_cfg

N = 3  # virtual tokens in these tests


def tiny_run(tmp_path, adapter: str, method: str = "dpo", *overrides: str):
    run = prepare_run(tiny_cfg(tmp_path, f"method={method}", f"adapter={adapter}",
                               f"adapter.num_virtual_tokens={N}", *overrides))
    run.model.eval()
    return run


def test_prompt_tuning_logps_are_the_full_logits_with_the_virtual_positions_dropped(tmp_path):
    run = tiny_run(tmp_path, "prompt")
    batch = run.collate(run.train_examples[:3])
    ids = batch["input_ids"]
    with torch.no_grad():
        lp, mask = forward_token_logps(run.model, batch)
        logits = run.model(input_ids=ids, attention_mask=batch["attention_mask"]).logits  # peft's own forward
        with run.model.disable_adapter():
            ref_logits = run.model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
    assert logits.shape[1] == N + ids.shape[1] and ref_logits.shape[1] == ids.shape[1]
    logprobs = torch.log_softmax(logits.double(), -1)
    for row in range(ids.shape[0]):
        # the logit at N - 1 + t predicts token t
        total = sum(logprobs[row, N - 1 + t, ids[row, t]].item()
                    for t in range(1, ids.shape[1]) if batch["completion_mask"][row, t])
        assert (lp[row] * mask[row]).sum().item() == pytest.approx(total, rel=1e-5)


def real_text_adapter(model, text_ids: torch.Tensor) -> None:
    """Set the adapter to what a real text prefix would give: its embeddings (prompt) or its K/V (prefix)."""
    base = model.get_base_model()
    encoder = model.prompt_encoder["default"]
    with torch.no_grad():
        if model.active_peft_config.peft_type == "PROMPT_TUNING":
            encoder.embedding.weight.copy_(base.get_input_embeddings()(text_ids[0]))
            return
        cache = base.model(input_ids=text_ids, use_cache=True).cache  # the body: works for lm and score heads
        layers = len(cache.layers)
        kv = encoder.embedding.weight.view(N, 2 * layers, *cache.layers[0].keys.shape[1:2], -1)
        for layer in range(layers):  # prefix layout: (token, 2 * layer + {0: key, 1: value}, head, dim)
            kv[:, 2 * layer] = cache.layers[layer].keys[0].transpose(0, 1)
            kv[:, 2 * layer + 1] = cache.layers[layer].values[0].transpose(0, 1)


def with_text_in_front(batch: dict, text_ids: torch.Tensor) -> dict:
    rows = batch["input_ids"].shape[0]
    ones = torch.ones(rows, N, dtype=batch["attention_mask"].dtype)
    return {**batch, "input_ids": torch.cat([text_ids.expand(rows, -1), batch["input_ids"]], 1),
            "attention_mask": torch.cat([ones, batch["attention_mask"]], 1),
            "completion_mask": torch.cat([ones * 0, batch["completion_mask"]], 1)}


@pytest.mark.parametrize("adapter", ["prompt", "prefix"])
@pytest.mark.parametrize("method", ["dpo", "rm"])
def test_virtual_tokens_act_as_a_real_text_prefix(tmp_path, adapter, method):
    """Soft prompt = the embeddings of N real tokens (prefix = their keys/values): the adapted model on x
    must give the base model's numbers on [text; x], padding and positions included."""
    run = tiny_run(tmp_path, adapter, method)
    text_ids = torch.tensor([[40, 41, 42]])
    real_text_adapter(run.model, text_ids)
    batch = run.collate(run.train_examples[:3])  # right-padded rows of different lengths
    numbers = last_token_scores if method == "rm" else lambda model, b: sequence_logps(model, b)[0]
    with torch.no_grad():
        adapted = numbers(run.model, batch)
        # the base itself, not disable_adapter(): peft 0.21's fails on a prompt-learning SEQ_CLS model
        base = numbers(run.model.get_base_model(), with_text_in_front(batch, text_ids))
    torch.testing.assert_close(adapted, base, rtol=1e-5, atol=1e-5)


def greedy_without_cache(model, ids: list[int], steps: int, eos: int) -> list[int]:
    """Greedy decoding by full forwards through peft's own forward, no KV cache."""
    seq = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits[0, -1].argmax()
            seq = torch.cat([seq, nxt.view(1, 1)], 1)
            if nxt == eos:
                break
    return seq[0, len(ids):].tolist()


@pytest.mark.parametrize("adapter,extra", [("prompt", []), ("prefix", []),
                                           ("prefix", ["adapter.prefix_projection=true"])])
def test_cached_generation_equals_a_greedy_loop_without_cache(tmp_path, adapter, extra):
    run = tiny_run(tmp_path, adapter, "sft", "sample.max_new_tokens=6", "sample.batch_size=3", *extra)
    tok = run.tokenizer
    prompts = ["1+1=", "12*3=", "a"]  # left padding in one batch
    got = generate(run.model, tok, prompts, run.cfg.sample, torch.device("cpu"))
    expected = [tok.decode(greedy_without_cache(run.model, prompt_ids(tok, p), 6, tok.eos_token_id),
                           skip_special_tokens=True) for p in prompts]
    assert got == expected
    with run.model.disable_adapter():  # the reference: the base alone, as eval's gold/score_ref uses it
        ref = generate(run.model, tok, prompts, run.cfg.sample, torch.device("cpu"))
    assert ref == generate(run.model.get_base_model(), tok, prompts, run.cfg.sample, torch.device("cpu"))
    assert ref != got


def test_prompt_init_text_copies_the_token_embeddings_cyclically(tmp_path):
    run = tiny_run(tmp_path, "prompt", "sft", "adapter.init_text=ab")
    ids = run.tokenizer("ab")["input_ids"]
    assert len(ids) == 2  # byte tokenizer, no BOS
    embed = run.model.get_base_model().get_input_embeddings().weight
    torch.testing.assert_close(run.model.prompt_encoder["default"].embedding.weight, embed[[*ids, ids[0]]])  # cut or repeated to N


def test_prefix_with_gradient_checkpointing_and_empty_init_text_are_refused(tmp_path):
    with pytest.raises(UsageError, match="adapter=prefix does not work with train.gradient_checkpointing=true"):
        tiny_cfg(tmp_path, "adapter=prefix", "train.gradient_checkpointing=true")
    with pytest.raises(UsageError, match="adapter.init_text='' is out of range"):
        tiny_cfg(tmp_path, "adapter=prompt", "adapter.init_text=''")


def test_input_positions_drops_virtual_tokens_and_never_shifts():
    x = torch.arange(14).view(2, 7)
    assert input_positions(x, 4, virtual=3).tolist() == [[3, 4, 5, 6], [10, 11, 12, 13]]
    with pytest.raises(RuntimeError, match="covers 7 positions; expected 5"):
        input_positions(x, 5, virtual=0)


