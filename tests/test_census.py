"""Census weights: proportional to the counts, none above the coordinator's cap, summing to 1."""

import pytest

from strategies.census import Census, capped_shares


@pytest.mark.parametrize(("counts", "cap"), [
    ({1: 10, 2: 20, 3: 30}, 1.0),
    ({1: 10, 2: 20, 3: 10**8}, 0.5),
    ({1: 1, 2: 1, 3: 10**8, 4: 10**8}, 0.3),  # two giants: both capped, the rest shares 0.4
    ({1: 5, 2: 7, 3: 9, 4: 11, 5: 10**7}, 0.21),
])
def test_shares_stay_under_the_cap_and_in_proportion_below_it(counts: dict[int, int],
                                                              cap: float) -> None:
    shares = capped_shares(counts, cap)
    assert sum(shares.values()) == pytest.approx(1.0)
    assert max(shares.values()) <= cap + 1e-12
    free = [n for n in counts if shares[n] < cap - 1e-12]
    ratios = {shares[n] / counts[n] for n in free}  # uncapped sites keep their proportions
    assert max(ratios) == pytest.approx(min(ratios))


def test_a_cap_no_weights_can_meet_gives_every_site_the_same_share() -> None:
    assert capped_shares({1: 1, 2: 50, 3: 10**6}, 0.2) == pytest.approx({1: 1 / 3, 2: 1 / 3,
                                                                          3: 1 / 3})


def test_uncounted_nodes_sit_out_and_the_cap_is_checked() -> None:
    census = Census(max_site_weight=0.6)
    census.count(1, 10)
    census.count(2, 30)
    assert census.unknown([1, 2, 3]) == [3]
    assert census.weights([1, 2, 3]) == pytest.approx({1: 0.4, 2: 0.6})
    with pytest.raises(ValueError, match=r"max-site-weight must be in \(0, 1\]"):
        Census(max_site_weight=0.0)
