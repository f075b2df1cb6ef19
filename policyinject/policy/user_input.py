"""The user's ``injection_policy`` checked against the model, and DeepSpeed short forms merged with built-ins.

Two rules, both applied at plan time (nothing is imported, nothing mutated):

- **Every path a user's policy names exists.** A short form's linear names (suffix match, as in DeepSpeed:
  ``"o_proj"`` matches ``self_attn.o_proj``) and every path of a full :class:`Policy` (roles, norms,
  ``styles`` keys, ``transposed``) must name a submodule of the layer class's first instance; otherwise a
  :class:`~policyinject.errors.PolicyError` names the class, the path as written and the closest existing
  child names.
- **A short form is merged with the built-in policy of its class.** DeepSpeed's ``{LayerClass: ("a.b",
  "c.d")}`` states only the row-parallel linears ("every other linear is column-parallel"). When a plugin
  describes the same class, the merged policy keeps the plugin's roles and geometry (so kernel injection and
  the decode engine still see the attention and the MLP) and takes the short form's split where the roles
  say nothing; a linear the roles split the other way is a ``PolicyError`` naming the class and the linear.

Example:
    >>> import torch
    >>> from policyinject.policy import AttentionSpec, MLPSpec, Policy
    >>> class Attn(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.q, self.k, self.v, self.o = (torch.nn.Linear(8, 8) for _ in range(4))
    >>> class Mlp(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__(); self.fc1 = torch.nn.Linear(8, 16); self.fc2 = torch.nn.Linear(16, 8)
    >>> class Block(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__(); self.attn = Attn(); self.mlp = Mlp(); self.extra = torch.nn.Linear(8, 8)
    >>> builtin = Policy(Block, attention=AttentionSpec("attn", q="q", k="k", v="v", o="o"),
    ...                  mlp=MLPSpec("mlp", fc1="fc1", fc2="fc2", activation="gelu"), source="plugin toy")
    >>> merged = merge_short_form(Block, ("attn.o", "fc2", "extra"), builtin, Block())
    >>> merged.attention == builtin.attention, {k: v.value for k, v in merged.styles.items()}
    (True, {'extra': 'row'})
    >>> merge_short_form(Block, ("attn.o",), builtin, Block())
    Traceback (most recent call last):
    ...
    policyinject.errors.PolicyError: injection_policy[Block]: the short form ('attn.o',) contradicts the built-in policy (plugin toy): 'mlp.fc2' is the MLP's down projection (fc2), row-parallel, but the short form leaves it column-parallel (every linear it does not name); name it in the tuple, or pass a Policy
    >>> check_policy_paths(Policy(Block, styles={"mlp.fc3": "row"}), Block(), "injection_policy[Block]")
    Traceback (most recent call last):
    ...
    policyinject.errors.PolicyError: injection_policy[Block]: styles key 'mlp.fc3' names no submodule of Block; the closest existing: mlp.fc2, mlp.fc1
"""

from __future__ import annotations

import difflib
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import attrs
import torch

from ..errors import PolicyError
from .model import Policy, Style, is_linear_like

__all__ = ["check_policy_paths", "check_short_form", "merge_short_form", "role_names"]

_ROW = (Style.ROW, Style.ROW_SPLIT_INPUT)


def _closest(layer: torch.nn.Module, path: str) -> str:
    """``"; the closest existing: a, b"``: near names among the children of the deepest existing parent."""
    modules = dict(layer.named_modules())
    parts = path.split(".")
    parent = ""
    for i in range(len(parts) - 1, 0, -1):
        if ".".join(parts[:i]) in modules:
            parent = ".".join(parts[:i])
            break
    base = modules[parent]
    children = [f"{parent}.{n}" if parent else n for n, _ in base.named_children()]
    near = difflib.get_close_matches(path, children, n=4, cutoff=0.5)
    if not near:  # the whole tree, for a name written without (or with the wrong) parent
        near = difflib.get_close_matches(path, [p for p in modules if p], n=4, cutoff=0.5)
    if not near:
        near = children[:8]
    return f"; the closest existing: {', '.join(near)}" if near else f"; {type(base).__name__} has no children"


def _suffix_hits(names: Iterable[str], key: str) -> List[str]:
    return [n for n in names if n and (n == key or n.endswith("." + key))]


def role_names(policy: Policy) -> Dict[str, str]:
    """Layer-relative path of each role linear -> what it is (``"the attention's output projection (o)"``).

    Example:
        >>> from policyinject.policy import AttentionSpec
        >>> role_names(Policy("x.B", attention=AttentionSpec("attn", q="q", k="k", v="v", o="o")))["attn.o"]
        "the attention's output projection (o)"
    """
    out: Dict[str, str] = {}
    a, m = policy.attention, policy.mlp
    if a is not None:
        for field, what in (("q", "q projection"), ("k", "k projection"), ("v", "v projection"),
                            ("qkv", "fused qkv projection"), ("o", "output projection")):
            name = getattr(a, field)
            if name is not None:
                out[a.path(name)] = f"the attention's {what} ({field})"
    if m is not None:
        for field, what in (("gate", "gate projection"), ("up", "up projection"), ("gate_up", "fused gate/up "
                            "projection"), ("down", "down projection"), ("fc1", "up projection"),
                            ("fc2", "down projection")):
            name = getattr(m, field)
            if name is not None:
                out[m.path(name)] = f"the MLP's {what} ({field})"
    return out


