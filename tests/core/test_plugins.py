"""The plugin manager: inline plugins (the pluggy way), entry points, disabling, broken plugins."""

from __future__ import annotations


import pytest
import torch

from policyinject import hookimpl
from policyinject.errors import PluginError
from policyinject import PluginConflictWarning, PluginManager
from policyinject._plugin_manager import disabled_names
from policyinject.policy import ModelPolicy, Policy


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(2, 2)


def make_plugin(*objs):
    class Plugin:
        @staticmethod
        @hookimpl
        def policyinject_register_policies(register):
            for obj in objs:
                register(obj)

    return Plugin


def test_inline_plugin_registers_and_unregisters():
    pm = PluginManager.empty()
    pm.register(make_plugin(Policy(Block, styles={"fc": "row"}), ModelPolicy("x.Model", layers="layers")), "inline")
    collected = pm.collect()
    assert [p.layer_name for p in collected.layer_policies] == ["Block"]
    assert [p.model_name for p in collected.model_policies] == ["Model"]
    assert collected.layer_policies[0].source == "plugin inline"
    pm.unregister("inline")
    assert pm.collect().layer_policies == ()


def test_registering_something_else_names_the_plugin():
    pm = PluginManager.empty()
    pm.register(make_plugin("not a policy"), "badplugin")
    with pytest.raises(PluginError, match="badplugin"):
        pm.collect()


def test_plugin_that_raises_is_named():
    class Broken:
        @staticmethod
        @hookimpl
        def policyinject_register_policies(register):
            raise RuntimeError("boom")

    pm = PluginManager.empty()
    pm.register(Broken, "broken")
    with pytest.raises(PluginError, match=r"broken.*boom"):
        pm.collect()


def test_entry_points_load_builtins_and_the_example_plugin():
    pm = PluginManager.default(environ={})
    infos = {i.name: i for i in pm.plugins()}
    assert "toy" in infos, "the example plugin package is installed by the test setup"
    assert infos["toy"].key == "policyinject-example-plugin:toy" and infos["toy"].origin == "third-party"
    toy = infos["toy"]
    assert toy.distribution == "policyinject-example-plugin" and not toy.builtin
    assert "layer ToyBlock" in toy.registers
    builtins = [i for i in infos.values() if i.builtin]
    assert builtins, "built-in plugins come through the same entry-point group"
    assert all(i.distribution == "policyinject" for i in builtins)


def test_disable_by_name_external_and_all():
    assert "toy" not in {i.name for i in PluginManager.default({"POLICYINJECT_DISABLE_PLUGINS": "toy"}).plugins()}
    external_off = PluginManager.default({"POLICYINJECT_DISABLE_PLUGINS": "external"}).plugins()
    assert external_off and all(i.builtin for i in external_off)
    assert PluginManager.default({"POLICYINJECT_DISABLE_PLUGINS": "all"}).plugins() == []
    assert disabled_names({"POLICYINJECT_DISABLE_PLUGINS": " a,,b "}) == {"a", "b"}


def test_broken_entry_point_names_plugin_and_distribution(monkeypatch):
    from policyinject import _plugin_manager as plugins_module

    class FakeEP:
        name = "exploding"
        value = "no_such_module_xyz.plugin"

        def load(self):
            raise ImportError("No module named 'no_such_module_xyz'")

    monkeypatch.setattr(plugins_module, "_entry_points", lambda: iter([(FakeEP(), "exploding-dist", "9.9")]))
    with pytest.raises(PluginError) as info:
        PluginManager.default(environ={})
    assert "exploding" in str(info.value) and "exploding-dist" in str(info.value)


def test_select_policy_hook_breaks_ties():
    first = Policy(Block, styles={"fc": "row"})
    second = Policy(Block, styles={"fc": "column"})

    class Chooser:
        @staticmethod
        @hookimpl
        def policyinject_select_policy(module, path, candidates):
            return candidates[-1]

    pm = PluginManager.empty()
    pm.register(make_plugin(first, second), "two")
    pm.register(Chooser, "chooser")
    from policyinject.policy.matching import match_layers

    model = torch.nn.ModuleList([Block()])
    with pytest.warns(PluginConflictWarning, match="unless a policyinject_select_policy hook picks another per "
                      r"module \(plugins with one: 'chooser'"):
        collected = pm.collect()  # 'two' registers two policies for Block without choosing itself
    result = match_layers(model, user=[], plugins=list(collected.layer_policies), select=pm.select_policy)
    assert result.layers[0].policy.styles == second.styles
