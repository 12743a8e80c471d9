"""What adaptation minimises: entropy of predictions, the most confident rows (TPT's selection), the
entropy of the averaged prediction (episodic), and the online objective (SHOT's information
maximisation plus adaclip's anchor term). See adaclip.tta for the protocols."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .settings import TTASettings


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each row's softmax."""
    logp = F.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def confident_rows(logits: torch.Tensor, fraction: float) -> torch.Tensor | None:
    """Indices of the rows with the lowest entropy, max(1, int(fraction * n)) of them (TPT keeps 6 of
    64), or None when that is every row."""
    n = logits.shape[0]
    keep = max(1, min(n, int(fraction * n)))
    if keep == n:
        return None
    return entropy(logits.detach()).argsort()[:keep]


def confident(logits: torch.Tensor, fraction: float) -> torch.Tensor:
    """The rows with the lowest entropy (see `confident_rows`)."""
    rows = confident_rows(logits, fraction)
    return logits if rows is None else logits[rows]


def marginal_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the rows' averaged probability (computed in log space)."""
    logp = F.log_softmax(logits, dim=-1)
    mean_logp = torch.logsumexp(logp, dim=0) - math.log(logits.shape[0])
    return -(mean_logp.exp() * mean_logp).sum()


def online_loss(
    logits: torch.Tensor, start_logits: torch.Tensor, settings: TTASettings, running: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The online objective and the updated running mean prediction."""
    kept = confident(logits, settings.effective_confident_fraction)
    loss = entropy(kept).mean()
    batch_mean = logits.softmax(dim=-1).mean(dim=0)
    m = settings.diversity_momentum if running is not None else 0.0  # 0: SHOT's batch-mean marginal
    marginal = m * (running if running is not None else 0) + (1 - m) * batch_mean
    if settings.diversity_weight:
        loss = loss + settings.diversity_weight * (marginal * marginal.clamp_min(1e-12).log()).sum()
    if settings.anchor_weight:
        start = F.log_softmax(start_logits, dim=-1)
        loss = loss + settings.anchor_weight * F.kl_div(
            F.log_softmax(logits, dim=-1), start, log_target=True, reduction="batchmean"
        )
    return loss, marginal.detach()
