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
of ``max_clients`` clipped, weighted updates fits with one more bit of headroom.

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
        headroom_bits = self.data_modulus_bits - self.scale_bits - 2  # sign bit + one spare bit
        worst = self.max_clients * self.max_weight * max(self.clip, 1.0)
        if worst >= 2.0**headroom_bits:
            raise ConfigurationError(
                f"the sum of {self.max_clients} clients can reach {worst:g}, beyond the "
                f"±2^{headroom_bits} a {self.data_modulus_bits}-bit data modulus holds at scale "
                f"2^{self.scale_bits}: lower scale_bits, clip, max_weight or max_clients"
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

    def encoded_dim(self, dim: int) -> int:
        return dim + 1 if self.weighted else dim

    def chunk_count(self, dim: int) -> int:
        """Ciphertexts per update of ``dim`` coordinates (weight slot included)."""
        return max(1, -(-self.encoded_dim(dim) // self.slots))

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
            "security_bits": self.security_bits,
            "security_reference": "HomomorphicEncryption.org standard, classical, ternary secret",
        }
