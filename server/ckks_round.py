"""The server's side of one CKKS round as a state object: no sockets, no threads, no clocks.

Stages: ``he_upload`` (each cohort member sends one encrypted update; each is checked
completely and added as it arrives, a bad one is refused and its sender no longer awaited),
then ``he_decrypt`` (the aggregate goes to one decryptor; if it does not answer before the
stage deadline the next surviving contributor is asked, at most :data:`MAX_DECRYPTORS` in all).
The round loop in :mod:`server.rounds` supplies the deadlines and moves the bytes.

What the server learns: the sum (after a client decrypted it), the summed weight and who
contributed, as under masking. What it cannot check: that the decryptor released the true
sum. The decryptor could equally lie under masking about its own input; here it could shift
the whole sum, which is why the release is bounded (finite, same dimension, the contributor
count the server itself counted, a plausible weight) and logged with the decryptor's id.
"""

from __future__ import annotations

from enum import StrEnum

import numpy as np

from fl_core.strategies import AggregateInput
from fl_core.wire import fedsec_pb2 as pb
from fl_core.wire.he_round import ckks_params_from_config, decode_release
from secagg.errors import (
    DuplicateClient,
    ProtocolAbort,
    SecAggError,
    TooFewSurvivors,
    UnexpectedMessage,
    UnknownClient,
)
from secagg.he import HEAggregator, PublicContext
from secagg.he.errors import AggregateIntegrityError

#: How many contributors are asked to decrypt, one after another, before the round aborts.
MAX_DECRYPTORS = 3


class CkksStage(StrEnum):
    UPLOAD = "he_upload"
    DECRYPT = "he_decrypt"
    DONE = "done"


class NoDecryptor(ProtocolAbort):
    """Every decryptor asked missed its deadline (or none was left to ask)."""


class CkksRound:
    def __init__(
        self, public: PublicContext, config: pb.RoundConfig, max_decryptors: int = MAX_DECRYPTORS
    ) -> None:
        self.config = config
        self.params = ckks_params_from_config(config)
        # The round's own parameters (max_clients = this cohort), over the federation's keys:
        # exactly what every client derives from the same RoundConfig.
        round_public = PublicContext(public.to_bytes(), self.params, public.context)
        self.session_id = config.session_id
        self.cohort = frozenset(config.cohort)
        self.stage = CkksStage.UPLOAD
        self._aggregator = HEAggregator(round_public, config.session_id, config.dim)
        self._refused: set[int] = set()
        self._asked: list[int] = []
        self._max_decryptors = max_decryptors
        self._aggregate = b""
        self._release: AggregateInput | None = None

    @property
    def contributors(self) -> tuple[int, ...]:
        return tuple(sorted(self._aggregator.contributors))

    @property
    def pending(self) -> frozenset[int]:
        """Who the current stage still waits for."""
        if self.stage is CkksStage.UPLOAD:
            return self.cohort - set(self._aggregator.contributors) - self._refused
        if self.stage is CkksStage.DECRYPT:
            return frozenset(self._asked[-1:])
        return frozenset()

    @property
    def decryptor(self) -> int | None:
        return self._asked[-1] if self.stage is CkksStage.DECRYPT and self._asked else None

    def receive_update(self, sender: int, ciphertext: bytes) -> None:
        """Check and add ``sender``'s encrypted update; on any error nothing is added."""
        if self.stage is not CkksStage.UPLOAD:
            raise UnexpectedMessage(f"uploads are closed (stage {self.stage.value})")
        if sender not in self.cohort:
            raise UnknownClient(f"client {sender} is not in this round's cohort")
        if sender in self._refused:
            raise DuplicateClient(f"client {sender}'s upload was already refused this round")
        try:
            self._aggregator.add(sender, ciphertext)
        except DuplicateClient:
            raise
        except SecAggError:
            # Its one upload failed the checks: stop waiting for it.
            self._refused.add(sender)
            raise

    def close_uploads(self) -> None:
        """End the upload stage; aborts (releasing nothing) below ``min_contributors``."""
        if self.stage is not CkksStage.UPLOAD:
            raise UnexpectedMessage(f"uploads already closed (stage {self.stage.value})")
        self._aggregate = self._aggregator.aggregate()  # TooFewSurvivors below the minimum
        self.stage = CkksStage.DECRYPT

    def next_decryptor(self) -> tuple[int, bytes]:
        """The next client to ask (lowest contributor id not yet asked) and the aggregate."""
        if self.stage is not CkksStage.DECRYPT:
            raise UnexpectedMessage(f"no aggregate to decrypt (stage {self.stage.value})")
        left = [c for c in self.contributors if c not in self._asked]
        if not left or len(self._asked) >= self._max_decryptors:
            raise NoDecryptor(f"no decrypted sum from {self._asked}; nothing is released")
        self._asked.append(left[0])
        return left[0], self._aggregate

    def receive_release(self, sender: int, data: bytes) -> None:
        """Accept the decrypted sum from the client asked last, after checking its shape."""
        if self.stage is not CkksStage.DECRYPT or sender != self._asked[-1]:
            raise UnexpectedMessage(f"client {sender} was not asked to decrypt this aggregate")
        released = decode_release(data, self.session_id, self.config.dim)
        count = len(self.contributors)
        if released.contributors != count:
            raise AggregateIntegrityError(
                f"the release counts {released.contributors} contributors, the server added {count}"
            )
        high = count * self.params.max_weight if self.params.weighted else count
        low = count
        if not low <= released.weight <= high:
            raise AggregateIntegrityError(
                f"the released weight {released.weight:g} is outside [{low}, {high}]"
            )
        self._release = AggregateInput(
            released.total.astype(np.float64), released.weight, released.contributors
        )
        self.stage = CkksStage.DONE

    @property
    def result(self) -> AggregateInput:
        if self._release is None:
            raise TooFewSurvivors("the round has no released sum")
        return self._release
