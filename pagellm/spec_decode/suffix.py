"""Suffix decoding: propose the most frequent continuation of the context's longest indexed suffix.

Two count tries over token sequences, each capped at `max_tree_depth` levels:
- one per running request, over its prompt and accepted outputs, extended as tokens arrive;
- one global trie over the outputs of the last `max_cached_requests` finished requests (oldest
  finished evicted first), so a request that repeats an earlier answer gets proposals too.

A trie node stands for a substring (its path from the root) and counts where it occurs. The
probability of a continuation is its child's count over the counts of all children (an
occurrence at the very end of a sequence has no continuation and does not count). Proposing:
for every suffix of the context of length m present in a trie, walk the most frequent children
while the path's probability stays >= `min_token_prob`, for at most min(k, max_spec_factor * m)
tokens; the walk's score is the sum of its path probabilities (the expected number of accepted
tokens), and the best-scoring walk over both tries wins.

Memory stays linear in the indexed tokens: a branch that only one occurrence reaches is not
built node by node but kept as a reference (tokens, position) into that occurrence's sequence;
it becomes a real node (a split) when a second occurrence arrives. So an appended token costs
one step for each suffix node that occurred before (at most max depth), not a rebuild.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

from pagellm.spec_decode.proposer import Proposer


class _Node:
    """A substring seen `count` times; children keyed by the next token."""

    __slots__ = ("count", "children", "child_total", "best", "best_count")

    def __init__(self, count: int) -> None:
        self.count = count
        self.children: dict[int, Union["_Node", tuple[list[int], int]]] = {}
        self.child_total = 0  # sum of the children's counts: occurrences that continue
        self.best: Optional[int] = None  # token of the most frequent child; None: recompute
        self.best_count = 0

    def bump(self, token: int, count: int) -> None:
        """Child `token` was just incremented to `count`."""
        self.child_total += 1
        if self.best is not None and count > self.best_count:
            self.best, self.best_count = token, count
        elif self.best is None and len(self.children) == 1:
            self.best, self.best_count = token, count

    def best_child(self) -> int:
        if self.best is None:
            self.best = max(self.children, key=lambda t: _count(self.children[t]))
            self.best_count = _count(self.children[self.best])
        return self.best


# A child that only one occurrence reaches: (that occurrence's tokens, index of the child's token).
_Ref = tuple[list[int], int]


def _count(child: Union[_Node, _Ref]) -> int:
    return child.count if isinstance(child, _Node) else 1


class _Trie:
    """A depth-capped count trie of all substrings of the sequences put in it."""

    def __init__(self, max_depth: int) -> None:
        self.max_depth = max_depth
        self.root = _Node(0)

    def extend(self, tokens: list[int], active: list[tuple[int, _Node]], token: int) -> list[tuple[int, _Node]]:
        """Appends `token` to `tokens` (a sequence in this trie) and indexes the new suffixes.

        `active` holds (start, node) for each suffix tokens[start:] that is a real node (occurred
        before); suffixes seen only once live in references, which grow with `tokens` for free.
        Returns the new active list (one entry per suffix node, so O(max_depth) work)."""
        n = len(tokens)
        tokens.append(token)
        active.append((n, self.root))
        kept: list[tuple[int, _Node]] = []
        for start, node in active:
            depth = n + 1 - start  # the depth of the extended suffix tokens[start:n + 1]
            child = node.children.get(token)
            if child is None:  # first occurrence of this extension: a reference, no node
                node.children[token] = (tokens, n)
                node.bump(token, 1)
                continue
            if isinstance(child, _Node):
                child.count += 1
            else:  # a second occurrence reaches the other one's branch: make it a node
                other, at = child
                child = _Node(2)
                if depth < self.max_depth and at + 1 < len(other):
                    child.children[other[at + 1]] = (other, at + 1)
                    child.bump(other[at + 1], 1)
                node.children[token] = child
            node.bump(token, child.count)
            if depth < self.max_depth:
                kept.append((start, child))
        return kept

    def insert(self, tokens: Sequence[int]) -> list[int]:
        """Indexes a whole sequence; returns the stored copy (what `remove` takes)."""
        stored: list[int] = []
        active: list[tuple[int, _Node]] = []
        for token in tokens:
            active = self.extend(stored, active, token)
        return stored

    def remove(self, tokens: list[int]) -> None:
        """Takes every occurrence of a sequence inserted before back out."""
        for start in range(len(tokens)):
            node = self.root
            for pos in range(start, min(len(tokens), start + self.max_depth)):
                token = tokens[pos]
                child = node.children[token]
                node.child_total -= 1
                if node.best == token:
                    node.best = None
                if isinstance(child, _Node) and child.count > 1:
                    child.count -= 1
                    node = child
                    continue
                del node.children[token]  # only this occurrence went there: drop the branch
                break

    def match(self, context: Sequence[int], m: int) -> Union[_Node, _Ref, None]:
        """Where the last m tokens of `context` lead from the root, or None."""
        node: Union[_Node, _Ref] = self.root
        for token in context[len(context) - m:]:
            if isinstance(node, _Node):
                child = node.children.get(token)
                if child is None:
                    return None
                node = child if isinstance(child, _Node) else (child[0], child[1] + 1)
            else:
                seq, at = node
                if at >= len(seq) or seq[at] != token:
                    return None
                node = (seq, at + 1)
        return node


@dataclass
class _Draft:
    tokens: list[int] = field(default_factory=list)
    score: float = 0.0


def _walk(trie: _Trie, start: Union[_Node, _Ref], depth: int, max_len: int, min_prob: float) -> _Draft:
    """Greedy most-frequent path below `start` (a node, or a reference: seq[at] comes next)."""
    draft = _Draft()
    prob = 1.0
    node = start
    while len(draft.tokens) < max_len and depth < trie.max_depth:
        if isinstance(node, _Node):
            if not node.children:
                break
            token = node.best_child()
            child = node.children[token]
            step = prob * _count(child) / node.child_total
            if step < min_prob:
                break
            prob = step
            node = child if isinstance(child, _Node) else (child[0], child[1] + 1)
        else:  # one occurrence: its tokens follow with certainty
            seq, at = node
            if at >= len(seq):
                break
            token = seq[at]
            node = (seq, at + 1)
        draft.tokens.append(token)
        draft.score += prob
        depth += 1
    return draft


@dataclass
class _RequestState:
    tokens: list[int]  # the indexed history (this request's sequence in its own trie)
    trie: _Trie
    active: list[tuple[int, _Node]]
    output_start: int  # where the outputs begin (what goes to the global trie at the end)


class SuffixProposer(Proposer):
    def __init__(self, max_tree_depth: int = 24, max_cached_requests: int = 1000, max_spec_factor: float = 1.0,
                 min_token_prob: float = 0.1) -> None:
        if max_tree_depth < 2:
            raise ValueError(f"suffix_max_tree_depth: must be >= 2, got {max_tree_depth}")
        if max_cached_requests < 0:
            raise ValueError(f"suffix_max_cached_requests: must be >= 0, got {max_cached_requests}")
        if not max_spec_factor > 0:
            raise ValueError(f"suffix_max_spec_factor: must be > 0, got {max_spec_factor}")
        if not 0.0 <= min_token_prob <= 1.0:
            raise ValueError(f"suffix_min_token_prob: must be in [0, 1], got {min_token_prob}")
        self.max_depth = max_tree_depth
        self.max_cached_requests = max_cached_requests
        self.max_spec_factor = max_spec_factor
        self.min_token_prob = min_token_prob
        self._requests: dict[str, _RequestState] = {}
        self._global = _Trie(max_tree_depth)
        self._cached: OrderedDict[str, list[int]] = OrderedDict()  # req id -> output in the global trie

    @classmethod
    def from_config(cls, config) -> "SuffixProposer":
        return cls(config.suffix_max_tree_depth, config.suffix_max_cached_requests, config.suffix_max_spec_factor,
                   config.suffix_min_token_prob)

    # -- per-request tries -------------------------------------------------------------------------
    def _sync(self, req_id: str, history: Sequence[int], prompt_len: Optional[int]) -> _RequestState:
        """The request's trie, extended by the tokens it has not indexed yet; rebuilt when the
        history is not an extension of what was indexed (recomputed or replaced)."""
        if not isinstance(history, list):  # numpy arrays / tensors: plain ints, compared in one go
            history = history.tolist() if hasattr(history, "tolist") else list(history)
        state = self._requests.get(req_id)
        if state is not None:
            done = len(state.tokens)
            if len(history) < done or history[:done] != state.tokens:
                state = None
        if state is None:
            old = self._requests.get(req_id)
            if prompt_len is not None:
                output_start = prompt_len
            elif old is not None:
                output_start = min(old.output_start, len(history))
            else:  # first seen right after prefill: the prompt and one sampled token
                output_start = max(len(history) - 1, 0)
            state = _RequestState([], _Trie(self.max_depth), [], output_start)
            self._requests[req_id] = state
        for token in history[len(state.tokens):]:
            state.active = state.trie.extend(state.tokens, state.active, int(token))
        return state

    def _max_len(self, m: int, k: int) -> int:
        return min(k, int(self.max_spec_factor * m))

    def _best_local(self, state: _RequestState, k: int) -> _Draft:
        best = _Draft()
        n = len(state.tokens)
        for start, node in state.active:  # longest suffix first
            m = n - start
            limit = self._max_len(m, k)
            if limit <= best.score:  # a score is at most its length; shorter matches allow no more
                break
            if node.children:
                draft = _walk(state.trie, node, m, limit, self.min_token_prob)
                if draft.score > best.score:
                    best = draft
        return best

    def _best_global(self, context: list[int], k: int) -> _Draft:
        best = _Draft()
        if not self._cached:
            return best
        # A suffix in the trie means its own suffixes are too: bisect for the longest one.
        lo, hi = 0, min(self.max_depth - 1, len(context))
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self._global.match(context, mid) is None:
                hi = mid - 1
            else:
                lo = mid
        for m in range(lo, 0, -1):
            limit = self._max_len(m, k)
            if limit <= best.score:
                break
            draft = _walk(self._global, self._global.match(context, m), m, limit, self.min_token_prob)
            if draft.score > best.score:
                best = draft
        return best

    def propose(self, histories: Sequence[Sequence[int]], num_tokens: Sequence[int],
                req_ids: Optional[Sequence[str]] = None,
                prompt_lens: Optional[Sequence[int]] = None) -> list[list[int]]:
        if req_ids is None:
            raise ValueError("the suffix proposer keeps a trie per request: propose() needs req_ids")
        out = []
        for i, (req_id, history, k) in enumerate(zip(req_ids, histories, num_tokens)):
            state = self._sync(req_id, history, None if prompt_lens is None else prompt_lens[i])
            if k <= 0:
                out.append([])
                continue
            local = self._best_local(state, k)
            glob = self._best_global(state.tokens, k)
            out.append(glob.tokens if glob.score > local.score else local.tokens)
        return out

    # -- the global trie ---------------------------------------------------------------------------
    def request_finished(self, req_id: str) -> None:
        state = self._requests.pop(req_id, None)
        if state is None or self.max_cached_requests == 0:
            return
        output = state.tokens[state.output_start:]
        if req_id in self._cached:  # the same id finished again: its newer output replaces the old
            self._global.remove(self._cached.pop(req_id))
        if len(output) < 2:
            return
        self._cached[req_id] = self._global.insert(output)
        while len(self._cached) > self.max_cached_requests:
            _, oldest = self._cached.popitem(last=False)
            self._global.remove(oldest)

    @property
    def num_cached_requests(self) -> int:
        return len(self._cached)

    @property
    def num_active_requests(self) -> int:
        return len(self._requests)
