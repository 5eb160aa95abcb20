"""Training objectives as pure functions of log-probabilities: preference losses (DPO, IPO, ORPO, KTO) and GRPO.

Each loss takes per-example tensors (log-probability sums of the completion's tokens under the
policy and, where used, under the reference) and returns per-example losses; the trainer averages
them over the examples of a step.

  dpo   -(1-ε) log σ(z) - ε log σ(-z),  z = β((π_c - ρ_c) - (π_r - ρ_r))        (Rafailov et al.)
  ipo   (h - 1/(2β))²,  h as z/β on log-probabilities averaged per token            (Azar et al.)
  orpo  -π̄_c - λ log σ(log odds(π̄_c) - log odds(π̄_r)),  π̄ per-token averages, no reference
  kto   w_d (1 - σ(β(π - ρ - z₀))) for desirable rows, w_u (1 - σ(β(z₀ - (π - ρ)))) for
        undesirable ones; z₀ = max(0, mean of π - ρ over the micro-batch), detached: a simpler
        estimate of the reference KL than the paper's mismatched pairs (Ethayarajh et al.)
  grpo  per completion token: -min(ρ A, clip(ρ, 1-ε, 1+ε) A) + β KL,  ρ = exp(π - π_old) the
        ratio to the sampling policy, A the completion's group-normalized advantage, KL the k3
        estimate exp(ρ_ref - π) - (ρ_ref - π) - 1 with ρ_ref the reference's log p   (Shao et al.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

OBJECTIVES = ("dpo", "ipo", "orpo", "kto", "grpo")
PAIRED = ("dpo", "ipo", "orpo")


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p(target) per row, number of targets per row) from logits (B, T, V) and
    targets (B, T) holding -100 where a position is not a target."""
    sel = targets != -100
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * sel).sum(-1), sel.sum(-1)


def target_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per row from logits (N, V) and targets (N,), holding one (N, V) buffer for
    backward: log_softmax then gather would keep the log-probabilities, then make a gradient for
    each of them (three at once, the largest buffers of a training step with a large vocabulary)."""
    return _TargetLogp.apply(logits, targets)


class _TargetLogp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = logits.float()
        lse = torch.logsumexp(x, dim=-1)
        ctx.save_for_backward(x, targets, lse)
        ctx.dtype = logits.dtype
        return x.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, targets, lse = ctx.saved_tensors
        # d log p(t) / dx = onehot(t) - softmax(x), written over the saved logits: the caller's
        # logits are dead by now (the output head's backward needs its input, not its output)
        grad = x.sub_(lse.unsqueeze(-1)).exp_().mul_(-g.unsqueeze(-1))
        grad.scatter_add_(-1, targets.unsqueeze(-1), g.unsqueeze(-1))
        return grad.to(ctx.dtype), None


def dpo(pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor, beta: float = 0.1,
        label_smoothing: float = 0.0) -> torch.Tensor:
    z = beta * ((pc - rc) - (pr - rr))
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def ipo(pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """On log-probabilities averaged per token (as TRL does)."""
    return ((pc - rc) - (pr - rr) - 1 / (2 * beta)) ** 2


def orpo(avg_c: torch.Tensor, avg_r: torch.Tensor, lam: float = 0.1) -> torch.Tensor:
    """avg_c, avg_r: per-token average log-probabilities of the chosen and rejected completions."""
    # log(1 - p) as log(-expm1(log p)): 1 - exp(log p) loses the digits of a confident model (p near 1) in
    # float32, and is 0 (log -inf) once log p > -6e-8
    log_odds = (avg_c - avg_r) - (torch.log(-torch.expm1(avg_c)) - torch.log(-torch.expm1(avg_r)))
    return -avg_c - lam * F.logsigmoid(log_odds)


def kto(p: torch.Tensor, r: torch.Tensor, desirable: torch.Tensor, beta: float = 0.1,
        w_desirable: float = 1.0, w_undesirable: float = 1.0, z0: torch.Tensor | None = None) -> torch.Tensor:
    """z0: the KL reference point (default kto_kl of this batch; several processes pass the
    whole batch's, as TRL gathers it)."""
    z0 = kto_kl(p, r) if z0 is None else z0
    d = w_desirable * (1 - torch.sigmoid(beta * (p - r - z0)))
    u = w_undesirable * (1 - torch.sigmoid(beta * (z0 - (p - r))))
    return torch.where(desirable, d, u)


def kto_kl(p: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    return (p - r).mean().clamp(min=0).detach()


def group_advantages(rewards: torch.Tensor, group: int, eps: float = 1e-4) -> torch.Tensor:
    """(r - mean of its group) / (std of its group + eps) for rewards (N * group,) laid out group by
    group; the sample standard deviation (Bessel-corrected, torch.std's default), as TRL computes it."""
    g = rewards.view(-1, group)  # (N, G)
    return ((g - g.mean(dim=1, keepdim=True)) / (g.std(dim=1, keepdim=True) + eps)).reshape(-1)


def kl_k3(logp: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(policy || reference): exp(ref - logp) - (ref - logp) - 1 (>= 0)."""
    d = ref - logp
    return torch.exp(d) - d - 1


def grpo(logp: torch.Tensor, old: torch.Tensor, ref: torch.Tensor | None, adv: torch.Tensor, beta: float = 0.04,
         clip_eps: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token loss, per-token clipped flag) for per-token log-probabilities under the policy,
    the sampling (old) policy and the reference (None: no KL term), and each token's advantage."""
    ratio = torch.exp(logp - old)
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
    loss = -torch.min(ratio * adv, clipped * adv)
    if ref is not None and beta:
        loss = loss + beta * kl_k3(logp, ref)
    was_clipped = ((ratio < 1 - clip_eps) & (adv < 0)) | ((ratio > 1 + clip_eps) & (adv > 0))
    return loss, was_clipped
