"""Optimisation attack (DLG, Zhu et al. 2019; TAG, Deng et al. 2021): find inputs whose update
matches the observed one.

The attacker holds the global model and the observed update Δ = −η·∇L(x) and searches for
dummy text x' with ∇L(x') ∝ −Δ. Text is discrete, so each position is relaxed to a softmax
over the vocabulary (logits Z, temperature 1): the dummy input embedding is softmax(Z)·E and the
dummy next-token labels are the same soft distributions shifted by one, which keeps the
relaxation faithful to causal-LM training where labels are the inputs. The objective is TAG's:
per tensor, one minus the cosine similarity (scale-free, so the unknown learning rate does not
matter) plus a small L1 term on the normalised difference, summed over all tensors the update
contains. After optimisation each position takes its most likely token.

Assumptions, as in the literature: the attacker knows the batch size and the sequence length
(both are visible in practice from the number of examples a client reports and the model's
padding), and the update is one gradient step (FedSGD); several local steps or an adaptive
optimiser (Adam) make the match approximate and the attack weaker.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from proofs.attacks.errors import AttackInputError
from proofs.attacks.model_access import Update, input_embedding_matrix
from proofs.attacks.result import Reconstruction

#: TAG's weight of the L1 term relative to the cosine term.
L1_WEIGHT = 0.01


def optimisation_attack(
    update: Update,
    model: nn.Module,
    *,
    batch: int,
    length: int,
    steps: int = 300,
    learning_rate: float = 0.1,
    candidates: Collection[int] | None = None,
    seed: int = 0,
) -> Reconstruction:
    """Reconstruct ``batch`` sequences of ``length`` tokens whose gradient matches ``update``.

    ``candidates`` restricts the search to those token ids (for example the tokens the
    token-set attack names); ``None`` or an empty set searches the whole vocabulary.
    """
    if batch < 1 or length < 2:
        raise AttackInputError(f"need batch >= 1 and length >= 2, got {batch} and {length}")
    if steps < 1:
        raise AttackInputError(f"need at least one optimisation step, got {steps}")
    params = dict(model.named_parameters())
    names = [n for n in update if n in params]
    if not names:
        raise AttackInputError(
            "no tensor of the update is a parameter of the model (names must match "
            "model.named_parameters())"
        )
    for name in names:
        if tuple(update[name].shape) != tuple(params[name].shape):
            raise AttackInputError(
                f"{name}: update has shape {update[name].shape}, model has "
                f"{tuple(params[name].shape)}"
            )
    # The observed gradient direction is −Δ.
    targets = [-torch.as_tensor(update[n], dtype=torch.float32) for n in names]
    target_norms = [t.norm().clamp_min(1e-30) for t in targets]
    weights = [params[n] for n in names]
    vocab = input_embedding_matrix(model).shape[0]
    allowed = sorted(candidates) if candidates else list(range(vocab))
    if allowed[0] < 0 or allowed[-1] >= vocab:
        raise AttackInputError(f"candidate token ids must lie in [0, {vocab})")
    index = torch.tensor(allowed, dtype=torch.long)

    generator = torch.Generator().manual_seed(seed)
    logits = (0.1 * torch.randn(batch, length, len(allowed), generator=generator)).requires_grad_()
    optimiser = torch.optim.Adam([logits], lr=learning_rate)
    was_training = model.training
    model.eval()
    # Matching gradients needs second derivatives; only the math attention kernel has them.
    try:
        with sdpa_kernel(SDPBackend.MATH):
            for _ in range(steps):
                optimiser.zero_grad(set_to_none=True)
                loss = _matching_loss(model, logits, index, weights, targets, target_norms)
                loss.backward()  # type: ignore[no-untyped-call]
                optimiser.step()
    finally:
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    with torch.no_grad():
        guessed = index[logits.argmax(-1)]
    sequences = tuple(tuple(int(t) for t in row) for row in guessed)
    tokens = frozenset(t for row in sequences for t in row)
    return Reconstruction(tokens, sequences, f"{steps} Adam steps on {batch}×{length} soft tokens")


def _matching_loss(
    model: nn.Module,
    logits: torch.Tensor,
    index: torch.Tensor,
    weights: list[nn.Parameter],
    targets: list[torch.Tensor],
    target_norms: list[torch.Tensor],
) -> torch.Tensor:
    soft = torch.softmax(logits, dim=-1)  # over the allowed tokens only
    table = model.get_input_embeddings().weight  # type: ignore[operator]
    embeds = soft @ table[index]
    out = model(inputs_embeds=embeds, use_cache=False).logits
    # Causal-LM loss with soft labels: position t predicts the distribution at t + 1.
    log_probs = torch.log_softmax(out[:, :-1, :], dim=-1)[..., index]
    train_loss = -(soft[:, 1:, :] * log_probs).sum(-1).mean()
    grads = torch.autograd.grad(train_loss, weights, create_graph=True)
    total = logits.new_zeros(())
    for grad, target, norm in zip(grads, targets, target_norms, strict=True):
        grad_norm = grad.norm().clamp_min(1e-30)
        cosine = (grad * target).sum() / (grad_norm * norm)
        l1 = (grad / grad_norm - target / norm).abs().sum()
        total = total + (1.0 - cosine) + L1_WEIGHT * l1
    return total
