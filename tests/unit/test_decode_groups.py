"""Decode sequences are attended in groups of similar context length.

One padded attention call for a whole decode batch makes every stream pay for
the longest context in it (8 streams at 128 tokens beside one at 2,048 took
6.4x the step of the 8 alone); groups bound that padding.
"""

from __future__ import annotations

from pdserve.common.engine.model_runner import GROUP_MIN_TOKENS, GROUP_SPAN, group_by_context


def test_short_contexts_share_one_group():
    assert group_by_context([5, 17, 100, GROUP_MIN_TOKENS]) == [(0, 4)]


def test_a_long_context_beside_short_ones_is_attended_on_its_own():
    assert group_by_context([129] * 8 + [2049]) == [(0, 8), (8, 9)]


def test_groups_cover_every_row_in_order_and_bound_their_padding():
    lens = sorted([3, 40, 260, 300, 515, 600, 1000, 1100, 1999, 2000, 4100, 9000])
    groups = group_by_context(lens)
    assert [i for a, b in groups for i in range(a, b)] == list(range(len(lens)))
    for a, b in groups:
        longest, shortest = lens[b - 1], lens[a]
        assert longest <= GROUP_MIN_TOKENS or longest <= GROUP_SPAN * shortest
    assert [lens[a:b] for a, b in groups] == [[3, 40], [260, 300, 515], [600, 1000, 1100], [1999, 2000], [4100], [9000]]
