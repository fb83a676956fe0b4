"""CKKS parameter sets for secure summation, with the security level they give.

Security follows the HomomorphicEncryption.org standard (Albrecht et al., "Homomorphic
Encryption Security Standard", 2018, Table 1, uniform ternary secret, error sigma ~ 3.2): for a
ring dimension N, the total coefficient modulus log2(q) may not exceed the listed number of bits
for the given classical security level. SEAL enforces the 128-bit column; we check all three
columns ourselves so the level a parameter set reaches can be *stated*, and refuse anything
below 128 bits with :class:`ConfigurationError` before TenSEAL is ever called.

Only addition is needed, so the modulus chain is one data prime (which carries the values) plus
the special prime SEAL needs for key switching. With scale 2^S and data prime q0 the decrypted
value must satisfy |sum| < 2^(log2 q0 - S - 1); :class:`CKKSParams` checks that the worst-case sum
of ``max_clients`` clipped, weighted updates *and their integrity pads* fits with one more bit of
headroom.

Integrity pads (:mod:`secagg.he.session`): every slot of every ciphertext carries a pseudorandom
pad, uniform on a grid of 2^48 points in [-R, R) with R = :attr:`CKKSParams.pad_bound`, and the
last :data:`TAG_SLOTS` slots of every ciphertext carry the pad alone (*tag slots*). R is the power
of two at or above 16 times the largest sum of real values a slot can hold, so a forged combination
shows in the data slots too (``proofs/SPEC.md`` §9); :attr:`CKKSParams.forgery_bits` is the
per-attempt bound the tag slots alone give, and parameters giving less than
:data:`MIN_INTEGRITY_BITS` are refused.

Precision: a fresh symmetric CKKS encryption adds an error polynomial with coefficients of
standard deviation sigma = 3.2 (SEAL's default) plus the encoding's rounding (variance 1/12). In
each slot the error of a sum of n ciphertexts is a sum of n·N such terms, so its standard
deviation is at most sqrt(n·N·(sigma² + 1/12)) / 2^S. :meth:`CKKSParams.sum_error_bound` is ten
standard deviations of that (Gaussian tail below 1e-22 per slot).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from secagg.errors import ConfigurationError

#: HomomorphicEncryption.org standard, Table 1 (classical security, ternary secret):
#: security level -> {ring dimension N: largest total log2(q)}.
HE_STANDARD_MAX_LOG_Q: dict[int, dict[int, int]] = {
    128: {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881},
    192: {1024: 19, 2048: 37, 4096: 75, 8192: 152, 16384: 305, 32768: 611},
    256: {1024: 14, 2048: 29, 4096: 58, 8192: 118, 16384: 237, 32768: 476},
}
MIN_SECURITY_BITS = 128
#: SEAL's error standard deviation for fresh encryptions.
ERROR_SIGMA = 3.2
#: SEAL's limits on one prime of the coefficient modulus.
MIN_PRIME_BITS = 20
MAX_PRIME_BITS = 60
#: Slots at the end of every ciphertext that hold an integrity pad and no data.
TAG_SLOTS = 4
#: Pads are integers k in [-2^(PAD_BITS-1), 2^(PAD_BITS-1)) times R / 2^(PAD_BITS-1): exact in
#: float64 and summable exactly in int64 for up to 2^(64-PAD_BITS) contributors.
PAD_BITS = 48
#: The most contributors whose pads the decryptor can sum exactly in int64.
MAX_PADDED_CLIENTS = 2 ** (63 - PAD_BITS)
#: The pad bound is this many times the largest honest |sum| of one data slot (SPEC.md §9).
PAD_FACTOR = 16
#: Parameters whose tag slots bound a forgery above 2^-MIN_INTEGRITY_BITS per attempt are refused.
MIN_INTEGRITY_BITS = 40


def security_level(poly_modulus_degree: int, total_modulus_bits: int) -> int:
    """The highest standard security level (128, 192 or 256 bits) these sizes reach.

    Raises :class:`ConfigurationError` when they reach less than 128 bits or N is not in the table.
    """
    if poly_modulus_degree not in HE_STANDARD_MAX_LOG_Q[MIN_SECURITY_BITS]:
        known = sorted(HE_STANDARD_MAX_LOG_Q[MIN_SECURITY_BITS])
        raise ConfigurationError(
            f"poly_modulus_degree {poly_modulus_degree} is not in the HE standard table {known}"
        )
    reached = [
        level
        for level, table in HE_STANDARD_MAX_LOG_Q.items()
        if total_modulus_bits <= table[poly_modulus_degree]
    ]
    if not reached:
        limit = HE_STANDARD_MAX_LOG_Q[MIN_SECURITY_BITS][poly_modulus_degree]
        raise ConfigurationError(
            f"a {total_modulus_bits}-bit coefficient modulus with N = {poly_modulus_degree} gives "
            f"less than {MIN_SECURITY_BITS}-bit security (at most {limit} bits allowed): use fewer "
            "or smaller primes, or a larger poly_modulus_degree"
        )
    return max(reached)


@dataclass(frozen=True)
class CKKSParams:
    """Public parameters of a CKKS aggregation round, identical for every party.

    ``clip``, ``max_clients``, ``max_weight`` and ``weighted`` mean what they mean in
    :class:`secagg.encoding.QuantizationParams`: updates are clipped to ±clip, a weighted client
    submits w·Δ and w (one more slot), and the sum of ``max_clients`` such updates must not
    overflow. ``min_contributors`` is the smallest aggregate a decryptor will open: below it the
    "sum" is (nearly) one institution's update.
    """

    clip: float
    max_clients: int
    max_weight: int = 1
    weighted: bool = False
    min_contributors: int = 2
    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 60)
    scale_bits: int = 40

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ConfigurationError(f"clip must be a positive finite number, got {self.clip}")
        if self.max_clients < 1 or self.max_weight < 1:
            raise ConfigurationError("max_clients and max_weight must be at least 1")
        if not self.weighted and self.max_weight != 1:
            raise ConfigurationError("max_weight applies only to weighted aggregation")
        if not 1 <= self.min_contributors <= self.max_clients:
            raise ConfigurationError(
                f"min_contributors must be in [1, max_clients = {self.max_clients}], "
                f"got {self.min_contributors}"
            )
        if len(self.coeff_mod_bit_sizes) < 2:
            raise ConfigurationError(
                "the coefficient modulus needs a data prime and a special prime (at least 2 sizes)"
            )
        for bits in self.coeff_mod_bit_sizes:
            if not MIN_PRIME_BITS <= bits <= MAX_PRIME_BITS:
                raise ConfigurationError(
                    f"each prime must have {MIN_PRIME_BITS}..{MAX_PRIME_BITS} bits, got {bits}"
                )
        security_level(self.poly_modulus_degree, sum(self.coeff_mod_bit_sizes))
        if not MIN_PRIME_BITS <= self.scale_bits < self.coeff_mod_bit_sizes[0]:
            raise ConfigurationError(
                f"scale_bits must be in [{MIN_PRIME_BITS}, {self.coeff_mod_bit_sizes[0]}) so the "
                "values fit under the data prime"
            )
        if self.max_clients > MAX_PADDED_CLIENTS:
            raise ConfigurationError(
                f"max_clients is at most {MAX_PADDED_CLIENTS} (integrity pads are summed in int64)"
            )
        headroom_bits = self.data_modulus_bits - self.scale_bits - 2  # sign bit + one spare bit
        worst = worst_slot_value(self.max_clients, self.max_weight, self.clip)
        if worst >= 2.0**headroom_bits:
            raise ConfigurationError(
                f"the sum of {self.max_clients} clients and their integrity pads can reach "
                f"{worst:g}, beyond the ±2^{headroom_bits} a {self.data_modulus_bits}-bit data "
                f"modulus holds at scale 2^{self.scale_bits}: lower scale_bits, clip, max_weight "
                "or max_clients"
            )
        if self.forgery_bits < MIN_INTEGRITY_BITS:
            raise ConfigurationError(
                f"these parameters bound a forged aggregate only by 2^-{self.forgery_bits:.1f} "
                f"per attempt, less than 2^-{MIN_INTEGRITY_BITS}: raise scale_bits"
            )

    @property
    def security_bits(self) -> int:
        """Classical security level per the HE standard table (128, 192 or 256)."""
        return security_level(self.poly_modulus_degree, sum(self.coeff_mod_bit_sizes))

    @property
    def data_modulus_bits(self) -> int:
        # SEAL keeps the last prime for key switching; ciphertexts live modulo the others.
        return sum(self.coeff_mod_bit_sizes[:-1])

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def scale(self) -> float:
        return float(2**self.scale_bits)

    @property
    def data_slots(self) -> int:
        """Slots of one ciphertext that carry data; the other :data:`TAG_SLOTS` are tag slots."""
        return self.slots - TAG_SLOTS

    @property
    def client_bound(self) -> float:
        """The largest |value| one client puts in a data slot (clipped and weighted, or the
        weight itself)."""
        return self.max_weight * max(self.clip, 1.0)

    @property
    def pad_bound(self) -> float:
        """R: pads are uniform in [-R, R); the power of two at or above
        ``PAD_FACTOR * max_clients * client_bound``."""
        return _pad_bound(self.max_clients, self.max_weight, self.clip)

    @property
    def pad_step(self) -> float:
        """The grid of pad values: R / 2^(PAD_BITS - 1)."""
        return self.pad_bound / 2.0 ** (PAD_BITS - 1)

    def tag_tolerance(self, contributors: int) -> float:
        """How far an honest tag slot (after the expected pads are subtracted) may be from 0."""
        return self.sum_error_bound(contributors)

    @property
    def forgery_bits(self) -> float:
        """-log2 of the chance that an aggregate which is not the honest sum of the claimed
        uploads (any integer combination of any ciphertexts, plus any plaintext) passes the tag
        slots of one ciphertext: ``(tol / R + 2^-PAD_BITS)^TAG_SLOTS`` at the widest tolerance
        (``max_clients`` contributors). See ``proofs/SPEC.md`` §9."""
        per_slot = self.tag_tolerance(self.max_clients) / self.pad_bound + 2.0**-PAD_BITS
        return -TAG_SLOTS * math.log2(per_slot)

    def encoded_dim(self, dim: int) -> int:
        return dim + 1 if self.weighted else dim

    def chunk_count(self, dim: int) -> int:
        """Ciphertexts per update of ``dim`` coordinates (weight slot included)."""
        return max(1, -(-self.encoded_dim(dim) // self.data_slots))

    def sum_error_bound(self, contributors: int) -> float:
        """Bound on |decrypted - exact| per slot for a sum of ``contributors`` fresh ciphertexts,
        before the result is rounded to the release grid and converted to float32."""
        variance = contributors * self.poly_modulus_degree * (ERROR_SIGMA**2 + 1.0 / 12.0)
        return 10.0 * math.sqrt(variance) / self.scale

    def release_step(self, contributors: int) -> float:
        """The grid a decryptor rounds the sum to: the power of two just above the error bound.

        Why: publishing CKKS decryptions exactly lets whoever sees them (here the server) learn
        the decryption error and, over many rounds, the secret key (Li & Micciancio, EUROCRYPT
        2021). Rounding to a grid above the error removes most of it; see :mod:`secagg.he`.
        """
        return float(2.0 ** math.ceil(math.log2(self.sum_error_bound(contributors))))

    def describe(self) -> dict[str, object]:
        """The public parameters and their security level, for reports and benchmarks."""
        return {
            "scheme": "CKKS",
            "poly_modulus_degree": self.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(self.coeff_mod_bit_sizes),
            "total_modulus_bits": sum(self.coeff_mod_bit_sizes),
            "scale_bits": self.scale_bits,
            "slots_per_ciphertext": self.slots,
            "tag_slots_per_ciphertext": TAG_SLOTS,
            "pad_bound": self.pad_bound,
            "forgery_bits_per_attempt": round(self.forgery_bits, 1),
            "security_bits": self.security_bits,
            "security_reference": "HomomorphicEncryption.org standard, classical, ternary secret",
        }


def _pad_bound(max_clients: int, max_weight: int, clip: float) -> float:
    """R of :attr:`CKKSParams.pad_bound`, from the fields it depends on."""
    honest = max_clients * max_weight * max(clip, 1.0)
    return float(2.0 ** math.ceil(math.log2(PAD_FACTOR * honest)))


def worst_slot_value(max_clients: int, max_weight: int, clip: float) -> float:
    """The largest |value| a slot of an honest sum can hold: every client's clipped, weighted
    value (or weight) plus its pad."""
    per_client = max_weight * max(clip, 1.0) + _pad_bound(max_clients, max_weight, clip)
    return max_clients * per_client
