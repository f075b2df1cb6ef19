"""Tensor-parallel ranks that disagree, or do not arrive, fail loudly on every rank that can tell.

Real gloo processes (``agree_workers.run_per_rank``): each rank runs its own task list, so one rank can be
given another ``tp_grain_size``, another model, another ``tp_size``, or no ``init_inference`` at all. Also
here: the CUDA-graph rule under tensor parallelism (refused on gloo before any change, accepted on NCCL) and
the collectives of one decode step.
"""

from __future__ import annotations

import pytest
import torch

from agree_workers import run_per_rank

pytestmark = pytest.mark.slow

SHORT = 5.0  # setup_timeout_s of the cases where a rank is missing

# Ranks with a default group already initialised (a user's own init_process_group). The order matters: after
# a rank times out, the group's rounds are out of step, so the missing-rank cases come last.
GROUP_TASKS = [
    [("build", dict(grain=8)), ("build", dict()), ("build", dict(enable_cuda_graph=True, replace_with_kernel_inject=True)),
     ("count_collectives", dict()), ("build", dict(timeout=SHORT)), ("build", dict(tp=2, timeout=SHORT))],
    [("build", dict(grain=16)), ("build", dict(overrides=dict(intermediate_size=96))),
     ("build", dict(enable_cuda_graph=True, replace_with_kernel_inject=True)),
     ("count_collectives", dict()), ("idle", dict()), ("build", dict(tp=1))],
]


@pytest.fixture(scope="module")
def group_results():
    return run_per_rank(GROUP_TASKS, init_group=True)


def _ok(res):
    assert "error" not in res, res.get("traceback", res)


def test_different_grain_size_is_a_config_error_on_every_rank(group_results):
    for rank in (0, 1):
        res = group_results[rank][0]
        assert res["error"] == "ConfigError" and res["untouched"], res
        assert "tensor_parallel.tp_grain_size" in res["problems"]
        assert "rank 0: 8; rank 1: 16" in res["message"]


def test_different_model_shapes_are_a_config_error_naming_the_parameters(group_results):
    for rank in (0, 1):
        res = group_results[rank][1]
        assert res["error"] == "ConfigError" and res["untouched"], res
        assert "param model.layers.0.mlp.up_proj.weight: rank 0: [" in res["message"], res["message"]
        assert "rank 1: [96, " in res["message"]
        assert not [p for p in res["problems"] if p.startswith("tensor_parallel")]


def test_cuda_graphs_with_tp_on_gloo_are_refused_before_any_change(group_results):
    for rank in (0, 1):
        res = group_results[rank][2]
        assert res["error"] == "PlanError" and res["untouched"], res
        assert "needs NCCL on CUDA" in res["message"] and "'gloo'" in res["message"], res["message"]


def test_one_all_reduce_after_attention_and_one_after_the_mlp_per_decode_step(group_results):
    for rank in (0, 1):
        res = group_results[rank][3]
        _ok(res)
        assert res["decoder"] and res["equal"], res  # the decode engine ran the TP model, tokens as unsharded
        layers, hidden, prompt = res["layers"], res["hidden"], res["prompt"]
        steps = res["new_tokens"]  # the prefill, then new_tokens - 1 decode steps
        per_step = 2 * layers + 2  # o_proj and down_proj per layer; the vocab-parallel embedding and head
        assert len(res["calls"]) == steps * per_step, res["calls"]
        decode = res["calls"][per_step:]
        reduces = [c for c in decode if c[0] == "all_reduce"]
        assert len(reduces) == (steps - 1) * (2 * layers + 1)
        assert all(shape == (1, 1, hidden) for _, shape in reduces)  # one token's hidden state each
        assert [c[0] for c in decode].count("all_gather") == steps - 1  # the logits, once per step
        assert sorted({c[0] for c in res["calls"]}) == ["all_gather", "all_reduce"]
        assert res["calls"][0] == ("all_reduce", (1, prompt, hidden))


def test_a_rank_that_never_arrives_is_named_within_the_timeout(group_results):
    res = group_results[0][4]
    assert res["error"] == "RankTimeoutError" and res["missing"] == (1,), res
    assert SHORT <= res["seconds"] < SHORT + 10
    assert "did not arrive: rank 1" in res["message"] and "setup_timeout_s" in res["message"]
    assert res["untouched"]
    assert group_results[1][4] == {"idle": True}


def test_a_different_tp_size_does_not_hang_and_is_named(group_results):
    res = group_results[0][5]
    assert res["error"] == "RankTimeoutError" and res["missing"] == (1,), res
    assert "tensor_parallel.tp_size = 1" in res["message"], res["message"]
    assert res["seconds"] < SHORT + 10
    _ok(group_results[1][5])  # a tp_size=1 rank has nobody to wait for: it builds its own model


# ---------------------------------------------------------------------------- init_inference creates the group
def test_group_created_from_the_torchrun_variables_then_agreement():
    res = run_per_rank([[("build", dict()), ("build", dict(grain=8))],
                        [("build", dict()), ("build", dict(grain=32))]], init_group=False)
    for rank in (0, 1):
        _ok(res[rank][0])
        assert res[rank][1]["error"] == "ConfigError" and "tensor_parallel.tp_grain_size" in res[rank][1]["problems"]


def test_rank_zero_raising_first_does_not_take_the_store_from_a_slow_rank():
    # rank 0 hosts the store and raises at once; rank 1 starts reading 3 s later and must still see the
    # disagreement, not "rank 0 did not arrive" (rank 0 exits right after its task list)
    res = run_per_rank([[("build", dict(grain=8))], [("build", dict(grain=32, read_delay=3.0))]],
                       init_group=False)
    for rank in (0, 1):
        assert res[rank][0]["error"] == "ConfigError", res[rank][0]
        assert "tensor_parallel.tp_grain_size" in res[rank][0]["problems"]


def test_setup_names_the_rank_that_never_came():
    res = run_per_rank([[("build", dict(tp=3, timeout=SHORT))], [("build", dict(tp=3, timeout=SHORT))],
                        [("idle", dict(seconds=SHORT + 3))]], init_group=False)
    for rank in (0, 1):
        r = res[rank][0]
        assert r["error"] == "RankTimeoutError" and r["missing"] == (2,), r
        assert "process-group setup" in r["message"] and "rank 2" in r["message"] and r["untouched"]
        assert r["seconds"] < SHORT + 10


def test_setup_names_rank_zero_when_its_store_never_comes_up():
    res = run_per_rank([[("idle", dict(seconds=1))], [("build", dict(timeout=SHORT))]], init_group=False)
    r = res[1][0]
    assert r["error"] == "RankTimeoutError" and r["missing"] == (0,), r
    assert "hosted by rank 0" in r["message"] and r["seconds"] < SHORT + 15


# ------------------------------------------------------------------------------------------------------ GPUs
@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_graphed_tp_decode_gives_the_eager_tp_tokens_on_two_gpus():
    res = run_per_rank([[("graphs_vs_eager", dict())], [("graphs_vs_eager", dict())]], init_group=True,
                       backend="nccl")
    for rank in (0, 1):
        _ok(res[rank][0])
        assert torch.equal(res[rank][0]["graphed"], res[rank][0]["eager"])
        assert res[rank][0]["stats"]["captures"] >= 1 and res[rank][0]["stats"]["replays"] >= 1
    assert torch.equal(res[0][0]["graphed"], res[1][0]["graphed"])
