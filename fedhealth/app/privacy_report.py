"""The federation's client-level privacy account: epsilon per round, from what was really summed.

The sites add the noise (sites.update_privacy); the aggregator cannot see it, but it knows how
many noise shares each round's sum holds: one per accepted train reply, out of the sites that
were asked (accepted + refused replies; at least `expected-sites` when every site is sampled).
A round summed from K_r of K asked sites carries the noise of sqrt(K_r / K) * z, not z: a site
that drops out, fails or is over its budget takes its share with it. Each round is one release
of that Gaussian mechanism for add-or-remove-one-site neighbours, composed by Opacus's RDP
accountant (`fedhealth.core.privacy_accounting`); results.json and the ServerApp log report it.
Sample-level (DP-SGD) epsilon depends on each site's data size and is reported by each site, in
its audit log.
"""

import math
from logging import INFO

from flwr.common import log

from fedhealth.core.config import RunConfig
from fedhealth.core.privacy_accounting import GaussianRelease, epsilon, epsilon_by_round
from fedhealth.core.run_history import TRAIN, RunHistory

ACCOUNTANT = "opacus RDP, add or remove one site, no sampling amplification"


def privacy_report(config: RunConfig, history: RunHistory) -> dict[str, object]:
    """What results.json says under `privacy`: the settings and, per round, the sites summed,
    the effective noise multiplier and epsilon at `dp-delta` after that round (None: no DP)."""
    report: dict[str, object] = {
        "noise_multiplier": config.dp_noise_multiplier, "clip_norm": config.dp_clip_norm,
        "delta": config.dp_delta, "sgd_noise_multiplier": config.dp_sgd_noise_multiplier,
        "sgd_clip_norm": config.dp_sgd_clip_norm, "accountant": ACCOUNTANT,
        "epsilon": None, "rounds": {}}
    if config.dp_noise_multiplier <= 0:
        return report
    rounds: dict[str, dict[str, object]] = {}
    releases: list[GaussianRelease] = []
    for server_round in sorted(history.records[TRAIN]):
        summed = len(history.sites(TRAIN, server_round))
        refused = {r.node_id for r in history.rejections
                   if r.kind == TRAIN and r.server_round == server_round}
        asked = summed + len(refused)
        if config.fraction_train == 1:  # everyone connected is asked: at least the expected sites
            asked = max(asked, config.expected_sites)
        if summed == 0:
            continue  # nothing released: the previous global is kept
        effective = config.dp_noise_multiplier * math.sqrt(summed / asked)
        releases.append(GaussianRelease(effective))
        rounds[str(server_round)] = {"sites": summed, "asked": asked,
                                     "noise_multiplier": effective}
    for entry, spent in zip(rounds.values(), epsilon_by_round(releases, config.dp_delta),
                            strict=True):
        entry["epsilon"] = spent
    report["rounds"] = rounds
    report["epsilon"] = rounds[max(rounds, key=int)]["epsilon"] if rounds else 0.0
    return report


def planned_epsilon(config: RunConfig) -> float:
    """Epsilon after every round of `config` with every site's noise share summed."""
    release = GaussianRelease(config.dp_noise_multiplier)
    return epsilon([release] * config.num_server_rounds, config.dp_delta)


def log_privacy(report: dict[str, object]) -> None:
    """One ServerApp log line per round: the epsilon the federation has spent so far."""
    rounds = report["rounds"]
    assert isinstance(rounds, dict)
    for server_round, entry in rounds.items():
        log(INFO, "Privacy, round %s: epsilon %.4g at delta %g (%d of %d sites' noise summed, "
            "noise multiplier %.4g, clip norm %g)", server_round, entry["epsilon"],
            report["delta"], entry["sites"], entry["asked"], entry["noise_multiplier"],
            report["clip_norm"])
