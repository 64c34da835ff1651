"""`edit-like` prompts: rewrite a given block and output it whole (input-grounded work).

Each prompt is an instruction followed by a generated block of about `block_len` tokens: Python
functions with one variable to rename, a paragraph with typos to fix, or a JSON document with one
value to change. A faithful answer repeats the block with a few edits, so most output tokens
already occur in the prompt: the workload where n-gram / suffix speculation finds long matches.
The prompt ends with the opening of the answer (a code fence or a label), so completion-style
prompts start the copy right away; as a chat message it reads the same.

Everything comes from the seed (word lists below, `random.Random`); nothing is downloaded.
"""

from __future__ import annotations

import json
import random
from typing import Callable

KINDS = ("rename", "typos", "json")

_NOUNS = ("order", "item", "price", "user", "account", "record", "batch", "window", "report", "cache", "event",
          "invoice", "sensor", "reading", "message", "buffer", "request", "budget", "route", "schedule")
_VERBS = ("updates", "checks", "sends", "stores", "reads", "merges", "filters", "counts", "sorts", "builds")
_ADJECTIVES = ("recent", "large", "small", "pending", "active", "stale", "daily", "remote", "local", "valid")
_ADVERBS = ("quickly", "carefully", "twice", "again", "quietly", "early", "often", "rarely", "safely", "later")
_OPS = ("+", "-", "*")


def _name(rng: random.Random) -> str:
    return f"{rng.choice(_ADJECTIVES)}_{rng.choice(_NOUNS)}"


def _function(rng: random.Random, shared: str) -> str:
    """A small plausible function; `shared` (the variable to rename) appears in every one."""
    params = [shared] + rng.sample([_name(rng) for _ in range(6)], 2)
    total, step = f"total_{rng.choice(_NOUNS)}", f"{rng.choice(_NOUNS)}_value"
    lines = [f"def {rng.choice(_VERBS)[:-1]}_{rng.choice(_NOUNS)}s({', '.join(params)}):", f"    {total} = 0"]
    for _ in range(rng.randint(2, 4)):
        a, b = rng.sample(params, 2)
        pick = rng.randrange(3)
        if pick == 0:
            lines += [f"    for {step} in {a}:", f"        {total} {rng.choice(_OPS)}= {step} * {rng.randint(2, 99)}"]
        elif pick == 1:
            lines += [f"    if {a} > {rng.randint(1, 500)}:",
                      f"        {b} = {a} {rng.choice(_OPS)} {rng.randint(1, 9)}"]
        else:
            lines += [f"    {total} = {total} {rng.choice(_OPS)} len({a}) + {b}"]
    lines.append(f"    return {total} {rng.choice(_OPS)} {shared}")
    return "\n".join(lines) + "\n"


def _typo(rng: random.Random, word: str) -> str:
    i = rng.randrange(len(word) - 1)
    return word[:i] + word[i + 1] + word[i] + word[i + 2:]


def _sentence(rng: random.Random) -> str:
    words = ["The", rng.choice(_ADJECTIVES), rng.choice(_NOUNS), rng.choice(_VERBS), "the", rng.choice(_ADJECTIVES),
             rng.choice(_NOUNS), rng.choice(_ADVERBS), "before", "each", rng.choice(_NOUNS), rng.choice(_VERBS)]
    words = [_typo(rng, w) if len(w) >= 4 and rng.random() < 0.12 else w for w in words]
    return " ".join(words) + "."


def _json_entry(rng: random.Random, index: int) -> str:
    entry = {"id": index, "name": _name(rng), "enabled": rng.random() < 0.5, "timeout_ms": rng.randint(10, 9999),
             "tags": rng.sample(_NOUNS, 2)}
    return json.dumps(entry)


def _grow(rng: random.Random, count: Callable[[str], int], make: Callable[[int], str], block_len: int,
          sep: str) -> str:
    """Joins generated units while that brings their token count closer to `block_len` (each
    unit counted alone: a close estimate of the joined block's length); at least one unit."""
    units, total = [], 0
    while total < block_len:
        unit = make(len(units))
        size = count(unit + sep)
        if units and total + size - block_len > block_len - total:  # overshoot beyond the shortfall
            break
        units.append(unit)
        total += size
    return sep.join(units)


def edit_prompt(rng: random.Random, count: Callable[[str], int], block_len: int) -> tuple[str, str]:
    """(prompt text, the block in it) for one request."""
    kind = KINDS[rng.randrange(len(KINDS))]
    if kind == "rename":
        old = _name(rng)
        new = f"{rng.choice(_ADJECTIVES)}_{rng.choice(_NOUNS)}_count"
        block = _grow(rng, count, lambda _: _function(rng, old), block_len, "\n\n")
        head = (f"Rewrite the following Python code, renaming the variable `{old}` to `{new}`, and output the "
                f"whole code:\n\n```python\n")
        return f"{head}{block}```\n\nRewritten code:\n```python\n", block
    if kind == "typos":
        block = _grow(rng, count, lambda _: _sentence(rng), block_len, " ")
        return f"Fix the typos in this paragraph and output it in full:\n\n{block}\n\nCorrected paragraph:\n", block
    key = "timeout_ms"
    value = rng.randint(10, 9999)
    block = _grow(rng, count, lambda i: "  " + _json_entry(rng, i), block_len, ",\n")
    block = "[\n" + block + "\n]"
    return (f"In the JSON document below, set every \"{key}\" to {value} and output the whole document:\n\n"
            f"```json\n{block}\n```\n\nUpdated document:\n```json\n", block)
