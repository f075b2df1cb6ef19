"""Short policy forms converted to :class:`Policy` objects: DeepSpeed's tuple form and Hugging Face TP plans.

**DeepSpeed short form** ``{LayerClass: ("attn.out_proj", "mlp.fc2")}``: the named linears are row-parallel
(suffix matching as in :meth:`Policy.styles_for`, so ``"output.dense"`` matches ``attention.output.dense``
and ``output.dense``), every other linear inside the layer is column-parallel (``default_style=COLUMN``).
DeepSpeed's extra rule, *any linear whose name contains ``down_proj`` is row-parallel*, is applied when an
instance of the layer is at hand (:func:`from_deepspeed` with ``instance=``) and by the tensor-parallel pass
for every policy whose ``default_style`` is COLUMN.

**Hugging Face plan form** ``{"layers.*.self_attn.q_proj": "colwise", "lm_head": "colwise_gather_output"}``
(the ``base_model_tp_plan`` of a config, keys relative to the base model, or a model's ``_tp_plan``, keys
relative to the model): keys with ``*`` become per-layer-class policies for the classes found in that
``nn.ModuleList``; keys without ``*`` become model-level styles. Both the 4.5x names (``colwise_rep``,
``rowwise_rep``, ``local_colwise``, ...) and the v5 names (``colwise_gather_output``, ``rowwise_split_input``,
``packed_colwise``, ``embedding_rowwise``, ``replicated_with_grad_allreduce``, ...) are accepted.
Mixture-of-experts styles are not converted: the rule is dropped (the module stays replicated) and a lint
message says so; :func:`convert_hf_plan` returns those messages.

Example:
    >>> import torch
    >>> class Block(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc1 = torch.nn.Linear(4, 8); self.fc2 = torch.nn.Linear(8, 4)
    >>> p = from_deepspeed(Block, ("fc2",))
    >>> {k: v.value for k, v in p.styles_for(Block())[0].items()}
    {'fc2': 'row', 'fc1': 'column'}
    >>> hf_style("colwise_rep").value, hf_style("rowwise").value
    ('column_gather', 'row')
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import attrs
import torch

from ..config.tp_plan import HF_STYLE_TABLE, MOE, unsupported_style_message
from ..errors import PolicyError
from .model import ModelPolicy, Policy, Style, is_linear_like

#: Hugging Face style names -> policyinject Style (from the one table, :data:`policyinject.config.tp_plan.HF_STYLE_TABLE`).
HF_STYLES: Dict[str, Style] = {name: Style(value) for name, value in HF_STYLE_TABLE.items() if value != MOE}
#: Expert-parallel / MoE styles: dropped with a lint message (the experts stay replicated).
HF_MOE_STYLES = frozenset(name for name, value in HF_STYLE_TABLE.items() if value == MOE)

def hf_style(name: str) -> Style:
    """The :class:`Style` of a Hugging Face style name; :class:`PolicyError` for MoE or unknown names.

    Example:
        >>> hf_style("embedding_rowwise").value
        'vocab_embedding'
    """
    if name in HF_STYLES:
        return HF_STYLES[name]
    if name in HF_MOE_STYLES or name.startswith("megamoe"):
        raise PolicyError(f"Hugging Face TP style {name!r} is a mixture-of-experts style policyinject does not convert")
    raise PolicyError(f"Hugging Face TP style {name!r}: {unsupported_style_message(str(name))}")


def from_deepspeed(layer: Union[type, str], names: Union[str, Sequence[str]], instance: Optional[torch.nn.Module] = None,
                   source: str = "injection_policy") -> Policy:
    """Convert DeepSpeed's ``{LayerClass: ("a.b", "c.d")}`` entry to a :class:`Policy`.

    The named linears are ROW; every other linear is COLUMN. With ``instance``, linears whose name contains
    ``down_proj`` are added as ROW too (DeepSpeed's rule).

    Example:
        >>> import torch
        >>> class B(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__(); self.up = torch.nn.Linear(2, 4); self.my_down_proj = torch.nn.Linear(4, 2)
        >>> p = from_deepspeed(B, (), instance=B())
        >>> sorted((k, v.value) for k, v in p.styles.items())
        [('my_down_proj', 'row')]
    """
    if isinstance(names, str):
        names = (names,)
    names = tuple(names)
    if not all(isinstance(n, str) and n for n in names):
        raise PolicyError(f"injection_policy for {getattr(layer, '__name__', layer)}: expected linear names "
                          f"(strings), got {names!r}")
    if isinstance(layer, type) and not issubclass(layer, torch.nn.Module):
        raise PolicyError(f"injection_policy key {layer!r} is not an nn.Module subclass")
    styles = {n: Style.ROW for n in names}
    if instance is not None:
        for path, mod in instance.named_modules():
            if path and is_linear_like(mod) and "down_proj" in path and not any(
                    path == n or path.endswith("." + n) for n in styles):
                styles[path] = Style.ROW
    return Policy(layer=layer, styles=styles, default_style=Style.COLUMN, source=source)


@attrs.frozen
class HFPlanConversion:
    """What :func:`convert_hf_plan` produced: layer policies, at most one model policy, lint messages."""

    policies: tuple = ()
    model_policies: tuple = ()
    lint: tuple = ()


def _resolve_prefix(model: torch.nn.Module, path: str) -> Optional[str]:
    """``path`` as a model-relative path: as given, or under the base-model prefix."""
    candidates = [path]
    prefix = getattr(model, "base_model_prefix", "") or ""
    if prefix and hasattr(model, prefix):
        candidates.append(f"{prefix}.{path}")
    for c in candidates:
        try:
            model.get_submodule(c)
            return c
        except AttributeError:
            continue
    return None


def _get_param_owner(model: torch.nn.Module, path: str) -> bool:
    owner, _, name = path.rpartition(".")
    try:
        mod = model.get_submodule(owner) if owner else model
    except AttributeError:
        return False
    return isinstance(getattr(mod, name, None), torch.Tensor)


def convert_hf_plan(plan: Mapping[str, str], model: torch.nn.Module, source: str = "tp_plan") -> HFPlanConversion:
    """Convert a Hugging Face TP plan into per-layer-class policies and a model policy, for ``model``.

    Keys may be relative to the model (``model.layers.*.mlp.up_proj``, as in ``model._tp_plan``) or to the
    base model (``layers.*.mlp.up_proj``, as in ``config.base_model_tp_plan``).

    Example:
        >>> from policyinject.testing.presets import tiny_model
        >>> m = tiny_model("llama")
        >>> conv = convert_hf_plan(m._tp_plan, m)
        >>> [p.layer_name for p in conv.policies], conv.model_policies[0].styles["lm_head"].value
        (['LlamaDecoderLayer'], 'vocab_head')
    """
    per_list: Dict[str, Dict[str, Style]] = {}
    model_styles: Dict[str, Style] = {}
    lint: List[str] = []
    for key, name in plan.items():
        head, star, tail = key.partition("*")
        if name in HF_MOE_STYLES or str(name).startswith("megamoe"):
            lint.append(f"{source}: {key!r} uses the mixture-of-experts style {name!r}; not converted, it stays "
                        f"replicated")
            continue
        style = hf_style(name)
        if star:
            list_path = _resolve_prefix(model, head.rstrip("."))
            rel = tail.lstrip(".")
            if list_path is None:
                lint.append(f"{source}: {key!r} names no module list in {type(model).__name__}")
                continue
            per_list.setdefault(list_path, {})[rel] = style
        else:
            path = _resolve_prefix(model, key)
            if path is None:
                if _get_param_owner(model, key):
                    lint.append(f"{source}: {key!r} names a parameter, not a module; not converted")
                else:
                    lint.append(f"{source}: {key!r} names no module in {type(model).__name__}")
                continue
            mod = model.get_submodule(path)
            if isinstance(mod, torch.nn.Embedding) and style in (Style.VOCAB_EMBEDDING, Style.ROW):
                style = Style.VOCAB_EMBEDDING
            elif is_linear_like(mod) and style in (Style.COLUMN_GATHER, Style.VOCAB_HEAD):
                style = Style.VOCAB_HEAD
            elif isinstance(mod, torch.nn.Embedding) and style is not Style.REPLICATE:
                raise PolicyError(f"{source}: {key!r} is an nn.Embedding; style {name!r} is not supported for it "
                                  f"(use 'embedding_rowwise')")
            model_styles[path] = style
    policies: List[Policy] = []
    layers_path = None
    for list_path, styles in per_list.items():
        container = model.get_submodule(list_path)
        layers_path = layers_path or list_path
        seen: List[type] = []
        for child in container.children():
            if type(child) in seen:
                continue
            seen.append(type(child))
            policies.append(_layer_policy(type(child), child, styles, source, lint, list_path))
    model_policies: Tuple[ModelPolicy, ...] = ()
    if model_styles or layers_path:
        embed = next((p for p, s in model_styles.items() if s is Style.VOCAB_EMBEDDING), None)
        head = next((p for p, s in model_styles.items() if s is Style.VOCAB_HEAD), None)
        model_policies = (ModelPolicy(model=type(model), layers=layers_path or "", embed=embed, lm_head=head,
                                      styles=model_styles, source=source),)
    return HFPlanConversion(tuple(policies), model_policies, tuple(lint))


def _layer_policy(cls: type, instance: torch.nn.Module, styles: Mapping[str, Style], source: str, lint: List[str],
                  list_path: str) -> Policy:
    modules = dict(instance.named_modules())
    kept: Dict[str, Style] = {}
    for rel, style in styles.items():
        if rel in modules:
            kept[rel] = style
        elif _get_param_owner(instance, rel):
            lint.append(f"{source}: '{list_path}.*.{rel}' names a parameter of {cls.__name__}; not converted")
        else:
            lint.append(f"{source}: '{list_path}.*.{rel}' matches nothing in {cls.__name__}")
    return Policy(layer=cls, styles=kept, source=source)


def from_hf_plan(plan: Mapping[str, str], model: torch.nn.Module) -> tuple:
    """``(layer policies, model policies)`` of a Hugging Face plan (see :func:`convert_hf_plan`).

    Example:
        >>> from policyinject.testing.presets import tiny_model
        >>> m = tiny_model("gpt_neox")
        >>> layers, models = from_hf_plan(type(m.config).base_model_tp_plan, m)
        >>> sorted(layers[0].styles)[:2], models[0].embed
        (['attention.dense', 'attention.query_key_value'], 'gpt_neox.embed_in')
    """
    conv = convert_hf_plan(plan, model)
    return list(conv.policies), list(conv.model_policies)
