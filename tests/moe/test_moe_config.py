"""The MoE config rules (config/checks.py): expert counts against ``moe.ep_size``, and what EP needs."""

from __future__ import annotations

import pytest

from policyinject.config import ConfigError, load_config


def _error(**kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(None, **kwargs)
    return str(info.value)


def test_experts_not_divisible_by_ep_size_is_named() -> None:
    message = _error(replace_with_kernel_inject=True, moe={"ep_size": 4, "moe_experts": [8, 6]})
    assert "moe.ep_size" in message and "`moe.moe_experts` 6" in message and "8" not in message.split("6")[0][-3:]


def test_divisible_layouts_pass() -> None:
    cfg = load_config(None, replace_with_kernel_inject=True, moe={"ep_size": 2, "moe_experts": [8, 16]})
    assert cfg.moe.ep_size == 2
    assert load_config(None, replace_with_kernel_inject=True, moe={"ep_size": 2}).moe.moe_experts == (1,)


def test_ep_needs_kernel_injection() -> None:
    message = _error(moe={"ep_size": 2})
    assert "moe.ep_size" in message and "replace_with_kernel_inject" in message


def test_ep_refuses_cuda_graphs_and_disabled_moe() -> None:
    message = _error(replace_with_kernel_inject=True, enable_cuda_graph=True, moe={"ep_size": 2})
    assert "enable_cuda_graph" in message and "moe.ep_size" in message
    message = _error(replace_with_kernel_inject=True, moe={"ep_size": 2, "enabled": False})
    assert "moe.enabled" in message


def test_residual_moe_is_refused_naming_the_key() -> None:
    message = _error(moe={"type": "residual"})
    assert "moe.type" in message and "residual" in message


def test_deprecated_top_level_ep_size_moves() -> None:
    with pytest.warns(DeprecationWarning):
        cfg = load_config({"ep_size": 2, "replace_with_kernel_inject": True})
    assert cfg.moe.ep_size == 2
