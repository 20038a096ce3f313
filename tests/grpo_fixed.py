"""Deterministic GRPO/RLOO 'samples' for tests that compare numbers across runs (chunked vs not, two processes vs
one): each prompt's dataset reply cut to 2..G+1 tokens plus 0..3 more by the prompt's length (so that processes
hold different token counts), all but the first ending in EOS, the first one truncated.

Run as a script, it is `alignkit` with these samples in place of sampling (torchrun starts it as a user would
start alignkit: python -m torch.distributed.run ... tests/grpo_fixed.py train OVERRIDES...).
"""
import sys


def fixed_completions(ctx, examples):
    out = []
    for e in examples:
        reply = ctx.tokenizer(e["row"]["completion"][0]["content"])["input_ids"]
        extra = len(e["prompt_ids"]) % 4
        for k in range(ctx.cfg.method.num_generations):
            tokens = reply[: 2 + k + extra] + ([ctx.tokenizer.eos_token_id] if k else [])
            out.append({"prompt": e["prompt_ids"], "response": tokens, "truncated": k == 0, "row": e["row"],
                        "text": ctx.tokenizer.decode(tokens, skip_special_tokens=True)})
    return out


if __name__ == "__main__":
    from alignkit.cli import main
    from alignkit.methods import critic_free

    critic_free.generate = fixed_completions
    sys.exit(main(sys.argv[1:]))
