"""Distributed-DP encoding: a client's float32 update -> a noisy vector of Z_{2^b}; the server's
*sum* of such vectors -> the float32 noisy sum.

Client pipeline (Kairouz, Liu, Steinke, ICML'21, Alg. 1; Agarwal, Kairouz, Liu, NeurIPS'21;
TFF's ``DistributedDpSumFactory``):

1. clip to L2 norm ``clip``;
2. pad to n = 2^ceil(log2 d) and rotate with the public round seed (:mod:`secagg.dp.rotation`)
   so that every coordinate is small and the modular sum rarely wraps;
3. multiply by ``scale``;
4. conditional randomized rounding: round each coordinate up with probability equal to its
   fractional part, and retry until the rounded vector's L2 norm is within
   :func:`rounded_l2_bound` (computed, Kairouz et al. Thm 2 / TFF ``rounded_l2_norm_bound``), so
   the integer sensitivity the accountant uses is a hard bound;
5. add secret integer noise (Skellam or discrete Gaussian, :mod:`secagg.dp.noise`);
6. map to the ring.

Server side: the ring sum is read as centred integers in [-2^(b-1), 2^(b-1)) (this *is* the
modular clipping of Kairouz et al.: values that wrapped come out on the other side), divided by
``scale`` and rotated back. Only public parameters are needed to decode.

All coins (rounding and noise) come from AES-CTR under ``os.urandom`` keys; never numpy's RNG.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from secagg.dp.noise import CsprngWords, NoiseSpec, add_noise, tail_quantile
from secagg.dp.rotation import MIN_SEED_BYTES, padded_dim, rotate, unrotate
from secagg.errors import ConfigurationError, EncodingError
from secagg.ring import Ring, RingArray

FloatArray = npt.NDArray[np.float32]

#: Default bound on the probability that one coordinate of the noisy sum wraps around.
WRAP_PROBABILITY = 2.0**-40

#: Kairouz et al.'s and TFF's default: an unconditional rounding exceeds the bound with
#: probability at most beta, so each attempt succeeds with probability >= 1 - e^-0.5 ~ 0.39.
DEFAULT_BETA = math.exp(-0.5)
#: (1 - 0.39)^200 < 1e-42: running out of attempts means a bug, not bad luck.
MAX_ROUNDING_ATTEMPTS = 200
#: Float64 sums of squares are compared against the squared bound shrunk by this factor, so
#: that accumulated rounding in the float norm can never let a too-long vector through.
_NORM_SAFETY = 1.0 - 2.0**-30


def rounded_l2_bound(scaled_clip: float, dim: int, beta: float = DEFAULT_BETA) -> float:
    """Bound on the L2 norm of a conditionally rounded vector whose input norm is at most
    ``scaled_clip`` (Kairouz et al. ICML'21 Thm 2; TFF ``rounded_l2_norm_bound``):
    min(c + sqrt(d), sqrt(c^2 + d/4 + sqrt(2 ln(1/beta)) (c + sqrt(d)/2)))."""
    if not 0 <= beta < 1:
        raise ConfigurationError(f"rounding beta must be in [0, 1), got {beta!r}")
    bound = scaled_clip + math.sqrt(dim)
    if beta == 0:
        return bound
    squared = scaled_clip**2 + 0.25 * dim
    squared += math.sqrt(2.0 * math.log(1.0 / beta)) * (scaled_clip + 0.5 * math.sqrt(dim))
    return min(bound, math.sqrt(squared))


def rounded_l1_bound(l2_bound: float, dim: int) -> float:
    """L1 bound of an integer vector with L2 norm <= ``l2_bound``: ||x||_1 <= sqrt(d) ||x||_2,
    and ||x||_1 <= ||x||_2^2 because |x_i| <= x_i^2 for integers (TFF's bound)."""
    return l2_bound * min(math.sqrt(dim), l2_bound)


@dataclass(frozen=True)
class DpParams:
    """Public parameters of one DP round, identical for every client and the server.

    ``noise`` is *one client's* noise in integer units; ``seed`` is the round's public rotation
    seed (drawn by the server, independent of the updates); ``max_clients`` is the most
    contributions the ring was sized for.
    """

    ring_bits: int
    dim: int
    clip: float
    scale: float
    noise: NoiseSpec
    seed: bytes
    max_clients: int
    beta: float = DEFAULT_BETA

    def __post_init__(self) -> None:
        Ring(self.ring_bits)
        padded_dim(self.dim)
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ConfigurationError(f"clip must be a positive finite number, got {self.clip!r}")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ConfigurationError(f"scale must be a positive finite number, got {self.scale!r}")
        if not isinstance(self.seed, bytes) or len(self.seed) < MIN_SEED_BYTES:
            raise ConfigurationError(f"rotation seed must be at least {MIN_SEED_BYTES} bytes")
        if isinstance(self.max_clients, bool) or self.max_clients < 1:
            raise ConfigurationError("max_clients must be at least 1")
        if not 0 <= self.beta < 1:
            raise ConfigurationError(f"rounding beta must be in [0, 1), got {self.beta!r}")
        if self.l2_sensitivity >= 2.0**61:
            # Rounded coordinates (<= the L2 bound) plus noise must not overflow int64.
            raise ConfigurationError("scale * clip is too large for int64 intermediates")

    @property
    def ring(self) -> Ring:
        return Ring(self.ring_bits)

    @property
    def encoded_dim(self) -> int:
        """Length of the ring vector: the padded power-of-two dimension."""
        return padded_dim(self.dim)

    @property
    def l2_sensitivity(self) -> float:
        """Hard L2 bound (integer units) on one client's rounded contribution."""
        return rounded_l2_bound(self.scale * self.clip, self.encoded_dim, self.beta)

    @property
    def l1_sensitivity(self) -> float:
        return rounded_l1_bound(self.l2_sensitivity, self.encoded_dim)


def sum_magnitude_bound(
    params: DpParams, n_clients: int, wrap_probability: float = WRAP_PROBABILITY
) -> float:
    """A value the absolute value of one coordinate of the noisy sum of ``n_clients`` exceeds
    with probability at most ``wrap_probability``, in integer units (Kairouz et al. Sec. 4).

    Three parts, each bounded separately: the rotated, scaled signal — the sum of clipped
    updates has norm <= n*clip and after the random-sign rotation each coordinate satisfies
    Hoeffding's P(|y_j| >= a) <= 2 exp(-a^2 n_pad / (2 (s n clip)^2)), allotted half of the
    probability; rounding, which moves each client's coordinate by less than 1 (so < n in
    total); and the summed noise (Skellam or sub-Gaussian Chernoff tail, a quarter per side).
    The rotation seed must be independent of the updates for the Hoeffding step to apply.
    """
    if not 0 < wrap_probability < 1:
        raise ConfigurationError(f"wrap probability must be in (0, 1), got {wrap_probability}")
    n_pad = params.encoded_dim
    signal_norm = params.scale * n_clients * params.clip
    # A coordinate never exceeds the norm, so Hoeffding only helps when its factor is below 1.
    signal = signal_norm * min(1.0, math.sqrt(2.0 * math.log(4.0 / wrap_probability) / n_pad))
    noise = tail_quantile(
        params.noise.mechanism, n_clients * params.noise.variance, wrap_probability / 4
    )
    return signal + n_clients + noise


def check_no_wrap(
    params: DpParams, n_clients: int | None = None, wrap_probability: float = WRAP_PROBABILITY
) -> float:
    """Refuse a ring too small for the noisy sum; returns the union bound over coordinates on
    the probability that any coordinate of the sum wraps."""
    n = params.max_clients if n_clients is None else n_clients
    need = sum_magnitude_bound(params, n, wrap_probability)
    half = float(1 << (params.ring_bits - 1))
    if need >= half:
        bits = math.ceil(math.log2(need + 1)) + 1
        raise ConfigurationError(
            f"the noisy sum of {n} clients reaches {need:.4g} units per coordinate (except with "
            f"probability {wrap_probability:.3g}), which wraps a {params.ring_bits}-bit ring: "
            f"use at least {bits} ring bits, a smaller scale or fewer clients"
        )
    return min(1.0, wrap_probability * params.encoded_dim)


class NonFiniteUpdateError(EncodingError):
    """An update with a NaN or an infinity: it has no norm to clip to, so it is refused."""


@dataclass(frozen=True)
class EncodingStats:
    """What one encode did, for the client's own logs (never sent: the norm is private)."""

    clipped: bool
    rounding_attempts: int


class DpEncoder:
    """Drop-in alternative to the plain quantizing encoder: ``encode`` on the client,
    ``decode_sum`` on the server. Holds only public parameters."""

    def __init__(self, params: DpParams, wrap_probability: float = WRAP_PROBABILITY) -> None:
        self.wrap_probability = check_no_wrap(params, None, wrap_probability)
        self.params = params
        self.last_stats: EncodingStats | None = None

    def encode(self, update: np.ndarray) -> RingArray:
        """Clip, rotate, scale, conditionally round and noise one client's update."""
        p = self.params
        if not isinstance(update, np.ndarray) or update.ndim != 1:
            raise EncodingError("an update must be a one-dimensional numpy array")
        if update.dtype not in (np.float32, np.float64):
            raise EncodingError(f"an update must be float32 or float64, got {update.dtype}")
        if update.size != p.dim:
            raise EncodingError(f"update has {update.size} coordinates, the round expects {p.dim}")
        if not np.isfinite(update).all():
            bad = int(np.flatnonzero(~np.isfinite(update))[0])
            raise NonFiniteUpdateError(
                f"update has a NaN or Inf value (first at index {bad}): its norm is undefined, "
                "so it cannot be clipped; check the local training for divergence"
            )
        values, clipped = _clip(update.astype(np.float64), p.clip)
        scaled = rotate(values, p.seed)
        scaled *= p.scale
        words = CsprngWords()
        rounded, attempts = _conditional_round(scaled, p.l2_sensitivity, words)
        add_noise(rounded, p.noise, words)
        self.last_stats = EncodingStats(clipped, attempts)
        return p.ring.from_signed(rounded)

    def decode_sum(self, summed: RingArray, n_contributors: int) -> FloatArray:
        """The float32 sum of ``n_contributors`` clients' (noisy) updates from their ring sum."""
        p = self.params
        ring = p.ring
        if not isinstance(summed, np.ndarray):
            raise EncodingError("the aggregate must be a numpy array")
        ring.check(summed, "aggregate")
        if summed.size != p.encoded_dim:
            raise EncodingError(
                f"the aggregate has {summed.size} coordinates, expected {p.encoded_dim}"
            )
        if isinstance(n_contributors, bool) or not 1 <= n_contributors <= p.max_clients:
            raise ConfigurationError(
                f"{n_contributors} contributors, but the ring was sized for 1..{p.max_clients}"
            )
        centred = ring.to_signed(summed).astype(np.float64)
        centred *= 1.0 / p.scale
        return unrotate(centred, p.seed, p.dim).astype(np.float32)


def _clip(values: npt.NDArray[np.float64], clip: float) -> tuple[npt.NDArray[np.float64], bool]:
    """``values`` scaled to L2 norm ``clip`` if longer (and whether it was). The norm is taken
    of ``values / max|values|`` (at most sqrt(d)): the plain norm of a finite float64 vector
    can overflow to inf (1e200 squared), and clip / inf would silently zero the update."""
    peak = float(np.abs(values).max())
    if peak == 0.0:
        return values, False
    unit = values / peak
    unit_norm = float(np.linalg.norm(unit))
    if unit_norm <= clip / peak:  # ||values|| = peak * unit_norm <= clip
        return values, False
    unit *= clip / unit_norm
    return unit, True


def _conditional_round(
    scaled: npt.NDArray[np.float64], bound: float, words: CsprngWords
) -> tuple[npt.NDArray[np.int64], int]:
    """Randomized rounding retried until ||result||_2 <= bound (Kairouz et al. Alg. 1)."""
    floor = np.floor(scaled)
    frac = scaled - floor
    base = floor.astype(np.int64)
    limit = bound * bound * _NORM_SAFETY
    for attempt in range(1, MAX_ROUNDING_ATTEMPTS + 1):
        rounded = base + (words.unit_floats(scaled.size) < frac)
        as_float = rounded.astype(np.float64)
        if float(np.dot(as_float, as_float)) <= limit:
            return rounded, attempt
    raise EncodingError(
        f"conditional rounding did not meet the norm bound in {MAX_ROUNDING_ATTEMPTS} attempts; "
        "the clipped update cannot exceed it, so this indicates a bug"
    )
