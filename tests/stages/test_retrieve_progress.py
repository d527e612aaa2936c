"""retrieve's keys bar moves inside a shard: the keys are embedded in blocks of similar length, each reported as it
ends, and the embeddings are those of one call over all the keys."""

import numpy as np
import pyarrow as pa
import pytest

from lemb.data import schemas
from lemb.pipeline.config import RetrieveConfig, load_config
from lemb.stages.instructions import resolve_instructions
from lemb.stages.retrieve import ENCODE_BLOCK, EmbedKeys


@pytest.mark.slow
def test_keys_are_reported_block_by_block_and_embed_as_one_call(tmp_path):
    config = load_config(RetrieveConfig, queries="unused.jsonl", max_length=32, executor="local")
    stage = EmbedKeys(config, resolve_instructions("none", config.embedder), identity={})
    stage.setup()
    reports: list[float] = []
    stage._advance = reports.append
    n = ENCODE_BLOCK * 2 + 37
    texts = [f"passage {i}: " + "word " * (i % 23) for i in range(n)]  # lengths mixed, not sorted
    table = pa.Table.from_pylist(
        [{"key_id": f"k{i}", "task": "qa", "text": t, "title": None} for i, t in enumerate(texts)],
        schema=schemas.KEY,
    )
    out = stage.process(table)
    assert reports == [ENCODE_BLOCK, ENCODE_BLOCK, 37]
    assert out.column("key_id").to_pylist() == [f"k{i}" for i in range(n)]  # the shard's order, not the blocks'
    got = np.array(out.column("embedding").to_pylist(), dtype=np.float32)
    whole = stage.encoder.encode(texts, "")
    np.testing.assert_allclose(got, whole, atol=1e-5)
