"""Federated strategies that see only what secure aggregation releases.

The contract, for a global vector of ``dim`` trainable LoRA coordinates:

1. The server tells each sampled client :meth:`Strategy.client_options` (local learning rate,
   FedProx ``mu``, whether to run SCAFFOLD and the server control variate).
2. Client ``u`` trains, computes its update ``delta_u = trained - global`` and submits
   ``strategy.contribution(delta_u, n_u, control_delta_u)`` -- a float vector of length
   :meth:`Strategy.contribution_size` -- together with the scalar weight
   ``strategy.client_weight(n_u)``, into the secure sum.
3. Secure aggregation releases only :class:`AggregateInput`: the sum of the contributions, the
   sum of the weights and the number of contributors. :meth:`Strategy.aggregate` turns that and
   the current global vector into the next global vector, updating the server state.

What a client contributes:

* FedAvg / FedProx / FedAvgM / FedAdam / FedYogi / FedAdagrad: ``w * delta`` with weight
  ``w = n`` (its sample count), so ``sum / weight_sum`` is the sample-weighted mean update.
* SCAFFOLD: ``concat(delta, control_delta)`` with weight 1 (uniform over the cohort, as in
  Karimireddy et al.): both halves are averaged by the same secure sum.

Server optimisers follow Reddi et al., "Adaptive Federated Optimization" (ICLR'21), Algorithm 2,
with the mean update as pseudo-gradient ``Delta``: ``m = b1*m + (1-b1)*Delta``; ``v`` by the
Adagrad, Adam or Yogi rule; ``x += eta * m / (sqrt(v) + tau)``; ``v`` starts at ``tau**2``.
All server state is a dict of numpy arrays (:meth:`state_dict` / :meth:`load_state_dict`) so the
server can checkpoint it.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from fl_core.errors import AggregationError, StrategyConfigError, UpdateLayoutError
from fl_core.updates import check_finite


@dataclass(frozen=True)
class AggregateInput:
    """Exactly what the secure sum releases for one round."""

    contribution_sum: np.ndarray
    weight_sum: float
    num_contributors: int


@dataclass(frozen=True)
class ClientOptions:
    """What the server tells clients about local training this round."""

    lr: float | None  # None: the client's own configured learning rate
    prox_mu: float = 0.0
    server_control: np.ndarray | None = None  # SCAFFOLD only


def reference_sum(contributions: Sequence[np.ndarray], weights: Sequence[float]) -> AggregateInput:
    """The plaintext sum in float64, to check a secure aggregate against, round by round."""
    if not contributions or len(contributions) != len(weights):
        raise AggregationError("need one weight per contribution and at least one contribution")
    total = np.zeros(contributions[0].shape, dtype=np.float64)
    for c in contributions:
        if c.shape != total.shape:
            raise UpdateLayoutError(f"contribution shape {c.shape} differs from {total.shape}")
        total += c
    return AggregateInput(
        total, float(np.sum(np.asarray(weights, dtype=np.float64))), len(contributions)
    )


class Strategy:
    """Base class. Its aggregation is FedAvg's: global + sample-weighted mean update."""

    name: ClassVar[str] = "strategy"

    def __init__(self, dim: int, *, eta_l: float | None = None) -> None:
        if dim < 1:
            raise StrategyConfigError(f"dim must be >= 1, got {dim}")
        if eta_l is not None:
            _positive(eta_l=eta_l)
        self.dim = dim
        self.eta_l = eta_l

    def client_options(self) -> ClientOptions:
        return ClientOptions(lr=self.eta_l)

    def contribution_size(self) -> int:
        return self.dim

    def client_weight(self, num_samples: int) -> float:
        if num_samples < 1:
            raise AggregationError(f"a client needs >= 1 sample to contribute, got {num_samples}")
        return float(num_samples)

    def contribution(
        self, delta: np.ndarray, num_samples: int, control_delta: np.ndarray | None = None
    ) -> np.ndarray:
        self._check(delta, self.dim, "update")
        if control_delta is not None:
            raise AggregationError(f"{self.name} takes no control variate")
        return (self.client_weight(num_samples) * delta.astype(np.float64)).astype(np.float32)

    def aggregate(self, global_vector: np.ndarray, agg: AggregateInput) -> np.ndarray:
        mean = self._mean(agg)
        new: np.ndarray = (global_vector + self._server_step(mean)).astype(np.float32)
        return new

    def _server_step(self, mean_update: np.ndarray) -> np.ndarray:
        return mean_update

    def _mean(self, agg: AggregateInput) -> np.ndarray:
        if agg.num_contributors < 1 or not agg.weight_sum > 0:
            raise AggregationError(
                f"nothing to aggregate: {agg.num_contributors} contributors, "
                f"weight sum {agg.weight_sum}"
            )
        self._check(agg.contribution_sum, self.contribution_size(), "aggregate")
        return agg.contribution_sum.astype(np.float64) / agg.weight_sum

    @staticmethod
    def _check(vector: np.ndarray, size: int, what: str) -> None:
        if vector.shape != (size,):
            raise UpdateLayoutError(f"{what} has shape {vector.shape}, need ({size},)")
        check_finite(vector, what)

    def state_dict(self) -> dict[str, np.ndarray]:
        return {}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        expected = self.state_dict()
        if set(state) != set(expected):
            raise StrategyConfigError(
                f"{self.name} state needs keys {sorted(expected)}, got {sorted(state)}"
            )
        for key, value in state.items():
            if value.shape != expected[key].shape:
                raise StrategyConfigError(
                    f"{self.name} state {key!r} has shape {value.shape}, need {expected[key].shape}"
                )
            check_finite(value, f"{self.name} state {key!r}")
            setattr(self, key, value.astype(np.float64).copy())


