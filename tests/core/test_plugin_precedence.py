"""Plugin collection through pluggy (classes with plain methods, tryfirst/trylast) and the documented
precedence when several plugins register a policy for the same class (docs/plugins.md)."""

from __future__ import annotations

import types
import warnings

import pytest
import torch

from policyinject import PluginConflictWarning, PluginError, PluginManager, Policy, hookimpl
from policyinject import _plugin_manager as manager_module
from policyinject.policy import ModelPolicy

BLOCK = "tests.fake.Block"


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(2, 2)


def policy(style: str, layer=BLOCK) -> Policy:
    return Policy(layer, styles={"fc": style})


def plugin_module(name: str, *objs, tryfirst: bool = False, trylast: bool = False) -> types.ModuleType:
    """A module-like plugin, as an entry point's ``load()`` returns."""
    mod = types.ModuleType(name)

    @hookimpl(tryfirst=tryfirst, trylast=trylast)
    def policyinject_register_policies(register):
        for obj in objs:
            register(obj)

    mod.policyinject_register_policies = policyinject_register_policies
    return mod


class FakeEP:
    def __init__(self, name: str, plugin=None, error: Exception | None = None) -> None:
        self.name, self.value, self._plugin, self._error = name, f"fake_{name}.plugin", plugin, error

    def load(self):
        if self._error is not None:
            raise self._error
        return self._plugin


def with_entry_points(monkeypatch, *eps) -> None:
    """Replace entry-point discovery by ``(FakeEP, distribution)`` pairs, in the given (unsorted) order."""
    monkeypatch.setattr(manager_module, "_entry_points", lambda: iter([(ep, dist, "1.0") for ep, dist in eps]))


def collect(pm: PluginManager):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = pm.collect()
    return result, [str(w.message) for w in caught if issubclass(w.category, PluginConflictWarning)]


def chosen(pm: PluginManager, collected) -> Policy:
    candidates = [p for p in collected.layer_policies if p.layer == BLOCK]
    return pm.select_policy(Block(), "0", list(reversed(candidates)))


# ---------------------------------------------------------------------------------------------- collection
def test_a_class_plugin_with_plain_methods_an_instance_and_a_module():
    class WithSelf:
        def __init__(self) -> None:
            self.style = "row"

        @hookimpl
        def policyinject_register_policies(self, register):
            register(policy(self.style))

    pm = PluginManager.empty()
    pm.register(WithSelf, "as-class")
    pm.register(WithSelf(), "as-instance")
    pm.register(plugin_module("as_module", policy("column")), "as-module")
    sources = sorted(p.source for p in pm.collect(warn=False).layer_policies)
    assert sources == ["plugin as-class", "plugin as-instance", "plugin as-module"]


def test_a_class_that_needs_arguments_is_a_plugin_error():
    class NeedsArg:
        def __init__(self, x) -> None:
            self.x = x

    with pytest.raises(PluginError, match="needy.*cannot be instantiated"):
        PluginManager.empty().register(NeedsArg, "needy")


def test_a_misspelled_hook_is_a_plugin_error():
    class Typo:
        @hookimpl
        def policyinject_register_policy(self, register):  # "policies"
            pass

    pm = PluginManager.empty()
    with pytest.raises(PluginError, match="typo"):
        pm.register(Typo, "typo")
    assert pm.plugins() == []


def test_tryfirst_and_trylast_order_the_plugins():
    pm = PluginManager.empty()
    pm.register(plugin_module("first", policy("row"), tryfirst=True), "first")
    pm.register(plugin_module("middle", policy("column")), "middle")
    pm.register(plugin_module("last", policy("replicate"), trylast=True), "last")
    collected, messages = collect(pm)
    assert [p.source for p in collected.layer_policies] == ["plugin first", "plugin middle", "plugin last"]
    assert chosen(pm, collected).source == "plugin first"
    (message,) = messages
    assert "'first'" in message and "wins over" in message and "tryfirst" in message
    assert BLOCK in message and "plugin 'last' (registered in code)" in message
    pm.unregister("first")
    _, messages = collect(pm)
    assert "'middle' (registered in code) wins over plugin 'last'" in messages[0] and "trylast" in messages[0]


