"""`pagellm bench soak`'s pure parts: the RSS slope fit and the report."""

import os

import pytest

from pagellm.benchmarks.soak import SoakConfig, SoakStats, process_tree_rss, rss_slope_mib_per_min, summarize_soak

MIB = 1 << 20


def test_rss_slope_fits_the_post_warmup_line():
    # 100 MiB flat during warm-up, then +2 MiB per minute: only the second part counts.
    samples = [(t, 100 * MIB) for t in range(0, 60, 5)]
    samples += [(t, int((100 + 2 * (t - 60) / 60) * MIB)) for t in range(60, 600, 5)]
    assert rss_slope_mib_per_min(samples, warmup_s=60) == pytest.approx(2.0, abs=1e-3)
    assert rss_slope_mib_per_min(samples[:2], warmup_s=0) is None  # too few points for a fit


def test_summary_counts_errors_and_percentiles():
    cfg = SoakConfig(base_url="http://x", model="m", duration_s=100.0)
    stats = SoakStats(latencies_s=[i / 100 for i in range(1, 101)], errors=["chat-plain: boom"], aborted=3)
    report = summarize_soak(cfg, stats, [(t, 50 * MIB) for t in range(0, 100, 10)], 100.0)
    assert report["completed"] == 100 and report["errors"] == 1 and report["aborted_on_purpose"] == 3
    assert report["latency_ms"]["p50"] == pytest.approx(505.0)
    assert report["rss_slope_mib_per_min"] == pytest.approx(0.0, abs=1e-9)
    assert report["rss_mib"]["after_warmup"] == 50.0


def test_process_tree_rss_of_this_process_is_positive():
    assert process_tree_rss(os.getpid()) > 0


def test_config_rejects_bad_values():
    with pytest.raises(ValueError):
        SoakConfig(base_url="http://x", model="m", duration_s=0)
    with pytest.raises(ValueError):
        SoakConfig(base_url="http://x", model="m", duration_s=1, abort_fraction=1.5)
