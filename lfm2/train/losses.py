"""The objectives of fine-tuning beyond next-token cross-entropy: DPO and top-K distillation.

Both work on plain tensors, so they are tested against direct computations on small inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each row's target tokens (-100 ignored), and their count.

    logits (N, V) at the target positions only, in row-major order (`model(x, logits_at=targets !=
    -100)`: a response is a fraction of its row, and the head over every position was a quarter of
    a fine-tuning step); targets (B, T) -> (B,), (B,). Computed in float32.
    """
    mask = targets != -100
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, targets[mask][:, None])[:, 0]
    rows = mask.nonzero()[:, 0]
    sums = torch.zeros(targets.shape[0], dtype=picked.dtype, device=picked.device).index_add(0, rows, picked)
    return sums, mask.sum(-1)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    len_chosen: torch.Tensor,
    len_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Length-normalized DPO: per pair, -log sigmoid(r_chosen - r_rejected).

    Each response's implicit reward is `beta * (log pi(y|x) - log pi_ref(y|x)) / |y|`: dividing by
    the response's length in tokens removes DPO's pull towards longer answers (the LFM2 report's
    "length-normalized preference optimization"). All inputs are (B,) summed log-probabilities
    and token counts. Returns the per-pair losses and the two rewards (for accuracy and margin).
    """
    r_chosen = beta * (policy_chosen - ref_chosen) / len_chosen.clamp(min=1)
    r_rejected = beta * (policy_rejected - ref_rejected) / len_rejected.clamp(min=1)
    return -F.logsigmoid(r_chosen - r_rejected), r_chosen.detach(), r_rejected.detach()


def topk_distill_loss(
    student_logits: torch.Tensor, teacher_logps: torch.Tensor, teacher_ids: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Tempered, decoupled top-K distillation loss at each position.

    student_logits (N, V); teacher_logps (N, K) the teacher's log-probabilities (temperature 1)
    of its top-K tokens `teacher_ids` (N, K). With S the top-K set, P the teacher and Q the student:
    - a binary term KL(Bern(P(S)) || Bern(Q(S))): how much mass each puts on S versus the rest,
      so the student learns the teacher's confidence without needing its tail;
    - a term KL(P_S^tau || Q_S^tau) between the two distributions renormalized over S, each
      softened by the temperature tau (and scaled by tau^2, so its gradients keep their size
      as tau changes); the temperature touches this term only.
    Only the teacher's top-K is ever needed, so it can be stored; the student's argmax may lie
    outside S, which the binary term then penalises. Returns (N,) losses.
    """
    s_logp = torch.log_softmax(student_logits.float(), dim=-1)
    s_top = s_logp.gather(-1, teacher_ids)  # (N, K) student log-probs on the teacher's set
    t_top = teacher_logps.float()
    p_s = t_top.exp().sum(-1).clamp(max=1.0)
    log_q_s = torch.logsumexp(s_top, dim=-1)
    log_p_s = torch.log(p_s.clamp(min=1e-12))
    log_p_rest = torch.log1p(-p_s.clamp(max=1 - 1e-7))
    log_q_rest = torch.log1p(-log_q_s.exp().clamp(max=1 - 1e-7))
    binary = p_s * (log_p_s - log_q_s) + (1 - p_s) * (log_p_rest - log_q_rest)
    t_in = torch.log_softmax(t_top / temperature, dim=-1)
    s_in = torch.log_softmax(s_top / temperature, dim=-1)
    inside = (t_in.exp() * (t_in - s_in)).sum(-1) * temperature**2
    return binary + inside
