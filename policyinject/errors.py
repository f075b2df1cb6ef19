"""Exception types raised by policyinject (other than :class:`policyinject.ConfigError`).

Every error names what the user wrote: the module path, the layer class, the policy.

Example:
    >>> from policyinject.errors import PlanError
    >>> str(PlanError("model.layers.0.self_attn.q_proj: 9 heads cannot split over tp_size=2"))
    'model.layers.0.self_attn.q_proj: 9 heads cannot split over tp_size=2'
"""

from __future__ import annotations


class PolicyInjectError(Exception):
    """Base class of the errors raised by policyinject."""


class PolicyError(PolicyInjectError, ValueError):
    """A policy is malformed (a role missing, a style unknown, a layer class that does not resolve)."""


class PlanError(PolicyInjectError, ValueError):
    """Planning failed; the user's model has not been touched.

    Carries every problem found, one per line.
    """

    def __init__(self, problems: "str | list[str]") -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class PluginError(PolicyInjectError, RuntimeError):
    """A plugin failed to load or to register; the message names the plugin and its distribution."""


class UnsupportedError(PolicyInjectError, NotImplementedError):
    """A feature was asked for that cannot run here (for example CUDA graphs without CUDA)."""


class NothingInjectedWarning(UserWarning):
    """``replace_with_kernel_inject=True`` but no layer of the model will be injected (no policy matches, or
    the matched layers cannot be injected); the model runs as it was. The message names the model class, the
    model types the registered plugins describe, and ``policyinject inspect``."""


class NothingQuantizedWarning(UserWarning):
    """Weight quantization was asked for and the plan quantizes no linear at all (the model has none, or the
    ``quant.weight.include`` / ``exclude`` patterns, ``quant.qkv.enabled`` and ``quant.lm_head.enabled`` leave
    none); the message names the model class and the patterns."""


class NonFiniteLogitsError(PolicyInjectError, FloatingPointError):
    """Generation met logits it cannot choose a token from (NaN, ``+inf``, or a row of all ``-inf``).

    Raised once generation ends (the check is a device flag, read once), instead of returning tokens chosen
    from garbage; the message names the steps' range and what to look at (dtype overflow, the weights).
    """


class RankTimeoutError(PolicyInjectError, TimeoutError):
    """Ranks of a tensor-parallel group did not all arrive within ``tensor_parallel.setup_timeout_s``.

    Raised on every rank that did arrive; ``missing`` holds the global ranks that did not, and the message
    names them (with what each last started, when known).
    """

    def __init__(self, message: str, missing: "tuple[int, ...]" = ()) -> None:
        self.missing = tuple(missing)
        super().__init__(message)

    def __reduce__(self):
        return (type(self), (str(self), self.missing))


class ApplyError(PolicyInjectError, RuntimeError):
    """Applying a plan failed part-way: the model is partly converted and will not compute.

    Raised by ``init_inference`` when a pass fails after it started changing the model (out of memory, a
    kernel error). ``failed_pass`` is the pass that failed, ``completed_passes`` those that finished,
    ``converted`` / ``unconverted`` the qualified names of the layers (and model-level modules) that pass
    had / had not converted, ``failed_at`` the layer being built when it failed (left as it was). The
    original exception is ``__cause__``. The model is poisoned: every later forward raises
    :class:`PoisonedModelError`; reload it to try again.

    Example:
        >>> e = ApplyError("quantize", ["dtype"], ["model.layers.0"], ["model.layers.1"], "model.layers.1", "boom")
        >>> e.converted, e.unconverted
        (['model.layers.0'], ['model.layers.1'])
        >>> import pickle; pickle.loads(pickle.dumps(e)).failed_at
        'model.layers.1'
    """

    def __init__(self, failed_pass: str, completed_passes: "list[str]", converted: "list[str]",
                 unconverted: "list[str]", failed_at: "str | None", reason: str) -> None:
        self.failed_pass = failed_pass
        self.completed_passes = list(completed_passes)
        self.converted = list(converted)
        self.unconverted = list(unconverted)
        self.failed_at = failed_at
        self.reason = reason
        where = f" at {failed_at}" if failed_at else ""

        def names(xs: "list[str]") -> str:
            shown = ", ".join(x or "<model>" for x in xs[:12])
            return (shown + f", ... ({len(xs)} in all)") if len(xs) > 12 else (shown or "none")

        super().__init__(
            f"init_inference failed while applying pass {failed_pass!r}{where}: {reason}\n"
            f"  passes completed: {', '.join(self.completed_passes) or 'none'}\n"
            f"  converted by {failed_pass!r}: {names(self.converted)}\n"
            f"  not converted by {failed_pass!r}: {names(self.unconverted)}\n"
            "  The model is partly converted; its forward now raises. Reload the model to try again.")

    def __reduce__(self) -> tuple:  # picklable (errors cross process boundaries under tensor parallelism)
        return (type(self), (self.failed_pass, self.completed_passes, self.converted, self.unconverted,
                             self.failed_at, self.reason))


class PoisonedModelError(PolicyInjectError, RuntimeError):
    """The forward of a model that a failed ``init_inference`` left partly converted (see :class:`ApplyError`).

    Example:
        >>> issubclass(PoisonedModelError, PolicyInjectError)
        True
    """
