import pytest

from lemb.stages.reward import build_pool, rank_of_target, rank_reward, reward_from_logprobs


def test_pool_drops_empty_and_copies_of_target_and_counts_multiplicity():
    samples, counts, dropped = build_pool(["Quelm", " quelm ", "", "  ", "Plok", "plok", "Vantra"], target="QUELM")
    assert samples == ["Plok", "Vantra"]
    assert counts == [2, 1]
    assert dropped == {"empty": 2, "equal_to_target": 2}


def test_rank_counts_above_and_half_credit_for_ties():
    # target -1.0; samples: -0.5 (x2, above), -1.0 (tied), -2.0 (below)
    rank = rank_of_target(-1.0, [-0.5, -1.0, -2.0], [2, 1, 1])
    assert rank == 1 + 2 + 0.5
    # N = 4: reward = (4 + 1 - 3.5) / 4
    assert rank_reward(rank, 4) == pytest.approx(0.375)


def test_reward_extremes_and_single_sample():
    assert rank_reward(rank_of_target(0.0, [-1.0, -2.0], [1, 1]), 2) == 1.0  # beats every sample
    assert rank_reward(rank_of_target(-3.0, [-1.0, -2.0], [1, 1]), 2) == 0.0  # every sample beats it
    # N = 1: tie gives half credit
    assert rank_reward(rank_of_target(-1.0, [-1.0], [1]), 1) == 0.5


def test_all_equal_scores_give_the_middle_reward():
    rank = rank_of_target(-1.0, [-1.0, -1.0, -1.0], [1, 1, 1])
    assert rank == 2.5
    assert rank_reward(rank, 3) == pytest.approx(0.5)


def test_rank_reward_needs_samples():
    with pytest.raises(ValueError):
        rank_reward(1.0, 0)


def test_rescored_kinds():
    kw = dict(
        sample_logprobs=[-0.5, -2.0],
        counts=[1, 1],
        baseline_target_logprob=-3.0,
        baseline_sample_logprobs=[-0.5, -2.0],
    )
    assert reward_from_logprobs("likelihood", -1.0, **kw) == -1.0
    assert reward_from_logprobs("rank", -1.0, **kw) == pytest.approx(0.5)  # rank 2 of N=2
    assert reward_from_logprobs("improvement", -1.0, **kw) == 1.0  # baseline rank 3 -> rank 2
    with pytest.raises(ValueError, match="unknown reward"):
        reward_from_logprobs("bogus", -1.0, **kw)
