"""Rows and token ids for `compare_trl.py --method kto|orpo` (made up here, no download).

- kto: one arithmetic question with eight answers, five right (label true) and three wrong (false), as chat
  messages. With one prompt, each row's mismatched pair (its prompt, the answer before it) is another row's own
  answer, so after a step where the policy gains on most answers the KL reference point is well above 0 and
  its comparison is not a comparison of two clamped zeros.
- orpo: arithmetic questions written as ChatML strings (a prompt starting with <|im_start|>, answers without
  an end token): TRL's experimental ORPOTrainer tokenizes with its legacy rules (BOS prepended to a prompt that
  lacks it, the EOS id appended), which on such rows give exactly the ids alignkit's encoding (TRL 1.16's DPO
  and KTO rules) makes.
"""
from __future__ import annotations

import json
from pathlib import Path

METRICS = {  # TRL's logged names, compared at every step
    "kto": ["loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"],
    "orpo": ["loss", "nll_loss", "log_odds_ratio", "log_odds_chosen", "rewards/chosen", "rewards/rejected",
             "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected"],
}
QUESTION = "Ava has 12 apples and gets 5 more. How many apples does Ava have now?"
ANSWERS = [("12 + 5 = 17. The answer is 17.", True), ("Ava has 17 apples now.", True), ("The answer is 17.", True),
           ("12 + 5 = 18. The answer is 18.", False), ("17 apples.", True), ("12 + 5 = 7. The answer is 7.", False),
           ("She has 12 + 5 = 17 apples.", True), ("The answer is 16.", False)]


def write_rows(method: str, path: Path) -> str:
    from alignkit.data.tasks import arithmetic_rows

    if method == "kto":
        rows = [{"prompt": [{"role": "user", "content": QUESTION}],
                 "completion": [{"role": "assistant", "content": answer}], "label": label} for answer, label in ANSWERS]
    else:
        rows = [{"prompt": f"<|im_start|>user\n{r['prompt'][0]['content']}<|im_end|>\n<|im_start|>assistant\n",
                 "chosen": r["chosen"][0]["content"], "rejected": r["rejected"][0]["content"]}
                for r in arithmetic_rows(8, seed=0)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def alignkit_rows(method: str, model: str, data: str, max_length: int) -> list[dict]:
    """The token ids and completion masks alignkit trains on, as trl_kto_orpo_reference.py reports TRL's."""
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer

    from alignkit.data.collate import mismatched
    from alignkit.data.load import read_jsonl
    from alignkit.data.tokenize import encode_rows

    tok = AutoTokenizer.from_pretrained(model)
    cfg = OmegaConf.create({"max_length": max_length, "max_prompt_length": None})
    rows = read_jsonl(Path(data))
    if method == "orpo":
        return [{f"{side}_{k}": e[side][key] for side in ("chosen", "rejected")
                 for k, key in (("ids", "input_ids"), ("mask", "completion_mask"))}
                for e in encode_rows(tok, rows, cfg, "preference")]
    examples = encode_rows(tok, rows, cfg, "unpaired")
    return [{"input_ids": e["input_ids"], "mask": e["completion_mask"], "kl_input_ids": p["input_ids"],
             "kl_mask": p["completion_mask"], "label": e["label"]} for e, p in zip(examples, mismatched(examples, max_length))]