def test_without_markers_the_latest_registration_in_code_wins():
    pm = PluginManager.empty()
    pm.register(plugin_module("older", policy("row")), "older")
    pm.register(plugin_module("newer", policy("column")), "newer")
    collected, messages = collect(pm)
    assert chosen(pm, collected).source == "plugin newer"
    assert "registered later" in messages[0]


def test_a_select_hook_still_decides_per_module():
    class Chooser:
        @hookimpl
        def policyinject_select_policy(self, module, path, candidates):
            return candidates[-1]

    pm = PluginManager.empty()
    pm.register(plugin_module("a", policy("row")), "a")
    pm.register(plugin_module("b", policy("column")), "b")
    pm.register(Chooser, "chooser")
    collected, _ = collect(pm)
    assert chosen(pm, collected).source == "plugin a"  # b wins by precedence; the hook picks the other


def test_one_plugin_registering_two_policies_for_a_class_warns_and_its_first_is_used():
    import policyinject as pi

    pm = PluginManager.empty()
    pm.register(plugin_module("twice", Policy(Block, styles={"fc": "row"}), Policy(Block, styles={"fc": "column"}),
                              Policy(Block, styles={"fc": "row"})), "twice")
    collected, messages = collect(pm)
    assert len(messages) == 1 and len(collected.repeated) == 1
    assert f"layer class {Block.__module__}.Block: plugin 'twice' (registered in code) registers 2 different " \
        "policies" in messages[0] and "the first one it registered is used" in messages[0]
    with pytest.warns(PluginConflictWarning, match="plugin 'twice'"):
        plan = pi.plan_inference(torch.nn.Sequential(Block()), dtype="fp32", plugins=pm)
    assert plan.layers[0].policy.styles["fc"].value == "row"


def test_variants_chosen_by_the_plugins_own_select_hook_do_not_warn():
    class Variants:
        @hookimpl
        def policyinject_register_policies(self, register):
            register(policy("row"))
            register(policy("column"))

        @hookimpl
        def policyinject_select_policy(self, module, path, candidates):
            return candidates[-1]

    pm = PluginManager.empty()
    pm.register(Variants, "variants")
    collected, messages = collect(pm)
    assert messages == [] and collected.repeated == ()
    assert PluginManager.default().collect().repeated == ()  # built-in variants (Falcon, Cohere) have a hook


# ---------------------------------------------------------------------------------------------- precedence
def test_an_entry_point_named_like_a_builtin_does_not_replace_it(monkeypatch):
    builtin = FakeEP("llama", plugin_module("builtin_llama", policy("row")))
    third = FakeEP("llama", plugin_module("acme_llama", policy("column")))
    with_entry_points(monkeypatch, (third, "acme-llama"), (builtin, "policyinject"))
    pm = PluginManager.default(environ={})
    infos = {i.key: i for i in pm.plugins()}
    assert set(infos) == {"llama", "acme-llama:llama"}, "both are loaded, under distinct keys"
    assert infos["llama"].builtin and infos["acme-llama:llama"].origin == "third-party"
    collected, messages = collect(pm)
    assert chosen(pm, collected).source == "plugin acme-llama:llama"
    (message,) = messages
    for part in ("'llama' (distribution acme-llama 1.0) wins over", "'llama' (distribution policyinject 1.0)",
                 BLOCK, "third-party plugins take precedence over built-in plugins"):
        assert part in message
    assert infos["acme-llama:llama"].wins and infos["llama"].loses
    assert "acme-llama" in infos["llama"].loses[0]


def test_two_third_party_plugins_order_by_distribution_name(monkeypatch):
    zzz = FakeEP("b", plugin_module("zzz", policy("row")))
    aaa = FakeEP("a", plugin_module("aaa", policy("column")))
    for order in ([(zzz, "zzz-dist"), (aaa, "aaa-dist")], [(aaa, "aaa-dist"), (zzz, "zzz-dist")]):
        with_entry_points(monkeypatch, *order)
        pm = PluginManager.default(environ={})
        collected, messages = collect(pm)
        assert chosen(pm, collected).source == "plugin aaa-dist:a"
        assert "ordered by distribution name" in messages[0] and "zzz-dist" in messages[0]


