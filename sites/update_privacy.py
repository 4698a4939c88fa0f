"""Client-level differential privacy of what a site shares: clip its update, add its noise share.

What is clipped. Sites encrypt full weights (so E(global) is a complete model), but a bound on
full weights bounds nothing a site's data did to them. The clipped quantity is the update: the
delta of the shared tensors (weights and, under FedAvg/FedProx, BatchNorm's running statistics:
all of them are computed from the site's data) from the model the site started the round from
(the decrypted global, or in round 1 the seed's model every site builds). The site sends
start + clip(delta) + noise, whose weighted sum the aggregator adds up as before.

How much noise, and who adds it. As in Flower's DifferentialPrivacyClientSideFixedClipping
(McMahan et al. 2018), the sites' clipped deltas are averaged unweighted, a_k = 1/K (the run
config refuses DP without `uniform-weights`), and the released mean must carry Gaussian noise of
sd z * C / K per value (Flower's `compute_stdv(z, C, K)`): one site's delta moves the sum of
a_k * delta by at most a_k * C = C / K (add or remove one site), so that noise is the Gaussian
mechanism with noise multiplier z. No party is trusted to add it: each site adds
N(0, z^2 C^2 a_k) to its own clipped delta, so the K independent shares, weighted by a_k, sum
to variance K * a_k^2 * z^2 C^2 a_k = (z C / K)^2. A site's own share is small (sd z C / sqrt(K)
on its delta): alone it protects little, which is why the sum, not a single update, is what the
guarantee is about; a site that drops out takes its share with it (the round's noise is then
that of sqrt(K_r / K) * z, which the ServerApp accounts for).

Personal layers (FedBN's normalisation layers, FedPer/FedRep's head, Ditto's personal model)
never leave the site, so they are neither clipped nor noised.

Where the noise comes from. A generator keyed by a secret only this site holds
(`<state-dir>/dp-noise.key`, 0600, written on first use), the run seed and the round: neither the
aggregator nor another site can regenerate it, and the noise is drawn before `fixed_point`'s grid,
so an encrypted and a plaintext run of the same seed at the same site add the same noise and
still agree bit for bit. Two trainings with the same seed at one site therefore repeat their
noise: use a fresh seed for every training.
"""

import contextlib
import hashlib
import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedhealth.core.config import RunConfig
from fedhealth.core.crypto.layout import TensorLayout
from fedhealth.core.privacy_accounting import GaussianRelease
from fedhealth.core.secret_file import read_secret, write_secret

Arrays = dict[str, np.ndarray]
NOISE_KEY_FILE = "dp-noise.key"
_VARIANCE_FLOOR = 1e-5  # BatchNorm's eps: a noised running variance is never negative
_RUNNING_VARIANCE = "running_var"


@dataclass(frozen=True)
class PrivateUpdate:
    """What a site shares under client-level DP, and how far its update had to be clipped."""

    shared: Arrays  # start + clip(delta) + noise, per tensor
    delta_norm: float  # L2 norm of the delta before clipping
    released_norm: float  # L2 norm of the clipped delta (<= clip_norm)


@dataclass(frozen=True)
class UpdatePrivacy:
    """The run's client-level DP settings: noise multiplier z and clipping norm C."""

    noise_multiplier: float
    clip_norm: float

    @classmethod
    def of(cls, config: RunConfig) -> "UpdatePrivacy | None":
        """The run's settings, or None when it has no client-level DP."""
        if config.dp_noise_multiplier <= 0:
            return None
        return cls(config.dp_noise_multiplier, config.dp_clip_norm)

    @property
    def release(self) -> GaussianRelease:
        """One round of this, as the accountant composes it (every site's share arrived)."""
        return GaussianRelease(self.noise_multiplier)

    def noise_sd(self, site_weight: float) -> float:
        """The sd of this site's noise share on its delta: z * C * sqrt(a_k)."""
        if not 0 < site_weight <= 1:
            raise ValueError(f"site weight a_k must be in (0, 1], got {site_weight}")
        return self.noise_multiplier * self.clip_norm * math.sqrt(site_weight)

    def privatize(self, shared: Mapping[str, np.ndarray], start: Mapping[str, np.ndarray],
                  site_weight: float, noise: np.random.Generator) -> PrivateUpdate:
        """start + clip(shared - start, C) + N(0, noise_sd(a_k)^2), tensor by tensor.

        The clip is over every shared value at once (one L2 norm), as in Flower's
        `compute_clip_model_update`.
        """
        layout = TensorLayout.of(dict(shared))
        if TensorLayout.of(dict(start)).hash != layout.hash:
            raise ValueError("the update and the model it started from have different tensors: "
                             "same model and policy at every site?")
        reference = layout.flatten(start)
        delta = layout.flatten(shared) - reference
        norm = float(np.linalg.norm(delta))
        clipped = delta * min(1.0, self.clip_norm / norm) if norm > 0 else delta
        released = reference + clipped + noise.normal(0.0, self.noise_sd(site_weight), delta.size)
        return PrivateUpdate(layout.unflatten(released), norm, float(np.linalg.norm(clipped)))


def noise_seed(state_dir: Path, seed: int, server_round: int, purpose: str = "update") -> int:
    """A 63-bit seed for this site's noise in one round, from its secret noise key (see the
    module docstring); `purpose` keeps the update's noise and DP-SGD's ("sgd") independent."""
    secret = _noise_key(state_dir)
    words = hashlib.sha256(secret + f"/{purpose}/{seed}/{server_round}".encode()).digest()
    return int.from_bytes(words[:8], "big") >> 1


def noise_generator(state_dir: Path, seed: int, server_round: int) -> np.random.Generator:
    """The generator of this site's update noise for one round."""
    return np.random.Generator(np.random.PCG64(noise_seed(state_dir, seed, server_round)))


def _noise_key(state_dir: Path) -> bytes:
    path = Path(state_dir) / NOISE_KEY_FILE
    if not path.exists():
        with contextlib.suppress(FileExistsError):  # another process of this site wrote it
            write_secret(path, secrets.token_bytes(32))
    return read_secret(path, "the site's DP noise key")


def usable_global(global_shared: Arrays | None) -> Arrays | None:
    """A noised global as a model can run it: BatchNorm's running variances floored at its eps.

    Noise can push a variance below zero (NaN in every forward pass); flooring is post-processing
    of the released sum, so it costs no privacy, and it is the same in both run modes.
    """
    if global_shared is None:
        return None
    return {n: np.maximum(t, _VARIANCE_FLOOR) if n.endswith(_RUNNING_VARIANCE) else t
            for n, t in global_shared.items()}
