"""Arithmetic word problems with checkable answers, made on the spot: a task for distilling step-by-step.

Each problem is one addition or subtraction of small numbers told as a story ("Mia has 7 coins and gives
away 3..."), with its ground truth. ``word-problems`` holds two rows per problem, one per task, in the
prompt/response format with task prefixes: a ``rationale`` row whose response is empty (the teacher writes
the reasoning) and an ``answer`` row whose response is the true answer (the teacher scores it). The
``word-problems-test`` problems are drawn from another seed and never share a question with the training
set, so accuracy on them is a held-out number. Same rows on every machine (a seeded ``random.Random``).
"""

from __future__ import annotations

import random
from typing import Iterator

PROBLEMS = 600  # training problems (two rows each)
TEST_PROBLEMS = 300
RATIONALE_PREFIX = "[rationale] "
ANSWER_PREFIX = "[answer] "
ANSWER_PATTERN = r"The answer is (-?\d+)"
"""How an answer is read back from a model's text (first group: the number)."""

_NAMES = ("Tom", "Anna", "Ben", "Mia", "Sam", "Lily", "Omar", "Nora", "Ivan", "Zoe", "Liam", "Emma")
_ITEMS = ("apples", "pens", "cards", "books", "coins", "marbles", "stamps", "shells", "stickers", "cookies")


def problem(rng: random.Random) -> dict:
    """One problem: question, a worked rationale (for few-shot examples) and the answer."""
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    if rng.random() < 0.5:
        question = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
        worked, answer = f"{name} has {a} and gets {b}, so {a} + {b} = {a + b}.", a + b
    else:
        a += b
        question = f"{name} has {a} {item} and gives away {b}. How many {item} does {name} have now?"
        worked, answer = f"{name} has {a} and gives away {b}, so {a} - {b} = {a - b}.", a - b
    return {"question": question, "worked": worked, "answer": str(answer)}


def prompt(prefix: str, question: str) -> str:
    return f"{prefix}Question: {question}\nAnswer:"


def _problems(seed: int, count: int, exclude: set[str] = frozenset()) -> Iterator[dict]:
    rng, seen = random.Random(seed), set(exclude)
    made = 0
    while made < count:
        p = problem(rng)
        if p["question"] in seen:
            continue
        seen.add(p["question"])
        made += 1
        yield p


def _train_questions() -> set[str]:
    return {p["question"] for p in _problems(0, PROBLEMS)}


def word_problems() -> Iterator[dict]:
    """Two rows per problem: the rationale task (no response: the teacher writes it) and the answer task."""
    for i, p in enumerate(_problems(0, PROBLEMS)):
        base = {"problem": i, "question": p["question"], "answer": p["answer"]}
        yield {**base, "task": "rationale", "prompt": prompt(RATIONALE_PREFIX, p["question"]), "response": ""}
        yield {**base, "task": "answer", "prompt": prompt(ANSWER_PREFIX, p["question"]), "response": f" The answer is {p['answer']}."}


def word_problems_test() -> Iterator[dict]:
    """Held-out problems (another seed, no question of the training set), answer task only."""
    for i, p in enumerate(_problems(1, TEST_PROBLEMS, exclude=_train_questions())):
        yield {"problem": i, "question": p["question"], "answer": p["answer"], "task": "answer",
               "prompt": prompt(ANSWER_PREFIX, p["question"]), "response": f" The answer is {p['answer']}."}
