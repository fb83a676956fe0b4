"""What the server holds of a client's update under each deployment: the attack surface.

* (a) ``plaintext``: one client's update as sent in FedAvg without secure aggregation.
* (b) ``masked``: the same client's vector as secure aggregation transmits it: fixed-point
  encoded (:func:`secagg.encoding.encode`), plus its self mask and one pairwise mask per other
  client (:func:`secagg.prg.accumulate_masks`, keys from ``os.urandom``), then read back the
  way an attacker would, as centred signed integers divided by the public scale.
* (c) ``aggregate``: the sum of the n clients' updates. Secure aggregation releases exactly
  this sum up to fixed-point quantization (one unit of ``1/scale`` per coordinate, far below the
  signal at the default 32-bit ring), so this view is computed in plaintext float64 for speed;
  a test checks it against the sum :mod:`secagg.simulate` actually releases.
* (d) ``aggregate_dp``: the sum under distributed DP: every client's update goes through
  :class:`secagg.dp.encoder.DpEncoder` (clip, rotate, round, integer noise calibrated to the
  stated ε) and the server decodes the ring sum.

An update is ``{name: float64 array}``; views return the same names and shapes, so every attack
runs unchanged on every view.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from proofs.attacks.errors import AttackInputError
from proofs.attacks.model_access import Array, Update
from secagg.dp.calibration import calibrate
from secagg.dp.encoder import DpEncoder
from secagg.dp.noise import Mechanism
from secagg.encoding import QuantizationParams, encode
from secagg.prg import KEY_BYTES, accumulate_masks

VIEWS = ("plaintext", "masked", "aggregate", "aggregate_dp")


def flatten(update: Update) -> tuple[Array, tuple[tuple[str, tuple[int, ...]], ...]]:
    """One float64 vector in sorted-name order, and the layout that :func:`unflatten` inverts."""
    if not update:
        raise AttackInputError("the update is empty")
    layout = tuple((name, tuple(update[name].shape)) for name in sorted(update))
    vector = np.concatenate([np.asarray(update[n], dtype=np.float64).ravel() for n, _ in layout])
    return vector, layout


def unflatten(vector: Array, layout: Sequence[tuple[str, tuple[int, ...]]]) -> dict[str, Array]:
    need = sum(int(np.prod(shape)) for _, shape in layout)
    if vector.ndim != 1 or vector.size != need:
        raise AttackInputError(f"vector has shape {vector.shape}, the layout needs ({need},)")
    out: dict[str, Array] = {}
    offset = 0
    for name, shape in layout:
        size = int(np.prod(shape))
        out[name] = vector[offset : offset + size].reshape(shape).copy()
        offset += size
    return out


def plaintext_view(update: Update) -> dict[str, Array]:
    """View (a): the update itself."""
    if not update:
        raise AttackInputError("the update is empty")
    return {name: np.array(value, dtype=np.float64) for name, value in update.items()}


def masked_view(
    update: Update, n_clients: int, clip: float, ring_bits: int = 32
) -> dict[str, Array]:
    """View (b): the masked ring vector client 0 of ``n_clients`` sends, decoded by the server.

    Client 0 holds the smallest id, so it adds (never subtracts) its n − 1 pairwise masks; its
    self mask is added too. ``clip`` and ``ring_bits`` are the round's public encoding
    parameters.
    """
    if n_clients < 2:
        raise AttackInputError(f"secure aggregation needs at least 2 clients, got {n_clients}")
    vector, layout = flatten(update)
    params = QuantizationParams.fit(ring_bits, clip, max_clients=n_clients)
    ring = params.ring
    words = encode(vector, params).vector
    keys = [os.urandom(KEY_BYTES) for _ in range(n_clients)]  # self mask + n − 1 pair masks
    accumulate_masks(words, ring, add_keys=keys)
    return unflatten(ring.to_signed(words) / params.scale, layout)


def aggregate_view(updates: Sequence[Mapping[str, Array]]) -> dict[str, Array]:
    """View (c): the exact sum of the clients' updates (what secure aggregation releases)."""
    if len(updates) < 2:
        raise AttackInputError(f"an aggregate needs at least 2 clients, got {len(updates)}")
    vectors = [flatten(u) for u in updates]
    layout = vectors[0][1]
    if any(v[1] != layout for v in vectors):
        raise AttackInputError("the clients' updates do not have the same tensors and shapes")
    return unflatten(np.sum([v[0] for v in vectors], axis=0), layout)


def aggregate_dp_view(
    updates: Sequence[Mapping[str, Array]],
    epsilon: float,
    delta: float,
    clip: float,
    mechanism: Mechanism = "skellam",
    ring_bits: int = 32,
) -> dict[str, Array]:
    """View (d): the decoded sum of the clients' DP-encoded updates.

    The noise is calibrated by :func:`secagg.dp.calibration.calibrate` so that this one round,
    with every client participating and none dropping out, is
    (``epsilon``, ``delta``)-DP at the client level: the most favourable accounting for the
    attacker, who sees the round's sum before any other round's noise adds up.
    """
    if len(updates) < 2:
        raise AttackInputError(f"an aggregate needs at least 2 clients, got {len(updates)}")
    vectors = [flatten(u) for u in updates]
    layout = vectors[0][1]
    if any(v[1] != layout for v in vectors):
        raise AttackInputError("the clients' updates do not have the same tensors and shapes")
    calibration = calibrate(
        mechanism=mechanism,
        epsilon=epsilon,
        delta=delta,
        participations=1,
        expected_cohort=len(updates),
        dropouts=0,
        ring_bits=ring_bits,
        clip=clip,
        dim=vectors[0][0].size,
        seed=os.urandom(32),
    )
    encoder = DpEncoder(calibration.params)
    ring = calibration.params.ring
    total = ring.zeros(calibration.params.encoded_dim)
    for vector, _ in vectors:
        total += encoder.encode(vector)
    decoded = encoder.decode_sum(ring.reduce(total), len(updates))
    return unflatten(decoded.astype(np.float64), layout)