def test_tryfirst_beats_the_distribution_order_but_not_the_origin(monkeypatch):
    zzz = FakeEP("z", plugin_module("zzz", policy("row"), tryfirst=True))
    aaa = FakeEP("a", plugin_module("aaa", policy("column")))
    builtin = FakeEP("blt", plugin_module("blt", policy("replicate"), tryfirst=True))
    with_entry_points(monkeypatch, (aaa, "aaa-dist"), (zzz, "zzz-dist"), (builtin, "policyinject"))
    pm = PluginManager.default(environ={})
    collected, messages = collect(pm)
    assert [p.source for p in collected.layer_policies] == [
        "plugin zzz-dist:z", "plugin aaa-dist:a", "plugin blt"]
    assert "'z' is marked tryfirst" in messages[0] and "take precedence over built-in" in messages[0]


def test_a_plugin_registered_in_code_beats_entry_points(monkeypatch):
    with_entry_points(monkeypatch, (FakeEP("x", plugin_module("x", policy("row"))), "x-dist"))
    pm = PluginManager.default(environ={})
    pm.register(plugin_module("mine", policy("column")), "mine")
    collected, messages = collect(pm)
    assert chosen(pm, collected).source == "plugin mine"
    assert "plugins registered in code take precedence over third-party plugins" in messages[0]


def test_model_policy_conflicts_keep_only_the_winner(monkeypatch):
    model = "tests.fake.Model"
    with_entry_points(monkeypatch,
                      (FakeEP("b", plugin_module("b", ModelPolicy(model, layers="blocks"))), "policyinject"),
                      (FakeEP("t", plugin_module("t", ModelPolicy(model, layers="layers"))), "t-dist"))
    collected, messages = collect(PluginManager.default(environ={}))
    assert [p.layers for p in collected.model_policies] == ["layers"]
    assert "model class tests.fake.Model" in messages[0]


def test_disable_one_of_two_same_named_plugins_by_distribution(monkeypatch):
    builtin = FakeEP("llama", plugin_module("builtin_llama", policy("row")))
    third = FakeEP("llama", plugin_module("acme_llama", policy("column")))
    with_entry_points(monkeypatch, (third, "acme-llama"), (builtin, "policyinject"))
    env = {"POLICYINJECT_DISABLE_PLUGINS": "acme-llama:llama"}
    assert [i.key for i in PluginManager.default(environ=env).plugins()] == ["llama"]
    assert PluginManager.default(environ={"POLICYINJECT_DISABLE_PLUGINS": "llama"}).plugins() == []


def test_the_warning_reaches_plan_inference(monkeypatch):
    from policyinject import init_inference
    from policyinject.testing.presets import tiny_model

    layer = "transformers.models.llama.modeling_llama.LlamaDecoderLayer"
    real = list(manager_module._entry_points())
    from policyinject_plugins.llama import LLAMA_LAYER

    third = FakeEP("llama", plugin_module("acme_llama", LLAMA_LAYER.with_source("acme llama")))
    monkeypatch.setattr(manager_module, "_entry_points", lambda: iter(real + [(third, "acme-llama", "2.0")]))
    with pytest.warns(PluginConflictWarning, match=f"layer class {layer}: plugin 'llama' \\(distribution acme-llama"):
        engine = init_inference(tiny_model("llama"), dtype="fp32")
    assert engine is not None


# ---------------------------------------------------------------------------------------------- attribution
def test_load_and_registration_errors_name_the_distribution_and_entry_point(monkeypatch):
    with_entry_points(monkeypatch, (FakeEP("boom", error=ImportError("no module named fake_boom")), "boom-dist"))
    with pytest.raises(PluginError, match=r"'boom' \(distribution boom-dist 1.0\).*fake_boom.plugin"):
        PluginManager.default(environ={})

    class BadArgs:
        @hookimpl
        def policyinject_register_policies(self, regster):  # not a hook argument
            pass

    with_entry_points(monkeypatch, (FakeEP("bad", BadArgs), "bad-dist"))
    with pytest.raises(PluginError, match=r"'bad' \(distribution bad-dist 1.0\) \(entry point fake_bad.plugin\)"):
        PluginManager.default(environ={})


def test_errors_inside_the_hook_name_the_distribution(monkeypatch):
    with_entry_points(monkeypatch, (FakeEP("odd", plugin_module("odd", "not a policy")), "odd-dist"))
    with pytest.raises(PluginError, match=r"'odd' \(distribution odd-dist 1.0\).*registered 'not a policy'"):
        PluginManager.default(environ={}).collect()
