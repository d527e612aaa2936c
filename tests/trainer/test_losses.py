import math

import pytest
import torch
import torch.nn.functional as F

from lemb.trainer.losses import contrastive_loss, graded_loss, kl_loss


def _cos(a, b):
    return float(F.cosine_similarity(a, b, dim=0))


def graded_reference(q, k, r, valid, tau, alpha, in_batch):
    """The formula of DESIGN.md written as plain loops."""
    B, M, _ = k.shape
    total = 0.0
    for i in range(B):
        idx = [m for m in range(M) if valid[i, m]]
        ws = [math.exp(r[i, m] / alpha) for m in idx]
        z = sum(ws)
        loss_i = 0.0
        for w, m in zip(ws, idx):
            s_m = math.exp(_cos(q[i], k[i, m]) / tau)
            den = s_m + sum(math.exp(_cos(q[i], k[i, j]) / tau) for j in idx if r[i, j] < r[i, m])
            if in_batch:
                den += sum(
                    math.exp(_cos(q[i], k[o, j]) / tau) for o in range(B) if o != i for j in range(M) if valid[o, j]
                )
            loss_i -= (w / z) * math.log(s_m / den)
        total += loss_i
    return total / B


@pytest.mark.parametrize("in_batch", [True, False])
def test_graded_matches_reference_with_ties_and_padding(in_batch):
    torch.manual_seed(0)
    q, k = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 4, 5, dtype=torch.float64)
    r = torch.tensor([[1.0, 0.5, 0.5, 0.0], [0.25, 0.25, 0.25, 0.25], [0.75, 0.0, 1.0, 0.3]], dtype=torch.float64)
    valid = torch.tensor([[True, True, True, True], [True, True, True, False], [True, True, True, True]])
    got = graded_loss(q, k, r, valid, tau=0.5, alpha=0.3, in_batch=in_batch)
    want = graded_reference(q, k, r, valid, 0.5, 0.3, in_batch)
    torch.testing.assert_close(got.item(), want, rtol=1e-9, atol=1e-9)


def test_graded_all_tied_without_in_batch_is_zero():
    # every candidate's denominator holds only itself: log(1) = 0
    q, k = torch.randn(2, 4), torch.randn(2, 3, 4)
    r = torch.full((2, 3), 0.5)
    loss = graded_loss(q, k, r, torch.ones(2, 3, dtype=torch.bool), tau=0.05, alpha=0.1, in_batch=False)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_graded_one_candidate_is_contrastive_against_in_batch_keys():
    torch.manual_seed(1)
    q, k = torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 1, 4, dtype=torch.float64)
    r = torch.tensor([[0.3], [0.9]], dtype=torch.float64)
    got = graded_loss(q, k, r, torch.ones(2, 1, dtype=torch.bool), tau=1.0, alpha=1.0, in_batch=True)
    s = F.normalize(q, dim=-1) @ F.normalize(k[:, 0], dim=-1).T
    want = -(torch.log_softmax(s, dim=-1).diagonal()).mean()
    torch.testing.assert_close(got, want)


def test_graded_gradient_pushes_high_reward_candidate_up():
    torch.manual_seed(2)
    q = torch.randn(1, 8, requires_grad=True)
    k = torch.randn(1, 3, 8)
    r = torch.tensor([[1.0, 0.0, 0.0]])
    opt = torch.optim.SGD([q], lr=0.5)
    before = F.cosine_similarity(q, k[0, 0:1]).item()
    for _ in range(20):
        opt.zero_grad()
        graded_loss(q, k, r, torch.ones(1, 3, dtype=torch.bool), tau=0.1, alpha=0.1, in_batch=False).backward()
        opt.step()
    assert F.cosine_similarity(q, k[0, 0:1]).item() > before


def test_kl_matches_reference():
    torch.manual_seed(3)
    q, k = torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)
    r = torch.tensor([[1.0, 0.5, 0.0], [0.2, 0.2, 0.9]], dtype=torch.float64)
    valid = torch.ones(2, 3, dtype=torch.bool)
    got = kl_loss(q, k, r, valid, tau=0.5, alpha=0.25)
    want = 0.0
    for i in range(2):
        p = torch.softmax(r[i] / 0.25, -1)
        s = torch.tensor([_cos(q[i], k[i, m]) / 0.5 for m in range(3)], dtype=torch.float64)
        want += float((p * (p.log() - torch.log_softmax(s, -1))).sum())
    torch.testing.assert_close(got.item(), want / 2)


def test_contrastive_matches_reference():
    torch.manual_seed(4)
    q, k = torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)
    pos = torch.tensor([[True, False, False], [False, True, True]])
    valid = torch.ones(2, 3, dtype=torch.bool)
    got = contrastive_loss(q, k, pos, valid, tau=0.5, in_batch=True)
    want = 0.0
    for i in range(2):
        neg = [math.exp(_cos(q[i], k[i, m]) / 0.5) for m in range(3) if not pos[i, m]]
        neg += [math.exp(_cos(q[i], k[o, m]) / 0.5) for o in range(2) if o != i for m in range(3)]
        terms = []
        for m in range(3):
            if pos[i, m]:
                s = math.exp(_cos(q[i], k[i, m]) / 0.5)
                terms.append(-math.log(s / (s + sum(neg))))
        want += sum(terms) / len(terms)
    torch.testing.assert_close(got.item(), want / 2)
