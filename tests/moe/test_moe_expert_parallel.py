"""Expert parallelism on CPU: 2 gloo ranks, each holding half the experts, against the unsharded block."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from moe_workers import run_ranks  # noqa: E402

from policyinject.errors import PolicyError  # noqa: E402
from policyinject.modules.moe_parallel import expert_range  # noqa: E402

TASKS = [
    ("ep_block", dict(family="mixtral", tokens="replicated", dispatch="grouped")),
    ("ep_block", dict(family="mixtral", tokens="sharded", dispatch="dense")),
    ("ep_block", dict(family="qwen2_moe", tokens="sharded", dispatch="grouped")),
    ("ep_block", dict(family="gpt_oss", tokens="replicated", dispatch="dense")),
    ("ep_model", dict(family="mixtral")),
    ("ep_model", dict(family="qwen3_moe")),
]


@pytest.fixture(scope="module")
def results() -> list:
    return run_ranks(2, TASKS)


@pytest.mark.parametrize("index", range(len(TASKS)), ids=[f"{n}-{'-'.join(map(str, k.values()))}" for n, k in TASKS])
def test_ep2_equals_unsharded(results: list, index: int) -> None:
    name, _ = TASKS[index]
    per_rank = [r[index] for r in results]
    for rank, res in enumerate(per_rank):
        assert "error" not in res, res.get("error")
        assert res["err"] <= 1e-6, (rank, res)
        if name == "ep_block":
            assert res["finite"] and res["err_hf"] <= 1e-5
            assert res["local"] == [2 * rank, 2 * rank + 2] and res["w13"][0] == 2
        else:
            assert res["greedy_equal"]


def test_expert_range_errors() -> None:
    assert [expert_range(128, 8, r) for r in (0, 7)] == [(0, 16), (112, 128)]
    with pytest.raises(PolicyError, match="ep_size 3"):
        expert_range(8, 3, 0)
    with pytest.raises(PolicyError, match="rank 2"):
        expert_range(8, 2, 2)
