"""Incremental (streaming) detokenization and stop-string matching for one request.

Semantics
---------
The text of a request is ``tokenizer.decode(output_token_ids, skip_special_tokens=...)``:
the output ids decoded on their own, with no prompt context. Concatenating every delta
handed out by :meth:`IncrementalDetokenizer.get_delta` gives exactly that string, however
the ids were fed (one per step or in groups). For byte-level BPE tokenizers (GPT-2, Llama 3,
SmolLM2) this is the same as ``decode(prompt + output)`` minus ``decode(prompt)``; for
SentencePiece-style tokenizers (Llama 2, Gemma) it differs only in that a leading "▁" on the
first output token is dropped, as ``decode`` does, so an answer never starts with a stray
space. The prompt ids are accepted so that callers need not change if a prompt-aware mode is
added later; they are not used today. Decoding never applies ``clean_up_tokenization_spaces``
(it rewrites text across token boundaries, and model tokenizers leave it off).

Approach (prefix / read offsets)
--------------------------------
Only a short window of recent ids is ever decoded. ``_ids`` holds the ids from the *prefix
offset* on; ``_ids[:_read]`` is the part whose text has already been committed, and
``_prefix_text`` is its decoded text. Each new id is appended and the window is decoded; the
text beyond ``_prefix_text`` is committed once it is settled, and the window then slides so
that it starts at the old read offset. Decoding a window that starts at the same token for
both the "before" and "after" text keeps decoder effects that depend on the first token
(Metaspace / Strip removing one leading space) identical on both sides, so the difference is
the true increment. The window holds the last committed token(s) plus any unsettled ones, so
per-token work does not grow with the output length.

New text is *unsettled*, and stays in the window, while

* it ends in U+FFFD: a multi-byte UTF-8 character split across tokens is still incomplete;
* the last token that reaches the decoder is a byte-fallback token (``<0xXX>``): a
  ByteFallback decoder turns a whole run of byte tokens into U+FFFDs if any byte of the run is
  invalid, so text that looks complete can still change until a non-byte token closes the
  run. Skipped special tokens are removed before the decoder runs, so they do not close it.

``tokenizers.decoders.DecodeStream`` uses the same offsets, but it cannot flush a still
unsettled tail when the request ends, and it emits byte runs that can still change, so the
concatenated stream would not always equal ``decode``.

Stop strings are searched for in committed text only, starting far enough back that a stop
string straddling the boundary between earlier text and new text is found. When several
match, the one that ends first wins (what a character-by-character scan would find; at equal
ends, the longer one). While a request runs, :meth:`get_delta` holds back the last
``len(longest stop) - 1`` characters, which is exactly what a stop string completed later could
begin with, so no delta ever contains text that a stop string later removes.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Optional

from pagellm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_REPLACEMENT_CHAR = "\ufffd"
# SentencePiece byte-fallback pieces, e.g. "<0xE2>".
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class IncrementalDetokenizer:
    """Turns a request's generated ids into text step by step and detects stop strings."""

    def __init__(
        self,
        tokenizer: Optional["PreTrainedTokenizerBase"],
        prompt_token_ids: list[int],
        params: SamplingParams,
    ) -> None:
        # No tokenizer or detokenize=False: the request produces ids only.
        self._tokenizer = tokenizer if params.detokenize else None
        self._skip_special = params.skip_special_tokens
        self._spaces_between_special = params.spaces_between_special_tokens
        self._stops: list[str] = list(params.stop or []) if self._tokenizer is not None else []
        self._include_stop = params.include_stop_str_in_output
        # Characters a stop string completed later could already have started with.
        self._hold = max((len(s) for s in self._stops), default=1) - 1

        # Decode window (see module docstring).
        self._ids: list[int] = []
        self._read = 0
        self._prefix_text = ""
        self._in_byte_run = False
        self._skipped_cache: dict[int, bool] = {}

        # Committed text: all of it (for output_text) and the part not yet handed out.
        self._chunks: list[str] = []
        self._num_chars = 0
        self._unsent: list[str] = []
        self._tail = ""  # last `_hold` committed characters, for boundary-spanning stop search
        self._stop_matched: Optional[str] = None
        self._finished = False

    # -- public API ---------------------------------------------------------------
    def update(self, new_token_ids: list[int]) -> Optional[str]:
        """Feeds newly generated ids; returns the stop string that now matches, if any."""
        if self._tokenizer is None or self._stop_matched is not None or self._finished:
            return None
        for token_id in new_token_ids:
            self._ids.append(token_id)
            self._track_byte_run(token_id)
            if self._in_byte_run:
                continue
            piece = self._settled_piece()
            if piece and self._commit(piece):
                return self._stop_matched
        return None

    @property
    def output_text(self) -> str:
        """All committed text so far (after any stop-string truncation)."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    def get_delta(self, finished: bool) -> str:
        """Returns the text not handed out yet.

        While running, the last ``len(longest stop) - 1`` characters are held back. With
        ``finished`` the unsettled tail is decoded and committed too (call this once when the
        request ends, also when not streaming, so that ``output_text`` is complete), and
        everything left is returned.
        """
        if finished and not self._finished:
            self._flush()
        unsent = "".join(self._unsent)
        keep = 0 if finished else min(self._hold, len(unsent))
        delta, rest = unsent[: len(unsent) - keep], unsent[len(unsent) - keep :]
        self._unsent = [rest] if rest else []
        return delta

    # -- decoding -----------------------------------------------------------------
    def _decode(self, ids: list[int]) -> str:
        assert self._tokenizer is not None
        return self._tokenizer.decode(
            ids,
            skip_special_tokens=self._skip_special,
            spaces_between_special_tokens=self._spaces_between_special,
            clean_up_tokenization_spaces=False,
        )

    def _track_byte_run(self, token_id: int) -> None:
        """Keeps `_in_byte_run` true while the last token reaching the decoder is a byte token."""
        token = self._tokenizer.convert_ids_to_tokens(token_id)  # type: ignore[union-attr]
        if isinstance(token, str) and _BYTE_TOKEN.fullmatch(token):
            self._in_byte_run = True
        elif self._in_byte_run and self._skip_special and self._is_skipped(token_id):
            pass  # removed before decoding: the byte run goes on across it
        else:
            self._in_byte_run = False

    def _is_skipped(self, token_id: int) -> bool:
        """Whether `decode(..., skip_special_tokens=True)` drops this id (asked of the tokenizer
        itself, since its notion of "special" can be wider than `all_special_ids`)."""
        cached = self._skipped_cache.get(token_id)
        if cached is None:
            tok = self._tokenizer
            assert tok is not None
            cached = tok.decode([token_id], skip_special_tokens=True) == "" and (
                tok.decode([token_id], skip_special_tokens=False) != ""
            )
            self._skipped_cache[token_id] = cached
        return cached

    def _settled_piece(self) -> str:
        """Decodes the window; returns its settled new text ("" if none) and slides the window."""
        full = self._decode(self._ids)
        if len(full) <= len(self._prefix_text) or full.endswith(_REPLACEMENT_CHAR):
            return ""
        piece = full[len(self._prefix_text) :]
        # The window now starts where the committed text of this step begins.
        if self._read:
            del self._ids[: self._read]
            full = self._decode(self._ids)
        self._read = len(self._ids)
        self._prefix_text = full
        return piece

    def _flush(self) -> None:
        """Commits whatever text the window still holds back (the request has ended)."""
        self._finished = True
        if self._tokenizer is None or self._stop_matched is not None:
            return
        full = self._decode(self._ids)
        piece = full[len(self._prefix_text) :]
        self._ids, self._read, self._prefix_text = [], 0, ""
        if piece:
            self._commit(piece)

    # -- committed text and stop strings -----------------------------------------
    def _commit(self, piece: str) -> bool:
        """Appends settled text; on a stop-string match truncates and returns True."""
        start = self._num_chars
        self._chunks.append(piece)
        self._unsent.append(piece)
        self._num_chars += len(piece)
        if not self._stops:
            return False
        match = self._find_stop(self._tail + piece, base=start - len(self._tail))
        if match is None:
            window = self._tail + piece
            self._tail = window[-self._hold :] if self._hold else ""
            return False
        stop, stop_start = match
        self._truncate(stop_start + len(stop) if self._include_stop else stop_start)
        self._stop_matched = stop
        return True

    def _find_stop(self, window: str, base: int) -> Optional[tuple[str, int]]:
        """Earliest-ending stop string in `window` (which starts at text position `base`).

        `window` is the held-back tail plus the new piece: any stop string that ends inside
        the new piece starts inside it. Returns (stop, absolute start) or None.
        """
        best: Optional[tuple[int, int, str]] = None  # (end, -length, stop)
        for stop in self._stops:
            pos = window.find(stop)
            if pos < 0:
                continue
            key = (pos + len(stop), -len(stop), stop)
            if best is None or key < best:
                best = key
        if best is None:
            return None
        end, neg_len, stop = best
        return stop, base + end + neg_len

    def _truncate(self, num_chars: int) -> None:
        """Cuts committed text to its first `num_chars` characters (once, at a stop)."""
        cut = self._num_chars - num_chars
        if cut <= 0:
            return
        text = "".join(self._chunks)
        self._chunks = [text[:num_chars]]
        unsent = "".join(self._unsent)
        # The hold-back guarantees the cut lies within the text not handed out yet.
        assert cut <= len(unsent), "stop string reached into text already handed out"
        self._unsent = [unsent[: len(unsent) - cut]]
        self._num_chars = num_chars
