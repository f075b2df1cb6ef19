"""The pure split arithmetic: head-aligned splits, KV replication, grain splits (exhaustive + hypothesis)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policyinject.tp_split import (SplitError, head_rows, offsets, runs, shard_range, split_heads, split_sizes,
                                   valid_head_tp_sizes)


def test_smollm2_shapes():
    two = split_heads(9, 3, 2)
    assert [s.num_kv_heads for s in two] == [2, 1]
    assert [s.num_heads for s in two] == [6, 3]
    three = split_heads(9, 3, 3)
    assert [s.q_heads for s in three] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    with pytest.raises(SplitError) as err:
        split_heads(9, 3, 4, where="model.layers.0")
    msg = str(err.value)
    assert "model.layers.0" in msg and "tp_size=4" in msg and "valid tp sizes" in msg and "1, 2, 3, 9" in msg


def test_replication_llama8b_and_mqa():
    # Llama-3-8B: 32 q / 8 kv heads; tp=16 replicates each kv head on 2 ranks, 2 q heads each
    s = split_heads(32, 8, 16)
    assert all(x.num_kv_heads == 1 and x.num_heads == 2 and x.kv_replicas == 2 for x in s)
    assert [x.kv_heads[0] for x in s] == [i // 2 for i in range(16)]
    # multi-query (Falcon-7B): 1 kv head on every rank
    assert [x.kv_heads for x in split_heads(4, 1, 4)] == [[0]] * 4
    # MHA cannot replicate: one q head per kv head
    with pytest.raises(SplitError):
        split_heads(4, 4, 8)


def test_deepspeed_examples():
    assert split_sizes(50257, 2, grain=64) == [25152, 25105]
    assert split_sizes(101, 2, grain=128) == [51, 50]
    # DeepSpeed 3.3 head-aligned example: 6 kv heads over 4 ranks split 384 into [128, 128, 64, 64]
    assert [s.num_kv_heads * 64 for s in split_heads(6, 6, 4)] == [128, 128, 64, 64]
    with pytest.raises(SplitError, match="a rank would get none"):
        split_sizes(3, 4, where="mlp.fc1")


def test_helpers():
    assert offsets([3, 2, 2]) == [0, 3, 5]
    assert shard_range(10, 3, 1) == range(4, 7)
    assert head_rows([0, 2], 3) == [0, 1, 2, 6, 7, 8]
    assert runs([5, 6, 7, 9]) == [(5, 3), (9, 1)]
    assert valid_head_tp_sizes(4, 2, limit=8) == [1, 2, 4]


@settings(max_examples=300, deadline=None)
@given(kv=st.integers(1, 16), per=st.integers(1, 8), tp=st.integers(1, 40))
def test_heads_property(kv, per, tp):
    heads = kv * per
    try:
        shards = split_heads(heads, kv, tp)
    except SplitError:
        assert tp not in valid_head_tp_sizes(heads, kv, limit=tp)
        return
    assert len(shards) == tp
    # every query head is held by exactly one rank
    assert sorted(h for s in shards for h in s.q_heads) == list(range(heads))
    for s in shards:
        assert s.num_heads >= 1 and s.num_kv_heads >= 1
        # every rank holds the kv heads its query heads need, and nothing more
        assert sorted({h // per for h in s.q_heads}) == s.kv_heads
        assert s.num_heads % s.num_kv_heads == 0
    # every kv head is held somewhere; replicas only when tp > kv
    held = [h for s in shards for h in s.kv_heads]
    assert set(held) == set(range(kv))
    assert (len(held) > kv) == (tp > kv)


@settings(max_examples=300, deadline=None)
@given(total=st.integers(1, 5000), tp=st.integers(1, 16), grain=st.integers(1, 256))
def test_grain_property(total, tp, grain):
    if total < tp:
        with pytest.raises(SplitError):
            split_sizes(total, tp, grain)
        return
    sizes = split_sizes(total, tp, grain)
    assert sum(sizes) == total and len(sizes) == tp and min(sizes) >= 1
    if total >= grain * tp:
        # whole grains on every rank but the last, which takes the sub-grain tail
        assert all(s % grain == 0 for s in sizes[:-1])
        assert tp == 1 or max(sizes[:-1]) - min(sizes[:-1]) <= grain
    ranges = [shard_range(total, tp, r, grain) for r in range(tp)]
    assert [i for r in ranges for i in r] == list(range(total))
