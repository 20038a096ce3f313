"""Built-in tasks: generated deterministically from a seed, each with a gold judge.

`arithmetic`: one-step word problems (add, subtract, multiply small numbers); the
preference is about correctness.
`arithmetic_format`: the same problems, asked to finish with a last line "Answer: N"; the gold judge accepts
only that line with the right number (a verifiable reward for GRPO/RLOO: a small instruct model starts low).
`sentiment`: one-sentence reviews; SFT demonstrations take any tone (positive,
neutral, negative), the preference is about style: the positive review is chosen over
a neutral or negative one of the same shape, and the gold judge scores the tone with
a word lexicon (a different, larger word list than the one the rows are built from).
Rows are conversational (chat messages), so they go through the chat template.
"""
from __future__ import annotations

import random
import re

NAMES = ["Ava", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jade"]
THINGS = ["apples", "marbles", "stickers", "books", "coins", "pencils", "shells", "cards"]


def _problem(rng: random.Random) -> tuple[str, str, int]:
    """Return (question, worked answer sentence head, answer)."""
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    op = rng.choice(["add", "sub", "mul"])
    if op == "add":
        a, b = rng.randint(2, 50), rng.randint(2, 50)
        q = f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?"
        return q, f"{a} + {b} = ", a + b
    if op == "sub":
        a = rng.randint(10, 60)
        b = rng.randint(1, a - 1)
        q = f"{name} has {a} {thing} and gives away {b}. How many {thing} are left?"
        return q, f"{a} - {b} = ", a - b
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    q = f"{name} has {a} bags with {b} {thing} in each. How many {thing} is that in total?"
    return q, f"{a} * {b} = ", a * b


def _wrong(rng: random.Random, answer: int) -> int:
    wrong = answer + rng.choice([-10, -2, -1, 1, 2, 10])
    return wrong if wrong >= 0 and wrong != answer else answer + 1


def _reply(head: str, value: int) -> str:
    return f"{head}{value}. The answer is {value}."


def arithmetic_rows(n: int, seed: int) -> list[dict]:
    """n rows with prompt/completion (SFT) and chosen/rejected (preference) columns."""
    rng = random.Random(f"arithmetic-{seed}")
    rows = []
    for _ in range(n):
        question, head, answer = _problem(rng)
        prompt = [{"role": "user", "content": question}]
        good = [{"role": "assistant", "content": _reply(head, answer)}]
        bad = [{"role": "assistant", "content": _reply(head, _wrong(rng, answer))}]
        rows.append({"prompt": prompt, "completion": good, "chosen": good, "rejected": bad, "answer": answer})
    return rows


def judge_arithmetic(completion: str, answer: int) -> float:
    """Gold judge: 1.0 if the last integer in the completion is the answer, else 0.0."""
    numbers = re.findall(r"-?\d+", completion)
    return float(bool(numbers) and int(numbers[-1]) == answer)


FORMAT = " Finish with a last line of the form 'Answer: N', where N is the number."
ANSWER_LINE = re.compile(r"answer:\s*(-?\d+)\s*\.?", re.IGNORECASE)


def arithmetic_format_rows(n: int, seed: int) -> list[dict]:
    """The arithmetic rows with the answer-line instruction, and replies that end with it."""
    def reply(arithmetic_reply: list) -> list:
        value = re.findall(r"-?\d+", arithmetic_reply[0]["content"])[-1]  # "a + b = v. The answer is v."
        head = arithmetic_reply[0]["content"].split(" = ")[0]
        return [{"role": "assistant", "content": f"{head} = {value}.\nAnswer: {value}"}]

    rows = []
    for row in arithmetic_rows(n, seed):
        prompt = [{"role": "user", "content": row["prompt"][0]["content"] + FORMAT}]
        good = reply(row["chosen"])
        rows.append({"prompt": prompt, "completion": good, "chosen": good, "rejected": reply(row["rejected"]),
                     "answer": row["answer"]})
    return rows


def answer_line(completion: str) -> int | None:
    """N of a last non-empty line "Answer: N" (case and a final period aside), else None."""
    lines = [x.strip() for x in completion.strip().splitlines() if x.strip()]
    found = ANSWER_LINE.fullmatch(lines[-1]) if lines else None
    return int(found.group(1)) if found else None


def judge_answer_line(completion: str, answer: int) -> float:
    """Gold judge of arithmetic_format: 1.0 if the last line is "Answer: N" with the right N, else 0.0."""
    return float(answer_line(completion) == answer)


ITEMS = ["coffee shop", "hotel", "train ride", "museum", "pizza place", "concert", "hiking trail", "bakery",
         "movie", "bookstore", "gym", "beach", "ramen bar", "zoo", "bike tour", "food market"]
ASPECTS = ["staff", "price", "food", "music", "view", "service", "seating", "location"]
ASKS = ["Write a one-sentence review of the {item}.", "How was the {item}? Answer in one sentence.",
        "Describe your visit to the {item} in one sentence."]
REVIEWS = ["The {item} was {a}, and the {aspect} was {b}.", "I found the {item} {a}; the {aspect} was {b}.",
           "Overall the {item} was {a} and the {aspect} felt {b}."]
# the words reviews are built from: eight per tone, so no tone is favoured by having fewer, likelier words
TONE_WORDS = {
    "positive": ["great", "wonderful", "lovely", "excellent", "delightful", "friendly", "pleasant", "superb"],
    "neutral": ["okay", "ordinary", "average", "typical", "plain", "usual", "standard", "normal"],
    "negative": ["awful", "terrible", "dull", "disappointing", "mediocre", "poor", "boring", "bland"],
}
# the judge's lexicon: the row words plus common ones a model may use instead
POSITIVE = set(TONE_WORDS["positive"]) | {
    "good", "nice", "amazing", "love", "loved", "enjoyed", "beautiful", "best", "fantastic", "perfect", "happy",
    "helpful", "recommend", "fun", "awesome", "cozy", "clean", "fresh", "tasty", "delicious", "kind", "warm",
    "welcoming", "enjoyable", "charming", "impressive", "outstanding", "relaxing", "comfortable", "beautifully"}
NEGATIVE = set(TONE_WORDS["negative"]) | {
    "bad", "worst", "hate", "hated", "dirty", "slow", "horrible", "ugly", "noisy", "sad", "overpriced", "broken",
    "stale", "unpleasant", "rude", "unfriendly", "crowded", "boring", "annoying", "uncomfortable", "worse",
    "disappointed", "cold", "messy", "tasteless", "lousy", "gross"}
NEGATORS = {"not", "never", "no", "hardly", "barely"}


def _review(rng: random.Random, item: str, tone: str) -> str:
    template, aspect = rng.choice(REVIEWS), rng.choice(ASPECTS)
    a, b = rng.sample(TONE_WORDS[tone], 2)
    return template.format(item=item, aspect=aspect, a=a, b=b)


def sentiment_rows(n: int, seed: int) -> list[dict]:
    """n rows: an SFT review of a random tone; chosen = positive, rejected = neutral or negative."""
    rng = random.Random(f"sentiment-{seed}")
    rows = []
    for _ in range(n):
        item = rng.choice(ITEMS)
        prompt = [{"role": "user", "content": rng.choice(ASKS).format(item=item)}]
        worse = rng.choice(["neutral", "negative"])
        state = rng.getstate()  # chosen and rejected share the template and aspect: only the tone differs
        good = _review(rng, item, "positive")
        rng.setstate(state)
        bad = _review(rng, item, worse)
        demo = _review(rng, item, rng.choice(list(TONE_WORDS)))
        rows.append({"prompt": prompt, "completion": [{"role": "assistant", "content": demo}],
                     "chosen": [{"role": "assistant", "content": good}],
                     "rejected": [{"role": "assistant", "content": bad}], "answer": "positive"})
    return rows


def tone(text: str) -> str:
    """positive | neutral | negative: lexicon words counted, a negator up to two words before flips one."""
    words = re.findall(r"[a-z']+", text.lower())
    score = 0
    for i, word in enumerate(words):
        sign = (word in POSITIVE) - (word in NEGATIVE)
        if sign and any(w in NEGATORS or w.endswith("n't") for w in words[max(0, i - 2):i]):
            sign = -sign
        score += sign
    return "positive" if score > 0 else "negative" if score < 0 else "neutral"


def judge_sentiment(completion: str, answer: str) -> float:
    """Gold judge: 1.0 if the completion's tone is the wanted one (the row's answer), else 0.0."""
    return float(tone(completion) == answer)


TASKS = {"arithmetic": (arithmetic_rows, judge_arithmetic),
         "arithmetic_format": (arithmetic_format_rows, judge_answer_line),
         "sentiment": (sentiment_rows, judge_sentiment)}
