"""The ServerApp: composes a strategy from the run config and runs the federation.

Encrypted runs use `strategies.EncryptedFedAvg` with the aggregator's params-only key; plaintext
runs use Flower's FedAvg behind the same reply checks with the same weights and grid arithmetic
(`strategies.CheckedFedAvg`), so the two give sites the same global bit for bit. Either way
the aggregator never builds a model: round 1 starts from the seed every site derives. The
strategy's run history is what results.json reports.
"""

import time
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from fedhealth.app.privacy_report import log_privacy, planned_epsilon, privacy_report
from fedhealth.core.config import ConfigError, RunConfig
from fedhealth.core.crypto import wire
from fedhealth.core.crypto.aggregator_key import load_aggregator_context
from fedhealth.core.crypto.signing import SIGNING_KEYS_DIR, ReplyVerifier
from fedhealth.core.run_history import RunResults, write_json_atomically
from strategies.encrypted_fedavg import EncryptedFedAvg
from strategies.plaintext_fedavg import CheckedFedAvg
from strategies.reply_check import ReplyVerifier as ReplyHook
from strategies.reply_signature import signature_hook

RunStrategy = EncryptedFedAvg | CheckedFedAvg


def build_strategy(config: RunConfig) -> RunStrategy:
    """The strategy for this run; it starts from its `global_record()` (empty but on resume).

    Plaintext runs start from an empty ArrayRecord as encrypted ones do: every site builds the
    round-1 model from the run seed, so the aggregator needs no model (nor its class count).
    """
    common: dict[str, Any] = dict(  # Flower's FedAvg sampling, the same for both strategies
        fraction_train=config.fraction_train,
        min_train_nodes=config.min_sites,
        min_evaluate_nodes=config.min_sites,
        min_available_nodes=config.min_sites,
    )
    weighting: dict[str, Any] = dict(uniform_weights=config.uniform_weights,
                                     max_site_weight=config.max_site_weight)  # a_k, either way
    if not config.encrypted:
        return CheckedFedAvg(**weighting, **common)
    if not config.key_dir:
        raise ConfigError("encrypted runs need run config 'key-dir': a folder holding the "
                          f"{wire.AGGREGATOR_KEY_FILE} written by `fedhealth keys init --out DIR`")
    key = load_aggregator_context(Path(config.key_dir) / wire.AGGREGATOR_KEY_FILE)
    checkpoint_dir = Path(config.out_dir) / wire.CHECKPOINT_DIR if config.out_dir else None
    return EncryptedFedAvg(key, checkpoint_dir=checkpoint_dir, resume=config.resume,
                           reply_verifier=_signature_hook(Path(config.key_dir)),
                           **weighting, **common)


def _signature_hook(key_dir: Path) -> ReplyHook | None:
    """Check every reply's signature against `key_dir/node-keys/<site>.pub`, when registered."""
    verifier = ReplyVerifier.from_key_dir(key_dir)
    if verifier is None:
        log(WARNING, "No %s folder in %s: replies are not signature-checked, so replays and "
            "copies of another site's update are not refused (`fedhealth keys init --sites` "
            "and `federation init` write it)", SIGNING_KEYS_DIR, key_dir)
        return None
    return signature_hook(verifier)


def starting_arrays(strategy: RunStrategy) -> ArrayRecord:
    """What Flower's loop is given: the encrypted global to resume from, or nothing."""
    return strategy.global_record() if isinstance(strategy, EncryptedFedAvg) else ArrayRecord()


def wait_for_sites(grid: Grid, config: RunConfig, poll_seconds: float = 1.0) -> int:
    """Wait until `expected_sites` nodes are connected or `join_timeout` passes; return how many are.

    Flower's sampling takes whoever is connected when a round starts; a late site would
    otherwise miss round 0 (and its baseline) although it joins a moment later.
    """
    deadline = time.monotonic() + config.join_timeout
    while (connected := len(list(grid.get_node_ids()))) < config.expected_sites:
        if time.monotonic() >= deadline:
            log(WARNING, "%d of %d expected sites connected after %.0f s; starting with them "
                "(at least %d needed)", connected, config.expected_sites, config.join_timeout,
                config.min_sites)
            return connected
        time.sleep(poll_seconds)
    if config.expected_sites:
        log(INFO, "All %d expected sites are connected", config.expected_sites)
    return connected


def evaluate_round_zero(strategy: RunStrategy, grid: Grid, arrays: ArrayRecord,
                        config: RunConfig) -> None:
    """Evaluate the starting model on every site, so later rounds have a baseline."""
    replies = grid.send_and_receive(
        strategy.configure_evaluate(0, arrays, config.to_record(), grid))
    if strategy.aggregate_evaluate(0, replies) is None:
        log(WARNING, "Round 0 evaluation got no valid reply")


def run_federation(grid: Grid, config: RunConfig) -> RunResults:
    """Run all rounds, then write and return the results (per-site metrics, timing, bytes)."""
    strategy = build_strategy(config)  # a resumed run's history holds its earlier rounds
    arrays = starting_arrays(strategy)
    wait_for_sites(grid, config)
    started = time.perf_counter()
    if config.dp_noise_multiplier > 0:
        log(INFO, "Client-level DP: noise multiplier %g, clip norm %g; epsilon after %d rounds "
            "at delta %g if every site's noise share is summed: %.4g", config.dp_noise_multiplier,
            config.dp_clip_norm, config.num_server_rounds, config.dp_delta,
            planned_epsilon(config))
    if not config.resume:
        evaluate_round_zero(strategy, grid, arrays, config)
    strategy.start(grid, arrays, num_rounds=config.num_server_rounds,
                   train_config=config.to_record(), evaluate_config=config.to_record())
    results = RunResults(strategy=config.policy, encrypted=config.encrypted,
                         rounds=config.num_server_rounds,
                         seconds=time.perf_counter() - started, history=strategy.history)
    privacy = privacy_report(config, strategy.history)
    log_privacy(privacy)
    if config.out_dir:
        path = Path(config.out_dir) / wire.RESULTS_FILE
        write_json_atomically(path, results.to_json() | {"privacy": privacy})
        log(INFO, "Results written to %s", path)
    return results


def server_app(config: RunConfig | None = None) -> ServerApp:
    """A ServerApp for `config`, or for the run config Flower passes (`flwr run`)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, config or RunConfig.from_flower(context.run_config))

    return app


app = server_app()
