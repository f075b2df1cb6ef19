"""A ``generate`` call made from inside a ``generate`` call on the same engine (a streamer's ``put`` that
generates again) must not hang: the engine's call lock would wait for itself forever. It is refused with
``UnsupportedError`` naming the cause; other threads still just wait their turn."""

from __future__ import annotations

import threading

import pytest
import torch

import policyinject as pi
from policyinject.decode.concurrency import CallLock
from policyinject.testing.presets import tiny_model

IDS = torch.tensor([[5, 6, 7, 8]])


def _in_thread(fn, timeout=120.0):
    box: dict = {}

    def run():
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "generate hung"
    return box


@pytest.mark.parametrize("kernel_inject", [True, False])
def test_generate_from_a_streamer_of_the_same_engine_is_refused_not_a_hang(kernel_inject):
    engine = pi.init_inference(tiny_model("llama"), dtype="fp32", replace_with_kernel_inject=kernel_inject)

    class Nested:
        ended = False

        def put(self, value):
            engine.generate(IDS, max_new_tokens=2)

        def end(self):
            Nested.ended = True

    box = _in_thread(lambda: engine.generate(IDS, max_new_tokens=3, streamer=Nested()))
    assert isinstance(box.get("error"), pi.UnsupportedError), box
    assert "inside" in str(box["error"])
    assert torch.equal(engine.generate(IDS, max_new_tokens=3), engine.generate(IDS, max_new_tokens=3))


def test_the_lock_still_serialises_other_threads():
    lock = CallLock()
    order = []
    with lock:
        t = threading.Thread(target=lambda: (lock.__enter__(), order.append("other"), lock.__exit__()))
        t.start()
        t.join(0.2)
        assert t.is_alive() and order == []  # waiting, not refused
        order.append("first")
    t.join(10)
    assert order == ["first", "other"]
