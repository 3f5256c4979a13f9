"""ShardDataset's order: a DataLoader (any batch size, workers) and plain iteration read the selected
records in `indices`' order; the dataset never shuffles or reorders on its own (issue 17, item 12)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch.utils.data

from cogalign.errors import CogalignError
from cogalign.train.data import ShardDataset


@pytest.fixture()
def out(tmp_path):
    """A bare data/ folder of two JSON-lines shards (5 + 4 text-only records)."""
    data = tmp_path / "out" / "data"
    data.mkdir(parents=True)
    for shard, ids in enumerate([range(0, 5), range(5, 9)]):
        rows = [json.dumps({"id": f"r{i}", "conversations": [{"from": "human", "value": "hi"}]}) for i in ids]
        (data / f"part-{shard:05d}.jsonl").write_text("\n".join(rows) + "\n")
    return tmp_path / "out"


def _ids(items):
    return [it["record"]["id"] for it in items]


@pytest.mark.parametrize("workers", [0, 2])
def test_dataloader_keeps_the_order_at_any_batch_size(out, workers):
    indices = np.array([7, 2, 8, 0, 5, 1, 3])  # a held-out split is not sorted
    ds = ShardDataset(out, load_images=False, indices=indices)
    expected = [f"r{i}" for i in indices]
    assert _ids(ds) == expected == _ids(ds[k] for k in range(len(ds)))
    for batch_size in (1, 2, 3):
        loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=list)
        assert _ids(it for batch in loader for it in batch) == expected


def test_the_dataset_refuses_to_shuffle_and_to_batch(out):
    with pytest.raises(CogalignError, match="EpochSampler"):
        ShardDataset(out, load_images=False, shuffle=True)  # it was accepted and ignored
    with pytest.raises(TypeError):
        ShardDataset(out, load_images=False, batch_size=2)  # batching is the DataLoader's
