"""Plugin input found by the edge-case suite (docs/plugins.md: a conflict is never silent)."""

from __future__ import annotations

import warnings

import torch

import policyinject as pi
from policyinject import PluginManager, Policy, hookimpl


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(8, 32)
        self.down = torch.nn.Linear(32, 8)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


class RegistersTwice:
    @hookimpl
    def policyinject_register_policies(self, register):
        register(Policy(layer=Block, styles={"up": "column", "down": "row"}))
        register(Policy(layer=Block, styles={"up": "row", "down": "column"}))


def test_one_plugin_registering_two_policies_for_one_class_is_not_silent():
    pm = PluginManager.empty()
    pm.register(RegistersTwice, name="twice")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            pi.plan_inference(torch.nn.Sequential(Block()), dtype="fp32", plugins=pm,
                              tensor_parallel={"tp_size": 2})
        except pi.PluginError as exc:
            assert "Block" in str(exc)
            return
    assert any("Block" in str(w.message) for w in caught)
