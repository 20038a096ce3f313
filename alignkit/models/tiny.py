"""A tiny random Llama-style model and a byte-level tokenizer, built locally.

Tests and CI use it so that nothing is downloaded. The tokenizer has one token
per byte plus the ChatML specials, and a ChatML chat template, so standard and
conversational data go through the same code paths as with a real model.
"""
from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_tokenizer(merges: tuple[tuple[str, str], ...] = ()) -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: 256 byte tokens + 4 specials (vocab 260), then one token per BPE merge
    (byte-level symbols: "Ġ" is the space), for tests of tokens that merge across a boundary."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_tiny_model(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    """2 layers, hidden 64, GQA 4/2 heads: every linear has numel % 64 == 0 (NF4 blocks)."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def save_tiny(target: Path) -> None:
    """Write the tiny model + tokenizer as a normal safetensors model dir."""
    tok = build_tiny_tokenizer()
    # vocab rounded up to a multiple of 64 so lm_head/embeddings quantise in NF4 blocks
    vocab = -(-len(tok) // 64) * 64
    model = build_tiny_model(vocab)
    model.save_pretrained(target)
    tok.save_pretrained(target)
