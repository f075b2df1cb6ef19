"""The cross-field rule between ``moe.ep_size`` and ``moe.moe_experts`` (config/checks.py)."""

from __future__ import annotations

from policyinject.config import load_config
from policyinject.config.checks import check_config


def _problems(ep_size: int, experts: list) -> list:
    cfg = load_config({"moe": {"moe_experts": experts}})
    # moe.ep_size > 1 is refused by its key status while expert parallelism is not wired into the passes;
    # set it behind the validator to exercise the cross-field rule that applies once it is.
    object.__setattr__(cfg.moe, "ep_size", ep_size)
    return [str(p) for p in check_config(cfg) if "ep_size" in str(p)]


def test_experts_not_divisible_by_ep_size_is_named() -> None:
    problems = _problems(4, [8, 6])
    assert len(problems) == 1
    assert "moe.ep_size" in problems[0] and "`moe.moe_experts` 6" in problems[0]


def test_divisible_layouts_pass() -> None:
    assert _problems(2, [8, 16]) == [] and _problems(1, [1]) == []
