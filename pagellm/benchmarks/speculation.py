"""Speculative decoding's counters over one benchmark run, for the result JSON and the printed line."""

from __future__ import annotations

from typing import Optional


def spec_snapshot(engine) -> Optional[object]:
    """The engine core's running totals (a SpecDecodeStats), or None with speculation off."""
    return engine.core.stats().spec_decode


def spec_summary(before, after) -> Optional[dict]:
    """What the run between two snapshots proposed and accepted; None with speculation off."""
    if after is None:
        return None
    drafts = after.num_drafts - (before.num_drafts if before else 0)
    proposed = after.num_draft_tokens - (before.num_draft_tokens if before else 0)
    accepted = after.num_accepted_tokens - (before.num_accepted_tokens if before else 0)
    per_position = [a - (before.accepted_per_position[i] if before else 0)
                    for i, a in enumerate(after.accepted_per_position)]
    return {"num_drafts": drafts, "num_draft_tokens": proposed, "num_accepted_tokens": accepted,
            "acceptance_rate": accepted / proposed if proposed else 0.0,
            "mean_accepted_length": 1.0 + accepted / drafts if drafts else 0.0,
            "acceptance_rate_per_position": [n / drafts if drafts else 0.0 for n in per_position]}


def format_spec(summary: Optional[dict]) -> str:
    if not summary:
        return ""
    per_pos = " ".join(f"{rate:.2f}" for rate in summary["acceptance_rate_per_position"])
    return (f"speculation: {summary['num_draft_tokens']} proposed, {summary['num_accepted_tokens']} accepted "
            f"({100 * summary['acceptance_rate']:.1f}%), mean accepted length {summary['mean_accepted_length']:.2f} "
            f"tokens/step, per position [{per_pos}]")