class FedAvg(Strategy):
    """McMahan et al. (2017): the sample-weighted mean of the clients' updates."""

    name = "fedavg"


class FedProx(Strategy):
    """FedAvg aggregation; clients add (mu/2)*||w - w_global||^2 to their local loss."""

    name = "fedprox"

    def __init__(self, dim: int, *, mu: float = 0.01, eta_l: float | None = None) -> None:
        super().__init__(dim, eta_l=eta_l)
        _positive(mu=mu)
        self.mu = mu

    def client_options(self) -> ClientOptions:
        return ClientOptions(lr=self.eta_l, prox_mu=self.mu)


class FedAvgM(Strategy):
    """Server momentum (Hsu et al. 2019): m = beta1*m + Delta; x += eta*m."""

    name = "fedavgm"

    def __init__(
        self, dim: int, *, eta: float = 1.0, beta1: float = 0.9, eta_l: float | None = None
    ) -> None:
        super().__init__(dim, eta_l=eta_l)
        _positive(eta=eta)
        _unit(beta1=beta1)
        self.eta, self.beta1 = eta, beta1
        self.m = np.zeros(dim)

    def _server_step(self, mean_update: np.ndarray) -> np.ndarray:
        self.m = self.beta1 * self.m + mean_update
        return self.eta * self.m

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"m": self.m.copy()}


class FedAdagrad(Strategy):
    """Reddi et al. server Adagrad: v += Delta^2."""

    name = "fedadagrad"

    def __init__(
        self,
        dim: int,
        *,
        eta: float = 1e-2,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
        eta_l: float | None = None,
    ) -> None:
        super().__init__(dim, eta_l=eta_l)
        _positive(eta=eta, tau=tau)
        _unit(beta1=beta1, beta2=beta2)
        self.eta, self.beta1, self.beta2, self.tau = eta, beta1, beta2, tau
        self.m = np.zeros(dim)
        self.v = np.full(dim, tau * tau)

    def _second_moment(self, d2: np.ndarray) -> np.ndarray:
        v: np.ndarray = self.v + d2
        return v

    def _server_step(self, mean_update: np.ndarray) -> np.ndarray:
        self.m = self.beta1 * self.m + (1.0 - self.beta1) * mean_update
        self.v = self._second_moment(mean_update * mean_update)
        step: np.ndarray = self.eta * self.m / (np.sqrt(self.v) + self.tau)
        return step

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"m": self.m.copy(), "v": self.v.copy()}


class FedAdam(FedAdagrad):
    """Reddi et al. server Adam: v = beta2*v + (1-beta2)*Delta^2."""

    name = "fedadam"

    def _second_moment(self, d2: np.ndarray) -> np.ndarray:
        return self.beta2 * self.v + (1.0 - self.beta2) * d2


