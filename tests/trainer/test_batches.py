import pyarrow as pa
import pytest

from lemb.data import schemas
from lemb.errors import InputError, LembError
from lemb.trainer.batches import Group, TaskBatchSampler, build_groups, collate


def _groups():
    tasks = ["qa"] * 10 + ["tool"] * 3 + ["chat"] * 5
    return [
        Group(f"q{i}", t, f"text {i}", ["a", "b"], [f"k{i}", "shared"], [1.0, 0.0], [True, False])
        for i, t in enumerate(tasks)
    ]


def test_batches_are_homogeneous_deterministic_and_cover_each_task():
    groups = _groups()
    sampler = TaskBatchSampler([g.task for g in groups], batch_size=4, weights=None, seed=7)
    batches = [sampler.batch(s) for s in range(60)]
    for b in batches:
        assert len({groups[i].task for i in b}) == 1
        assert len(set(b)) == len(b)
    # a fresh sampler asked for a late step first (a resumed run) gives the same batch
    assert TaskBatchSampler([g.task for g in groups], 4, None, 7).batch(59) == batches[59]
    # every epoch of a task draws each of its queries exactly once (10 qa queries, batches of 4)
    seen_qa = [i for b in batches for i in b if groups[i].task == "qa"]
    qa = sorted(i for i, g in enumerate(groups) if g.task == "qa")
    for epoch in range(len(seen_qa) // 10):
        assert sorted(seen_qa[epoch * 10 : (epoch + 1) * 10]) == qa
    # tool has 3 queries: its batches are never padded with repeats
    assert all(len(b) == 3 for b in batches if groups[b[0]].task == "tool")


def test_task_weights_select_tasks_and_warn_about_left_out_ones(caplog):
    with caplog.at_level("WARNING"):
        sampler = TaskBatchSampler([g.task for g in _groups()], 2, weights={"tool": 1.0}, seed=0)
    assert all(_groups()[sampler.batch(s)[0]].task == "tool" for s in range(20))
    assert "chat, qa" in caplog.text
    with pytest.raises(LembError, match="no weight to any task"):
        TaskBatchSampler([g.task for g in _groups()], 2, weights={"icl": 1.0}, seed=0)


def test_collate_pads_and_masks_shared_keys():
    g = _groups()[:2]
    g[1] = Group("q1", "qa", "t", ["x"], ["shared"], [0.5], [False])
    data = collate(g, group_size=3)
    assert data["valid"].tolist() == [[True, True, False], [True, False, False]]
    assert data["rewards"][0].tolist() == [1.0, 0.0, 0.0]
    # query 0 must not see query 1's "shared" key as an in-batch negative: it is one of its own candidates
    assert data["in_batch_mask"][0].tolist() == [False, False, False, False, False, False]
    assert data["in_batch_mask"][1].tolist() == [True, False, False, False, False, False]


def _reward_rows(rewards, positives=(), texts=None, query_id="q1"):
    rows = []
    for i, (lp, counts) in enumerate(rewards):
        rows.append(
            {name: None for name in schemas.REWARD.names}
            | {
                "query_id": query_id,
                "task": "qa",
                "key_id": f"k{i}",
                "retrieval_rank": i + 1,
                "target_logprob": lp,
                "target_tokens": 2,
                "samples": ["x"],
                "sample_logprobs": [-1.0],
                "sample_counts": counts,
                "baseline_target_logprob": -2.0,
                "baseline_sample_logprobs": [-1.0],
                "pool_size": sum(counts),
                "query_text": "t",
                "target": "x",
                "positive_ids": list(positives),
                "key_text": (texts or "abcdefgh")[i],
            }
        )
    return pa.Table.from_pylist(rows, schema=schemas.REWARD)


def test_build_groups_recomputes_reward_and_rejects_nan():
    groups, skipped = build_groups(
        _reward_rows([(-0.5, [1]), (-3.0, [1])], ["k0"]), "rank", 8, "src", tie_tolerance=1e-6
    )
    assert groups[0].rewards == [1.0, 0.0] and groups[0].positive == [True, False] and not skipped
    assert groups[0].keys == ["a", "b"] and groups[0].query == "t"
    groups, _ = build_groups(
        _reward_rows([(-0.5, [1]), (-3.0, [1])], ["k0"]), "likelihood", 8, "src", tie_tolerance=1e-6
    )
    assert groups[0].rewards == [-0.5, -3.0]
    # a non-finite log-probability is refused under every reward, not only where it would make the reward NaN
    for kind in ("likelihood", "rank", "improvement"):
        with pytest.raises(InputError, match=r"src.*query_id 'q1', key_id 'k0', field 'target_logprob': not a fin"):
            build_groups(_reward_rows([(float("nan"), [1]), (-3.0, [1])], ["k0"]), kind, 8, "src", tie_tolerance=1e-6)
    bad = _reward_rows([(-0.5, [1]), (-3.0, [1])], ["k0"])
    bad = bad.set_column(bad.schema.get_field_index("baseline_target_logprob"), "baseline_target_logprob",
                         pa.array([float("-inf"), -2.0]))  # fmt: skip
    with pytest.raises(InputError, match=r"key_id 'k0', field 'baseline_target_logprob'"):
        build_groups(bad, "rank", 8, "src", tie_tolerance=1e-6)
    _, skipped = build_groups(_reward_rows([(-0.5, [0]), (-3.0, [0])], ["k0"]), "rank", 8, "src", tie_tolerance=1e-6)
    assert skipped == {"no_signal": 1}
    # a contrastive task trains on its positive even without samples
    groups, skipped = build_groups(
        _reward_rows([(-0.5, [0]), (-3.0, [0])], ["k0"]),
        "rank",
        8,
        "src",
        tie_tolerance=1e-6,
        positives_only=frozenset({"qa"}),
    )
    assert len(groups) == 1 and groups[0].positive == [True, False] and not skipped


def test_build_groups_uses_the_label_tie_tolerance():
    rows = _reward_rows([(-1.0005, [1])])  # the sample scores -1.0: above the target by 5e-4
    strict, _ = build_groups(rows, "rank", 8, "src", tie_tolerance=1e-6)
    loose, _ = build_groups(rows, "rank", 8, "src", tie_tolerance=1e-3)
    assert strict[0].rewards == [0.0] and loose[0].rewards == [0.5]


def test_positives_are_kept_when_candidates_exceed_the_group():
    rows = _reward_rows([(-1.0, [1]), (-2.0, [1]), (-0.1, [1])], ["k2"], texts="abc")  # k2 ranked lowest
    groups, skipped = build_groups(rows, "rank", 2, "src", tie_tolerance=1e-6)
    assert groups[0].key_ids == ["k0", "k2"] and groups[0].keys == ["a", "c"] and not skipped


def test_groups_read_from_shards_through_a_mapped_file_equal_the_in_memory_ones(tmp_path):
    shard_a = _reward_rows([(-0.5, [1]), (-3.0, [2]), (-0.7, [1])], ["k1"])
    shard_b = _reward_rows([(-2.0, [1]), (-0.1, [1])], query_id="q2")
    whole, _ = build_groups(pa.concat_tables([shard_a, shard_b]), "rank", 2, "src", tie_tolerance=1e-6)
    mapped, _ = build_groups(
        iter([shard_a, shard_b]), "rank", 2, "src", tie_tolerance=1e-6, texts_file=tmp_path / "t.arrow"
    )
    assert len(mapped) == len(whole) == 2 and mapped.tasks == ["qa", "qa"]
    assert [mapped[i] for i in range(2)] == [whole[i] for i in range(2)]
    assert mapped[0].key_ids == ["k0", "k1"] and mapped[1].keys == ["a", "b"]
    assert (tmp_path / "t.arrow").stat().st_size > 0


def test_the_tie_tolerance_is_read_from_the_label_shard_never_defaulted():
    from lemb.errors import InputError
    from lemb.stages.label import labelled_tie_tolerance

    assert labelled_tie_tolerance({b"lemb.tie_tolerance": b"0.001"}, "part-00000.parquet") == 1e-3
    with pytest.raises(InputError, match="part-00000.parquet: file, field 'lemb.tie_tolerance': missing"):
        labelled_tie_tolerance({b"lemb.llm": b"x"}, "part-00000.parquet")
