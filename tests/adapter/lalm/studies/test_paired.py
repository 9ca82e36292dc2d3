"""Paired statistics: McNemar's exact test on known counts, the stratified paired bootstrap against
the normal approximation, and item alignment by id."""

import math

import numpy as np
import pytest

from adapter.lalm.studies.paired import aligned, mcnemar_exact, paired_difference


def test_mcnemar_exact_on_known_counts():
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)  # 5 discordant pairs all one way: 2 x 0.5^5
    assert mcnemar_exact(3, 3) == 1.0 and mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(10, 2) == pytest.approx(2 * sum(math.comb(12, k) for k in range(3)) / 2**12)
    with pytest.raises(ValueError, match=">= 0"):
        mcnemar_exact(-1, 2)


def test_paired_bootstrap_matches_the_normal_interval_and_keeps_strata():
    rng = np.random.default_rng(0)
    a = [list(rng.random(400) < 0.7) for _ in range(3)]
    b = [list(rng.random(400) < 0.6) for _ in range(3)]
    r = paired_difference(a, b)
    d = np.concatenate([np.array(x, int) - np.array(y, int) for x, y in zip(a, b, strict=True)])
    assert r.diff == pytest.approx(d.mean()) and r.n == 1200
    assert (r.a_only, r.b_only) == (int((d == 1).sum()), int((d == -1).sum()))
    half = 1.96 * d.std() / math.sqrt(len(d))  # the normal approximation, for 1200 items
    assert r.low == pytest.approx(r.diff - half, abs=0.006) and r.high == pytest.approx(r.diff + half, abs=0.006)
    assert r.excludes_zero() and r.p_mcnemar == pytest.approx(mcnemar_exact(r.a_only, r.b_only)) and r.p_mcnemar < 0.05
    assert paired_difference(a, b) == r  # the resampler is seeded: a rerun is identical
    same = paired_difference(a, a)
    assert (same.diff, same.low, same.high, same.p_mcnemar) == (0.0, 0.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="stratum 1: a has 400 items, b 3"):
        paired_difference(a, [b[0], b[1][:3], b[2]])


def test_aligned_pairs_items_by_id():
    rows_a = [{"id": "x", "ok": True, "c": "s"}, {"id": "y", "ok": False, "c": "m"}, {"id": "z", "ok": True, "c": "s"}]
    rows_b = [{"id": "z", "ok": False}, {"id": "x", "ok": True}]
    assert aligned(rows_a, rows_b, "ok") == ([True, True], [True, False])
    assert aligned(rows_a, rows_b, "ok", keep=lambda r: r["id"] == "z") == ([True], [False])


def test_aligned_refuses_repeated_ids():
    """Issue 39 item 3: with a repeated id the later row won the lookup and items were mispaired
    (a paired difference of -0.50 where it is 0.00)."""
    a = [{"id": "x", "ok": True}, {"id": "x", "ok": False}]
    b = [{"id": "x", "ok": True}, {"id": "y", "ok": False}]
    with pytest.raises(ValueError, match=r"prediction rows of a repeat ids \['x'\]"):
        aligned(a, b, "ok")
    with pytest.raises(ValueError, match=r"prediction rows of b repeat ids \['x'\]"):
        aligned(b, a, "ok")
