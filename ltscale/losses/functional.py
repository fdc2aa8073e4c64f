"""Functional losses. Every function returns the batch mean (a 0-dim tensor)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Plain softmax cross-entropy, mean over the batch."""
    return F.cross_entropy(logits.float(), targets)


def balanced_softmax_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, class_counts: torch.Tensor
) -> torch.Tensor:
    """Balanced softmax (BSCE): CE(z + log n_c, y). The raw z is used at test time.

    Adding log n_c (rather than log pi_c) is the same loss: the constant log sum(n) cancels
    in the softmax.
    """
    shift = class_counts.float().log().to(logits.device)
    return F.cross_entropy(logits.float() + shift, targets)


def ldam_margins(class_counts: torch.Tensor, max_margin: float = 0.5) -> torch.Tensor:
    """LDAM per-class margins Delta_c proportional to n_c^(-1/4), the largest equal to ``max_margin``."""
    margins = class_counts.float().pow(-0.25)
    return margins * (max_margin / margins.max())


def ldam_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    class_counts: torch.Tensor,
    max_margin: float = 0.5,
    scale: float = 30.0,
    class_weights: torch.Tensor | None = None,
    weight_sum: torch.Tensor | None = None,
) -> torch.Tensor:
    """LDAM: subtract Delta_y from the true-class logit, scale by ``s``, then (weighted) CE.

    ``class_weights`` carries the DRW re-weighting (effective-number weights) in its second phase;
    the weighted mean divides by the batch's sum of weights, or by ``weight_sum`` when given (a
    multi-process run passes the global batch's sum over the number of processes, so that averaging
    the processes' gradients gives the global batch's weighted mean, not a mean of per-process means).
    The logits are expected to come from a normalised linear head (cosine logits in [-1, 1]),
    as in the LDAM-DRW reference code.
    """
    margins = ldam_margins(class_counts, max_margin).to(logits.device)
    shifted = logits.float() - F.one_hot(targets, logits.shape[1]).float() * margins[targets, None]
    if class_weights is None:
        return F.cross_entropy(scale * shifted, targets)
    weights = class_weights.float().to(logits.device)[targets]
    per_image = F.cross_entropy(scale * shifted, targets, reduction="none")
    return (weights * per_image).sum() / (weights.sum() if weight_sum is None else weight_sum)


def teacher_distribution(
    teacher_logits: torch.Tensor, temperature: float, power: float = 1.0
) -> torch.Tensor:
    """DiVE's teacher target p_t = softmax(z_t / T)^p / sum_c softmax(z_t / T)^p.

    The power normalisation with exponent p equals a softmax at temperature T / p, which is how
    it is computed here (one softmax, no underflow from raising small probabilities to p).
    """
    return torch.softmax(teacher_logits.float() * (power / temperature), dim=1)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    power: float = 1.0,
) -> torch.Tensor:
    """T^2 * KL(p_t || softmax(z_s / T)), averaged over the batch (``batchmean``).

    ``teacher_logits`` carry no gradient. With ``power`` = 1 this is Hinton's KD; otherwise the
    teacher side uses DiVE's power normalisation while the student keeps temperature T.
    """
    target = teacher_distribution(teacher_logits.detach(), temperature, power)
    log_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    # xlogy gives 0 * log 0 = 0 for classes whose teacher probability underflows to zero.
    kl = (torch.xlogy(target, target) - target * log_student).sum(dim=1)
    return temperature**2 * kl.mean()


def dive_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    class_counts: torch.Tensor,
    temperature: float,
    power: float,
    alpha: float,
) -> torch.Tensor:
    """DiVE: alpha * KD_{T,p}(z_s, z_t) + (1 - alpha) * BSCE(z_s, y)."""
    distill = kd_loss(student_logits, teacher_logits, temperature, power)
    hard = balanced_softmax_cross_entropy(student_logits, targets, class_counts)
    return alpha * distill + (1.0 - alpha) * hard


def ssd_hybrid_loss(
    hard_logits: torch.Tensor,
    soft_logits: torch.Tensor,
    targets: torch.Tensor,
    soft_label_logits: torch.Tensor,
    temperature: float = 2.0,
    hard_weight: float = 1.0,
    soft_weight: float = 1.0,
) -> torch.Tensor:
    """SSD stage III: lambda1 * CE(G_hard(f), y) + lambda2 * KD_T(G_soft(f), soft labels).

    ``soft_label_logits`` are the stored logits of the re-balanced teacher; the temperature is
    applied here, at use, so one stored file serves every T.
    """
    hard = cross_entropy(hard_logits, targets)
    soft = kd_loss(soft_logits, soft_label_logits, temperature)
    return hard_weight * hard + soft_weight * soft
