"""config_fingerprint / diff_fingerprints: what tensor-parallel ranks compare."""

import subprocess
import sys

import torch

from policyinject.config import PER_RANK_KEYS, config_fingerprint, diff_fingerprints, load_config
from policyinject.config.keys import KEYS
from policyinject.policy import Policy


def fp(**kwargs):
    return config_fingerprint(load_config(**kwargs))


def test_every_key_but_the_per_rank_paths_is_fingerprinted():
    leaves = {s.path for s in KEYS if s.field and not s.section}
    assert set(fp()) == leaves - PER_RANK_KEYS
    assert all(len(v) == 16 for v in fp().values())


def test_differences_are_named_by_dotted_key():
    a = fp(tp={"tp_size": 2, "tp_grain_size": 64}, dtype="bf16")
    b = fp(tensor_parallel={"tp_size": 2, "tp_grain_size": 32}, dtype="bfloat16", quant={"weight": {"num_bits": 4}})
    assert diff_fingerprints(a, b) == ["quant.weight.num_bits", "tensor_parallel.tp_grain_size"]
    assert diff_fingerprints(a, a) == []


def test_paths_that_may_differ_per_node_are_left_out():
    a = fp(base_dir="/node0/ckpt", checkpoint="/node0/ckpt/desc.json", save_mp_checkpoint_path="/n0")
    b = fp(base_dir="/node1/ckpt", checkpoint="/node1/other/desc.json", save_mp_checkpoint_path="/n1")
    assert diff_fingerprints(a, b) == []
    c = fp(checkpoint={"type": "ds_model", "checkpoints": ["/n0/a.pt"], "base_dir": "/n0"})
    d = fp(checkpoint={"type": "ds_model", "checkpoints": ["/n1/a.pt"], "base_dir": "/n1"})
    e = fp(checkpoint={"type": "ds_model", "checkpoints": ["/n1/b.pt"], "base_dir": "/n1"})
    assert diff_fingerprints(c, d) == [] and diff_fingerprints(c, e) == ["checkpoint"]


def test_live_objects_compare_by_presence_and_type():
    class Mpu:
        def get_model_parallel_group(self):
            return None

    assert diff_fingerprints(fp(tp={"mpu": Mpu()}), fp(tp={"mpu": Mpu()})) == []
    assert diff_fingerprints(fp(tp={"mpu": Mpu()}), fp()) == ["tensor_parallel.mpu"]


def test_policies_and_names():
    policy = Policy("pkg.Block", styles={"fc": "row"})
    same = Policy("pkg.Block", styles={"fc": "row"})
    assert diff_fingerprints(fp(injection_policy={"pkg.Block": policy}),
                             fp(injection_policy={"pkg.Block": same})) == []
    assert diff_fingerprints(fp(injection_policy={"pkg.Block": "fc"}),
                             fp(injection_policy={"pkg.Block": ("fc", "x")})) == ["injection_policy"]


def test_stable_across_processes():
    code = ("from policyinject.config import load_config, config_fingerprint;"
            "print(sorted(config_fingerprint(load_config(tp={'tp_size': 2}, zero={'b': 1, 'a': [1.5, None]},"
            "injection_policy={'torch.nn.Linear': 'x'})).items()))")
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": seed, "PATH": ""}).stdout for seed in ("1", "2")}
    assert len(runs) == 1
    here = sorted(fp(tp={"tp_size": 2}, zero={"a": [1.5, None], "b": 1},
                     injection_policy={"torch.nn.Linear": "x"}).items())
    assert runs == {str(here) + "\n"}