def _policy_paths(policy: Policy) -> List[Tuple[str, str, bool]]:
    """``(what, layer-relative path, suffix match allowed)`` of every submodule a policy names."""
    out: List[Tuple[str, str, bool]] = []
    a, m = policy.attention, policy.mlp
    if a is not None:
        if a.module:
            out.append(("attention module", a.module, False))
        for field in ("q", "k", "v", "qkv", "o", "q_norm", "k_norm"):
            name = getattr(a, field)
            if name is not None:
                out.append((f"attention.{field}", a.path(name), False))
    if m is not None:
        if m.module:
            out.append(("mlp module", m.module, False))
        for field in ("gate", "up", "gate_up", "down", "fc1", "fc2"):
            name = getattr(m, field)
            if name is not None:
                out.append((f"mlp.{field}", m.path(name), False))
    for norm in policy.norms:
        out.append(("norm", norm.path, False))
    for field in ("input_norm", "post_attention_norm", "attention_output_norm", "mlp_output_norm"):
        name = getattr(policy, field)
        if name is not None:
            out.append((field, name, False))
    out.extend(("styles key", key, True) for key in policy.styles)
    out.extend(("transposed", key, False) for key in policy.transposed)
    return out


def check_policy_paths(policy: Policy, layer: torch.nn.Module, written: str) -> None:
    """``PolicyError`` (naming ``written``, the class, each path and its closest existing children) when a
    path of ``policy`` names no submodule of ``layer`` (the first instance of its class).

    Example:
        >>> check_policy_paths(Policy(torch.nn.Sequential, styles={"0": "row"}),
        ...                    torch.nn.Sequential(torch.nn.Linear(2, 2)), "injection_policy[Sequential]")
    """
    modules = dict(layer.named_modules())
    problems = []
    for what, path, suffix in _policy_paths(policy):
        if path in modules or (suffix and _suffix_hits(modules, path)):
            continue
        problems.append(f"{what} {path!r} names no submodule of {type(layer).__name__}{_closest(layer, path)}")
    if problems:
        raise PolicyError(f"{written}: " + "\n".join(problems))


def check_short_form(names: Sequence[str], layer: torch.nn.Module, written: str) -> None:
    """``PolicyError`` when a short form's name matches no submodule of ``layer`` (suffix match).

    Example:
        >>> check_short_form(("fc",), torch.nn.Sequential(torch.nn.Linear(2, 2)), "injection_policy[Sequential]")
        Traceback (most recent call last):
        ...
        policyinject.errors.PolicyError: injection_policy[Sequential]: 'fc' names no submodule of Sequential; the closest existing: 0
    """
    modules = dict(layer.named_modules())
    problems = [f"{name!r} names no submodule of {type(layer).__name__}{_closest(layer, name)}"
                for name in names if not _suffix_hits(modules, name)]
    if problems:
        raise PolicyError(f"{written}: " + "\n".join(problems))


def merge_short_form(layer_class: type, names: Sequence[str], builtin: Policy, layer: torch.nn.Module,
                     written: Optional[str] = None) -> Policy:
    """The built-in ``builtin`` policy with the short form's split merged in (see the module docstring).

    Roles, norms and geometry come from ``builtin``. The short form's row-parallel set (its names, suffix
    matched, plus DeepSpeed's rule: any linear whose path contains ``down_proj``) must agree with the roles'
    split; for every other linear it overrides the built-in ``styles``: a named linear becomes ROW, a linear
    nothing covers becomes COLUMN (``default_style``).
    """
    written = written or f"injection_policy[{layer_class.__name__}]"
    names = tuple(names)
    check_short_form(names, layer, written)
    modules = dict(layer.named_modules())
    linears = [p for p, mod in modules.items() if p and is_linear_like(mod)]
    rows = {p for n in names for p in _suffix_hits(linears, n)} | {p for p in linears if "down_proj" in p}
    other_rows = [n for n in names if not _suffix_hits(linears, n)]  # modules that are not linear-like
    roles = role_names(builtin)
    role_styles = attrs.evolve(builtin, styles={}).linear_styles()
    builtin_styles, _, _ = builtin.styles_for(layer)
    overrides: Dict[str, Style] = {n: Style.ROW for n in other_rows}
    problems: List[str] = []
    for path in linears:
        want_row = path in rows
        if path in roles:
            if (role_styles[path] in _ROW) != want_row:
                said = "makes it row-parallel" if want_row else \
                    "leaves it column-parallel (every linear it does not name)"
                split = "row-parallel" if role_styles[path] in _ROW else "column-parallel"
                problems.append(f"{path!r} is {roles[path]}, {split}, but the short form {said}")
            continue
        have = builtin_styles.get(path)
        if want_row and have not in _ROW:
            overrides[path] = Style.ROW
        elif not want_row and have in _ROW:
            problems.append(f"{path!r} is row-parallel in the built-in policy's styles, but the short form leaves "
                            f"it column-parallel (every linear it does not name)")
    if problems:
        head = f"{written}: the short form {names!r} contradicts the built-in policy ({builtin.source or 'plugin'}):"
        if len(problems) == 1:
            raise PolicyError(f"{head} {problems[0]}; name it in the tuple, or pass a Policy")
        raise PolicyError("\n".join([head, *problems, "name the row-parallel linears in the tuple, or pass a Policy"]))
    source = f"injection_policy (short form) + {builtin.source or 'plugin'}"
    return attrs.evolve(builtin, layer=layer_class, styles={**builtin.styles, **overrides},
                        default_style=builtin.default_style or Style.COLUMN, source=source)
