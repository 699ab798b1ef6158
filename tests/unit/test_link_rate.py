"""A decode worker's KV link rate: overlapping transfers share the link, so together
they measure it; small transfers and a worker with none say nothing."""

from __future__ import annotations

import pytest

from decode_worker.link_rate import MIN_BYTES, WINDOW, LinkRate

MB = 10**6


def test_overlapping_transfers_measure_the_link_not_their_share_of_it() -> None:
    link = LinkRate()
    assert link.bytes_per_s == 0.0
    link.record(0.0, 1.0, 10 * MB)  # alone: 10 MB/s
    assert link.bytes_per_s == pytest.approx(10 * MB)
    link.record(2.0, 4.0, 20 * MB)  # two sharing [2, 4): each saw 10 MB/s of 20
    link.record(2.0, 4.0, 20 * MB)
    assert link.bytes_per_s == pytest.approx(50 * MB / 3.0)  # 50 MB over 3 busy seconds
    link.record(3.5, 5.0, 15 * MB)  # overlapping the tail: its first half second counts once
    assert link.bytes_per_s == pytest.approx(65 * MB / 4.0)


def test_small_or_empty_transfers_are_left_out_and_old_ones_age_out() -> None:
    link = LinkRate()
    link.record(0.0, 1.0, MIN_BYTES - 1)
    link.record(1.0, 1.0, 10 * MB)
    assert link.bytes_per_s == 0.0
    for i in range(WINDOW):
        link.record(10.0 + i, 11.0 + i, 2 * MB)
    link.record(100.0, 101.0, 50 * MB)  # the oldest of the window drops out
    assert link.bytes_per_s == pytest.approx((7 * 2 + 50) * MB / 8.0)
