"""First-order influence of one update on a causal LM (PAPER_NOTES §1): predicted vs observed Δ log π(y_o | x_o),
the explicit per-token terms A, K (eNTK) and G for small vocabularies, and gradient similarity between responses.

Everything here is pure torch on a ``PreTrainedModel``; no Lightning. Parameters are addressed by
``model.named_parameters()`` names (tied weights appear once).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, jvp

from dynlab.losses.logps import IGNORE_INDEX, segment_sum
from dynlab.metrics.displacement import ENTANGLEMENT_STATS
from dynlab.models.forward import lm_head, response_hidden

Params = dict[str, Tensor]


def pack(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int = 0,
         device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """(prompt ids, response ids) pairs -> right-padded ``input_ids``, ``attention_mask``, ``labels`` (B, T).

    Labels are ``IGNORE_INDEX`` on the prompt and padding, so ``response_positions`` selects the response tokens.
    """
    width = max(len(p) + len(r) for p, r in pairs)
    ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    labels = torch.full((len(pairs), width), IGNORE_INDEX, dtype=torch.long)
    for b, (prompt, response) in enumerate(pairs):
        seq = torch.tensor([*prompt, *response], dtype=torch.long)
        ids[b, : seq.numel()], mask[b, : seq.numel()] = seq, 1
        labels[b, len(prompt): seq.numel()] = seq[len(prompt):]
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def response_logits(model: nn.Module, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Logits (at least float32) of the response positions only: batch (B, T) -> logits (N, V), targets (N,),
    seq_index (N,)."""
    hidden, targets, seq_index = response_hidden(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    logits = lm_head(model, hidden)
    return logits.to(torch.promote_types(logits.dtype, torch.float32)), targets, seq_index


def sequence_logps(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    """log π(y | x) summed over response tokens: batch (B, T) -> (B,)."""
    logits, targets, seq_index = response_logits(model, batch)
    token = logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    return segment_sum(token, seq_index, batch["input_ids"].shape[0])


class _Of(nn.Module):
    """``fn(model, batch)`` as a module, so ``torch.func.functional_call`` can run it with substituted parameters."""

    def __init__(self, model: nn.Module, fn: Callable[[nn.Module, Mapping[str, Tensor]], Tensor]):
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> Tensor:
        return self.fn(self.model, {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})


def _functional(model: nn.Module, fn: Callable[[nn.Module, Mapping[str, Tensor]], Tensor], batch: Mapping[str, Tensor],
                varying: list[str], at: Mapping[str, Tensor] | None = None) -> Callable[[Params], Tensor]:
    """``params -> fn(model with params, batch)`` for the parameters named in ``varying``; every other parameter
    takes its value from ``at`` (if given there) or the model, buffers from the model."""
    wrapper = _Of(model, fn)
    fixed = {f"model.{n}": (at[n] if at is not None and n in at else p.detach())
             for n, p in model.named_parameters() if n not in varying}
    fixed.update({f"model.{n}": b for n, b in model.named_buffers()})
    args = (batch["input_ids"], batch["attention_mask"], batch["labels"])
    return lambda params: functional_call(wrapper, ({f"model.{n}": p for n, p in params.items()}, fixed), args)


def trainable_params(model: nn.Module, pattern: str | None = None) -> Params:
    """Trainable parameters by name, optionally only those whose name matches the regex ``pattern``."""
    selected = {n: p for n, p in model.named_parameters()
                if p.requires_grad and (pattern is None or re.search(pattern, n))}
    if not selected:
        raise ValueError(f"no trainable parameter matches {pattern!r}")
    return selected


def directional_change(model: nn.Module, batch: Mapping[str, Tensor], direction: Mapping[str, Tensor],
                       at: Mapping[str, Tensor] | None = None) -> Tensor:
    """The first-order change ⟨∇θ log π(y_o | x_o), d⟩ of every sequence in ``batch`` along the parameter direction
    ``d`` (names -> tensors; parameters not named stay fixed), evaluated at parameters ``at`` (default: current).

    One forward-mode pass (``torch.func.jvp``) gives all B inner products without forming any gradient, so memory
    stays at about two forwards whatever the model size. batch (B, T) -> (B,).
    """
    current = {n: p.detach() for n, p in model.named_parameters()}
    primals = {n: (at[n] if at is not None else current[n]).detach() for n in direction}
    tangents = {n: direction[n].to(primals[n]) for n in direction}
    logps = _functional(model, sequence_logps, batch, list(direction), at)

    with _attention("eager", model):  # forward-mode AD has no rule for the fused CPU attention kernels
        _, change = jvp(logps, (primals,), (tangents,))
    return change


def predicted_and_observed(model: nn.Module, batch: Mapping[str, Tensor], before: Params,
                           after: Params | None = None) -> dict[str, Tensor]:
    """Predicted (⟨∇θ log π, Δθ⟩ at θ_before) and observed change of log π(y_o | x_o) for Δθ = after − before.

    ``after`` defaults to the model's current parameters. Returns ``{"predicted", "observed"}`` (B,).
    """
    now = {n: p.detach() for n, p in model.named_parameters()}
    after = now if after is None else after
    delta = {n: after[n] - before[n] for n in before}
    with torch.no_grad(), _parameters(model, before):
        logp_before = sequence_logps(model, batch)
    with torch.no_grad(), _parameters(model, after):
        logp_after = sequence_logps(model, batch)
    return {"predicted": directional_change(model, batch, delta, at=before), "observed": logp_after - logp_before}


def relative_error(predicted: Tensor, observed: Tensor) -> Tensor:
    """|predicted − observed| / |observed| per example (inf where nothing moved but something was predicted)."""
    return (predicted - observed).abs() / observed.abs()


class _parameters:
    """Temporarily load ``values`` (names -> tensors) into the model's parameters."""

    def __init__(self, model: nn.Module, values: Mapping[str, Tensor]):
        self.params = dict(model.named_parameters())
        self.values = values

    def __enter__(self):
        self.saved = {n: self.params[n].detach().clone() for n in self.values}
        with torch.no_grad():
            for n, v in self.values.items():
                self.params[n].copy_(v)

    def __exit__(self, *exc):
        with torch.no_grad():
            for n, v in self.saved.items():
                self.params[n].copy_(v)


class _attention:
    """Temporarily switch a transformers model's attention implementation (read at call time from its config)."""

    def __init__(self, implementation: str, model: nn.Module):
        self.config = getattr(model, "config", None)
        self.implementation = implementation

    def __enter__(self):
        if self.config is not None:
            self.saved = self.config._attn_implementation
            self.config._attn_implementation = self.implementation

    def __exit__(self, *exc):
        if self.config is not None:
            self.config._attn_implementation = self.saved


# ---- the explicit decomposition -------------------------------------------------------------------------------------

def entk_decomposition(model: nn.Module, observed: Mapping[str, Tensor], train: Mapping[str, Tensor],
                       loss_of_logits: Callable[[Tensor], Tensor], lr: float,
                       max_elements: int = 200_000_000) -> dict[str, Tensor]:
    """Δ log π(y_o | χ_o) ≈ −η Σ_l A_m K_{m,l} G_l with every term held explicitly (PAPER_NOTES §1).

    ``observed`` is one sequence (B = 1) with M response tokens; ``train`` the training batch whose response
    positions give z_u (N, V); ``loss_of_logits(z_u) -> scalar`` is the training loss as a function of those logits
    (SFT, DPO with its reference log-probs closed over, ...). Only for small vocabularies: K is (M, V, N, V) and the
    Jacobians (M·V + N·V, P) are formed; ``max_elements`` guards their size.

    Returns ``A (M, V, V)``, ``K (M, V, N, V)``, ``G (N, V)``, ``token (M,)`` the predicted change of each observed
    token's log-prob, ``predicted ()`` their sum, and ``sgd ()`` = −η ⟨∇θ log π(y_o | χ_o), ∇θ L_u⟩ by autograd.
    """
    with warnings.catch_warnings():  # functorch batches the fused attention backward by a slower loop: fine here
        warnings.filterwarnings("ignore", message="There is a performance drop")
        return _entk_decomposition(model, observed, train, loss_of_logits, lr, max_elements)


def _entk_decomposition(model: nn.Module, observed: Mapping[str, Tensor], train: Mapping[str, Tensor],
                        loss_of_logits: Callable[[Tensor], Tensor], lr: float, max_elements: int) -> dict[str, Tensor]:
    params = trainable_params(model)
    n_params = sum(p.numel() for p in params.values())
    z_o, targets_o, _ = response_logits(model, observed)
    z_u, _, _ = response_logits(model, train)
    (m, v), n = z_o.shape, z_u.shape[0]
    if (m + n) * v * n_params > max_elements:
        raise ValueError(f"the eNTK Jacobians would hold {(m + n) * v * n_params:,} numbers (> {max_elements:,}); "
                         f"use a smaller vocabulary or fewer tokens, or directional_change for big models")
    def logits_of(batch: Mapping[str, Tensor]) -> Callable[[Params], Tensor]:
        return _functional(model, lambda model_, b: response_logits(model_, b)[0], batch, list(params))

    primals = {n_: p.detach() for n_, p in params.items()}

    def flat(jac: Params, rows: int) -> Tensor:  # {name: (rows, V, *shape)} -> (rows·V, P)
        return torch.cat([jac[n_].reshape(rows * v, -1) for n_ in primals], dim=1)

    j_o = flat(jacrev(logits_of(observed))(primals), m)
    j_u = flat(jacrev(logits_of(train))(primals), n)
    kernel = (j_o @ j_u.T).reshape(m, v, n, v)  # eNTK K[m, :, l, :] = ∇θ z_o,m ∇θ z_u,lᵀ

    z_u_leaf = z_u.detach().requires_grad_(True)
    grad_z = torch.autograd.grad(loss_of_logits(z_u_leaf), z_u_leaf)[0]  # G = ∂L/∂z_u (N, V)
    probs = z_o.detach().softmax(-1)  # (M, V)
    a = torch.eye(v, dtype=probs.dtype, device=probs.device) - probs[:, None, :]  # A_m = I − 1 π_mᵀ, (M, V, V)
    delta_z = -lr * torch.einsum("mvnw,nw->mv", kernel, grad_z)  # predicted change of the observed logits
    delta_logpi = torch.einsum("mab,mb->ma", a, delta_z)  # (M, V): every vocabulary entry's log-prob change
    token = delta_logpi.gather(-1, targets_o[:, None]).squeeze(-1)

    # the same prediction in its SGD form, by autograd through the parameters
    g_o = torch.autograd.grad(sequence_logps(model, observed).sum(), list(params.values()))
    g_u = torch.autograd.grad(loss_of_logits(response_logits(model, train)[0]), list(params.values()))
    sgd = -lr * sum((a_ * b_).sum() for a_, b_ in zip(g_o, g_u))
    return {"A": a, "K": kernel, "G": grad_z, "token": token, "predicted": token.sum(), "sgd": sgd.detach()}


# ---- which responses move together -----------------------------------------------------------------------------------

def response_gradient_gram(model: nn.Module, prompt_ids: Sequence[int], responses: Mapping[str, Sequence[int]],
                           params: str | None = None, max_bytes: int = 2 << 30) -> tuple[list[str], Tensor]:
    """Gram matrix of the flattened gradients g_r = ∇θ log π(y_r | x) of the responses of one prompt.

    G[r, s] = ⟨g_r, g_s⟩ over the trainable parameters whose names match the regex ``params`` (None: all trainable;
    with a LoRA adapter that is the adapter alone). One forward and one ``torch.autograd.grad`` per response, under
    ``enable_grad`` whatever the caller's mode and without touching any parameter's ``.grad``; a parameter a
    response's log-prob does not reach contributes zeros. The gradients are float32 and held together, R × (subset
    size) floats: ``max_bytes`` refuses more, with the fix in the message.

    Returns:
        ``(names, G (R, R) float64)``, the names in the order of ``responses``.
    """
    selected = trainable_params(model, params)
    names = list(responses)
    size = sum(p.numel() for p in selected.values()) * len(names) * 4
    if size > max_bytes:
        raise ValueError(f"the gradients of {len(names)} responses would hold {size / 2**30:.1f} GiB; restrict it to "
                         f"fewer parameters with a regex (e.g. 'layers\\.(2[6-9])\\.': the last 4 of 30 blocks)")
    device = next(model.parameters()).device
    grads = []  # R tuples of one float32 gradient per selected parameter
    with torch.inference_mode(False), torch.enable_grad():  # callable from probe_step (no_grad) and validation
        for name in names:
            batch = pack([(list(prompt_ids), list(responses[name]))], device=device)
            logp = sequence_logps(model, batch).sum()
            grad = torch.autograd.grad(logp, list(selected.values()), allow_unused=True, materialize_grads=True)
            grads.append(tuple(g.detach().float() for g in grad))
    gram = torch.zeros((len(names), len(names)), dtype=torch.float64, device=device)
    for per_param in zip(*grads):  # one parameter at a time: the float64 copies stay small
        stacked = torch.stack([g.reshape(-1) for g in per_param]).double()  # (R, numel)
        gram += stacked @ stacked.T
    return names, gram


def gradient_similarity(model: nn.Module, prompt_ids: Sequence[int], responses: Mapping[str, Sequence[int]],
                        params: str | None = None, max_bytes: int = 2 << 30) -> tuple[list[str], Tensor]:
    """Cosine similarity of ∇θ log π(y | x) between the responses of one prompt: (names, (R, R)).

    A positive entry means a step raising one response raises the other (to first order, the eNTK view).
    ``params`` (a regex over parameter names) restricts the gradients to a subset, which bounds memory at
    R × (subset size) floats; ``max_bytes`` refuses larger requests with the fix in the message
    (``response_gradient_gram``).
    """
    names, gram = response_gradient_gram(model, prompt_ids, responses, params, max_bytes)
    norms = gram.diagonal().sqrt().clamp(min=1e-30)
    return names, (gram / norms[:, None] / norms[None, :]).float()


def gradient_entanglement(model: nn.Module, prompt_ids: Sequence[int], chosen_ids: Sequence[int],
                          rejected_ids: Sequence[int], params: str | None = None,
                          max_bytes: int = 2 << 30) -> dict[str, Tensor]:
    """Gradient entanglement of one preference pair (Yuan et al. 2024), g± = ∇θ log π(y± | x) over the trainable
    parameters matching the regex ``params`` (None: all trainable):

    - ``dot`` = ⟨g+, g-⟩, ``sq_chosen`` = ‖g+‖², ``sq_rejected`` = ‖g-‖²
    - ``cosine`` = ⟨g+, g-⟩ / (‖g+‖ ‖g-‖) (0 where a gradient vanishes)

    A step of gradient ascent on log π(y+) − log π(y-) changes log π(y+) by η (‖g+‖² − ⟨g+, g-⟩) to first order: when
    the inner product exceeds ‖g+‖² the chosen response falls too (the entanglement behind likelihood displacement).
    Two forward/backward passes (``response_gradient_gram``); the parameters' ``.grad`` is left alone.

    Returns:
        name -> () float64 scalar, the names of ``ENTANGLEMENT_STATS``.
    """
    _, gram = response_gradient_gram(model, prompt_ids, {"chosen": chosen_ids, "rejected": rejected_ids}, params,
                                     max_bytes)
    dot, sq_chosen, sq_rejected = gram[0, 1], gram[0, 0], gram[1, 1]
    norms = (sq_chosen * sq_rejected).sqrt()
    cosine = torch.where(norms > 0, dot / norms.clamp(min=1e-300), torch.zeros_like(dot))
    return dict(zip(ENTANGLEMENT_STATS, (dot, sq_chosen, sq_rejected, cosine)))
