"""CUDA graphs holding NCCL collectives, on one GPU: a single-process NCCL group (world size 1).

The 2-GPU comparison of graphed and eager tensor-parallel greedy tokens is
``tests/tp/test_rank_agreement.py::test_graphed_tp_decode_gives_the_eager_tp_tokens_on_two_gpus``.
"""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.fixture()
def nccl_world_one(tmp_path):
    import torch.distributed as dist

    os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    torch.cuda.set_device(0)
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def test_graph_cache_captures_and_replays_an_nccl_all_reduce(nccl_world_one):
    import torch.distributed as dist

    from policyinject.decode.graphs import GraphCache

    x = torch.arange(8, device="cuda", dtype=torch.float32)
    out = torch.zeros_like(x)

    def step() -> None:
        y = x * 2
        dist.all_reduce(y, group=nccl_world_one)
        out.copy_(y)

    dist.all_reduce(x.clone(), group=nccl_world_one)  # the communicator exists before capture, as after a prefill
    cache = GraphCache(capacity=2, collectives=True)
    cache.run("k", step, lambda: (lambda: None))
    torch.cuda.synchronize()
    assert torch.equal(out, x * 2) and cache.stats["captures"] == 1
    x.copy_(torch.full_like(x, 3.0))
    cache.run("k", step, lambda: (lambda: None))  # replay reads the new x
    torch.cuda.synchronize()
    assert torch.equal(out, torch.full_like(x, 6.0)) and cache.stats["replays"] == 2


def test_graphed_decode_with_an_nccl_group_matches_eager(nccl_world_one):
    from policyinject.decode.generate import Decoder
    from policyinject.decode.graphs import GraphCache
    from policyinject.pipeline import init_inference
    from policyinject.testing.presets import tiny_model

    torch.manual_seed(0)
    model = tiny_model("llama")
    ids = torch.randint(3, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1)).cuda()
    # tp_size 1 with an initialised NCCL default group and that group given: the rank announces itself through
    # the group's store, and graphs are captured while the NCCL group (and its watchdog thread) is alive
    engine = init_inference(model, dtype="bf16", replace_with_kernel_inject=True, enable_cuda_graph=True,
                            max_out_tokens=64, tensor_parallel={"tp_size": 1, "tp_group": nccl_world_one})
    graphed = engine.generate(ids, max_new_tokens=12)
    eager = Decoder.from_engine(engine, use_graphs=False).generate(ids, max_new_tokens=12)
    assert torch.equal(graphed, eager)
    assert engine._get_decoder().stats["captures"] >= 1
    # the capture path tensor parallelism uses (device synchronised, thread_local capture mode)
    tp_path = Decoder.from_engine(engine, use_graphs=True)
    tp_path.graphs = GraphCache(4, collectives=True)
    assert torch.equal(tp_path.generate(ids, max_new_tokens=12), eager)
    assert tp_path.stats["captures"] >= 1