class FedYogi(FedAdagrad):
    """Reddi et al. server Yogi: v = v - (1-beta2)*Delta^2*sign(v - Delta^2)."""

    name = "fedyogi"

    def _second_moment(self, d2: np.ndarray) -> np.ndarray:
        v: np.ndarray = self.v - (1.0 - self.beta2) * d2 * np.sign(self.v - d2)
        return v


class Scaffold(Strategy):
    """SCAFFOLD (Karimireddy et al., ICML'20): x += eta * mean(dy); c += (|S|/N) * mean(dc).

    ``num_clients`` is N, the whole population; the cohort size |S| is released by the sum.
    """

    name = "scaffold"

    def __init__(
        self, dim: int, *, num_clients: int, eta: float = 1.0, eta_l: float | None = None
    ) -> None:
        super().__init__(dim, eta_l=eta_l)
        _positive(eta=eta)
        if num_clients < 1:
            raise StrategyConfigError(f"num_clients must be >= 1, got {num_clients}")
        self.eta, self.num_clients = eta, num_clients
        self.c = np.zeros(dim)

    def client_options(self) -> ClientOptions:
        return ClientOptions(lr=self.eta_l, server_control=self.c.astype(np.float32))

    def contribution_size(self) -> int:
        return 2 * self.dim

    def client_weight(self, num_samples: int) -> float:
        super().client_weight(num_samples)  # still refuses a client without data
        return 1.0

    def contribution(
        self, delta: np.ndarray, num_samples: int, control_delta: np.ndarray | None = None
    ) -> np.ndarray:
        if control_delta is None:
            raise AggregationError("SCAFFOLD clients must submit their control-variate delta")
        self._check(delta, self.dim, "update")
        self._check(control_delta, self.dim, "control delta")
        self.client_weight(num_samples)
        return np.concatenate([delta, control_delta]).astype(np.float32)

    def aggregate(self, global_vector: np.ndarray, agg: AggregateInput) -> np.ndarray:
        if agg.num_contributors > self.num_clients:
            raise AggregationError(
                f"{agg.num_contributors} contributors exceed the population N={self.num_clients}"
            )
        mean = self._mean(agg)
        self.c = self.c + (agg.num_contributors / self.num_clients) * mean[self.dim :]
        return (global_vector + self.eta * mean[: self.dim]).astype(np.float32)

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"c": self.c.copy()}


def _positive(**values: float) -> None:
    for key, value in values.items():
        if not value > 0:
            raise StrategyConfigError(f"{key} must be > 0, got {value}")


def _unit(**values: float) -> None:
    for key, value in values.items():
        if not 0.0 <= value < 1.0:
            raise StrategyConfigError(f"{key} must be in [0, 1), got {value}")


STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (FedAvg, FedProx, FedAvgM, FedAdam, FedYogi, FedAdagrad, Scaffold)
}


def build_strategy(name: str, dim: int, hparams: Mapping[str, object] | None = None) -> Strategy:
    """Instantiate a strategy by name from a config dict, refusing unknown names and keys."""
    key = name.lower()
    if key not in STRATEGIES:
        raise StrategyConfigError(f"unknown strategy {name!r}; known: {', '.join(STRATEGIES)}")
    cls = STRATEGIES[key]
    params = {
        p.name: p
        for p in inspect.signature(cls.__init__).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    given = dict(hparams or {})
    unknown = sorted(set(given) - set(params))
    if unknown:
        raise StrategyConfigError(
            f"{key} has no hyper-parameter {', '.join(unknown)}; it takes: {', '.join(params)}"
        )
    missing = sorted(
        k for k, p in params.items() if p.default is inspect.Parameter.empty and k not in given
    )
    if missing:
        raise StrategyConfigError(f"{key} needs hyper-parameter {', '.join(missing)}")
    for k, value in given.items():
        want_int = k == "num_clients"
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or (want_int and not isinstance(value, int))
        ):
            raise StrategyConfigError(
                f"{key}: hyper-parameter {k} must be {'an integer' if want_int else 'a number'}, "
                f"got {value!r}"
            )
    return cls(dim, **given)  # type: ignore[arg-type]
