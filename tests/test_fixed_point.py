"""The fixed-point grid both run modes aggregate on: exact, order-independent, and refusing."""

import numpy as np
import pytest

from fedhealth.core import fixed_point


def _terms(sites: int, size: int = 2000, seed: int = 0) -> tuple[list[np.ndarray], list[float]]:
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 1000, size=sites)
    weights = [float(c / counts.sum()) for c in counts]
    updates = [rng.normal(scale=3.0, size=size).astype(np.float32) for _ in range(sites)]
    return [fixed_point.on_grid(u, a) for u, a in zip(updates, weights, strict=True)], weights


def test_grid_sum_is_the_integer_sum_in_any_order() -> None:
    terms, weights = _terms(300)
    integer = sum(np.rint(t / fixed_point.STEP).astype(np.int64) for t in terms)
    exact = np.asarray(integer, dtype=np.float64) * fixed_point.STEP
    rng = np.random.default_rng(1)
    for _ in range(3):
        order = rng.permutation(len(terms))
        assert fixed_point.sum_on_grid(terms[i] for i in order).tobytes() == exact.tobytes()
        assert fixed_point.weight_sum(weights[i] for i in order) == fixed_point.weight_sum(weights)
    # a plain float sum of the unrounded products is not order-independent: the grid is needed
    raw = [t + 1e-9 * np.sin(np.arange(len(t)) + k) for k, t in enumerate(terms)]
    sums = {np.sum([raw[i] for i in rng.permutation(len(raw))], axis=0).tobytes()
            for _ in range(3)}
    assert len(sums) > 1


def test_snap_removes_noise_below_half_a_step_and_refuses_values_off_the_grid() -> None:
    terms, _ = _terms(10)
    exact = fixed_point.sum_on_grid(terms)
    noise = np.random.default_rng(2).uniform(-1, 1, exact.shape) * fixed_point.OFF_GRID_TOLERANCE
    assert fixed_point.snap(exact + noise).tobytes() == exact.tobytes()
    shifted = exact.copy()
    shifted[17] += fixed_point.STEP / 3
    with pytest.raises(fixed_point.OffGridError, match="1 of 2000 values lie off the grid "
                                                       r"\(first at value 17"):
        fixed_point.snap(shifted)
    with pytest.raises(fixed_point.OffGridError):
        fixed_point.snap(np.array([0.0, np.nan]))


def test_terms_that_cannot_be_summed_exactly_are_refused() -> None:
    with pytest.raises(ValueError, match="at most 1.04858e.06 can be summed exactly"):
        fixed_point.on_grid(np.array([1e7]), 0.5)
    with pytest.raises(ValueError, match="is inf"):
        fixed_point.on_grid(np.array([1.0, np.nan]), 0.5)
    with pytest.raises(ValueError, match="weight sum s must be positive"):
        fixed_point.mean(np.zeros(3), 0.0)
