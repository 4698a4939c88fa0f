"""The aggregator's key: a params-only CKKS context that can add ciphertexts and nothing more.

This module never accepts a secret key, so `strategies/` may import it.
"""

from pathlib import Path

import tenseal as ts

from fedhealth.core.crypto.keyfile import KeyFileError, LoadedKey


class AggregatorKey(LoadedKey):
    """A params-only context, its preset and the federation's key fingerprint."""

    @classmethod
    def check(cls, context: ts.Context, source: str) -> None:
        if context.has_secret_key():
            raise KeyFileError(
                f"{source} holds a secret key: the aggregator must only get the params-only "
                "aggregator.ctx written by `fedhealth keys init`, never a site's site.ctx"
            )


def load_aggregator_context(path: Path | str) -> AggregatorKey:
    """Load `aggregator.ctx`; refuses a context holding a secret key."""
    return AggregatorKey.load(path)
