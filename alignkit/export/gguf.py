"""Write a merged Llama-architecture model as one .gguf file (llama.cpp's layout), with the gguf package.

Weights: the names llama.cpp reads (gguf's TensorNameMap); q_proj and k_proj rows permuted the way
llama.cpp's converter does (its rotary embedding pairs neighbouring dimensions, transformers pairs the
two halves of each head; transformers' GGUF loader undoes the permutation); 1-D weights always F32;
matrices F32, F16 or Q8_0 (a row whose length is not a multiple of Q8_0's block stays F16). Tokenizer:
byte-level BPE ("gpt2") with the vocabulary padded to the model's rows ([PADn], unused), token types
(special added tokens are control tokens), merges, special token ids and the chat template
(gguf's SpecialVocab reads them from the saved tokenizer).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..errors import UsageError

GGUF_TYPES = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "q8_0": ("Q8_0", "MOSTLY_Q8_0")}


def check_llama(model) -> None:
    config = model.config
    if config.model_type != "llama":
        raise UsageError(f"export.format=gguf writes Llama-architecture models; this one is {config.model_type} "
                         f"(export it with export.format=hf and convert it with llama.cpp's convert_hf_to_gguf.py)")
    scaling = getattr(config, "rope_scaling", None) or {}
    if scaling.get("rope_type", "default") != "default":
        raise UsageError(f"export.format=gguf: rope scaling {scaling.get('rope_type')} is not written by alignkit's "
                         f"GGUF writer: export with export.format=hf and convert with llama.cpp")


def permute_rotary(weight: np.ndarray, heads: int) -> np.ndarray:
    """Rows of q_proj/k_proj from transformers' half-split rotary layout to llama.cpp's interleaved one."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def pretokenizer(tokenizer) -> str:
    """llama.cpp's name for how text is split before the merges: "smollm" (digits one by one, then the
    GPT-2 split), "gpt2", or "default" (no split rule of its own, e.g. a byte tokenizer without merges)."""
    split = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    steps = split.get("pretokenizers", [split])
    kinds = [(s.get("type"), s.get("individual_digits"), s.get("use_regex")) for s in steps]
    if kinds == [("Digits", True, None), ("ByteLevel", None, True)]:
        return "smollm"
    if kinds == [("ByteLevel", None, True)]:
        return "gpt2"
    return "default"


def write_tokenizer(writer, tokenizer, vocab_size: int) -> list[str]:
    import gguf

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if len(by_id) > vocab_size:
        raise UsageError(f"export.format=gguf: the tokenizer has {len(by_id)} tokens, more than the model's "
                         f"{vocab_size} embedding rows")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL if i not in added else
                         gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pretokenizer(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer.save_pretrained(scratch)
        special = gguf.SpecialVocab(scratch, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        # a byte tokenizer: GGUF cannot hold an empty merge list (gguf refuses empty arrays), which llama.cpp
        # requires for a BPE vocabulary; scores let transformers' reader see that there is nothing to merge
        writer.add_token_scores([0.0] * vocab_size)
    special.load_merges = bool(special.merges)  # no "merges requested but none found" warning: said below
    special.add_to_gguf(writer, quiet=True)
    if not special.merges:
        return ["the tokenizer has no BPE merges (one token per byte): transformers reads this GGUF, llama.cpp "
                "refuses a BPE vocabulary without merges"]
    return []


def tensor_data(name: str, weight: np.ndarray, kind: str):
    """(array, raw dtype) for one tensor of the requested kind."""
    import gguf
    from gguf.quants import quantize

    qtype = gguf.GGMLQuantizationType
    if weight.ndim == 1 or kind == "F32":
        return weight.astype(np.float32), qtype.F32
    if kind == "Q8_0" and weight.shape[-1] % gguf.GGML_QUANT_SIZES[qtype.Q8_0][0] == 0:
        return quantize(weight.astype(np.float32), qtype.Q8_0), qtype.Q8_0
    return weight.astype(np.float16), qtype.F16


def write_gguf(model, tokenizer, path: Path, gguf_type: str, name: str) -> list[str]:
    """model: a merged fp32 LlamaForCausalLM; path: the .gguf to write. Returns notes for the report."""
    import gguf

    check_llama(model)
    c = model.config
    kind, file_type = GGUF_TYPES[gguf_type]
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(c.rope_parameters["rope_theta"] if getattr(c, "rope_parameters", None)
                                    else c.rope_theta))
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    writer.add_file_type(getattr(gguf.LlamaFileType, file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    notes = write_tokenizer(writer, tokenizer, c.vocab_size)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and c.tie_word_embeddings:
            continue  # llama.cpp uses token_embd when output.weight is absent
        target = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise UsageError(f"export.format=gguf: no llama.cpp name for the tensor {hf_name}")
        weight = tensor.detach().to(torch.float32).cpu().numpy()
        if hf_name.endswith("q_proj.weight"):
            weight = permute_rotary(weight, c.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            weight = permute_rotary(weight, c.num_key_value_heads)
        data, raw = tensor_data(target, weight, kind)
        writer.add_tensor(target, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return notes
