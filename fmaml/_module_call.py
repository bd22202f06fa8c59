"""``torch.func.functional_call`` for one module, its places found once.

``torch.func.functional_call(model, tensors, args)`` runs ``model(*args)`` with ``tensors``
(``{name: tensor}``) in place of the module's parameters and buffers. On every call it walks the
module tree twice (to untie tied weights, and to find each name's submodule), which costs more
than the forward pass of a small meta-learning model: measured on the sinusoid MLP 1-40-40-1
(``benchmarks/loop_overhead.py``), its bookkeeping is about a tenth of a MAML meta-step.

:class:`ModuleCall` finds the places once, as ``(submodule, attribute)`` pairs, and on each call
only swaps the tensors in and back out. The result is ``functional_call``'s to the bit: the same
``model(*args)`` runs with the same tensors in the same slots (``tie_weights=True``,
``strict=False``). Each call first checks that the places are still the module's: every
submodule is still its parent's child, and every slot still holds the tensor found there (so a
replaced submodule, a replaced parameter or buffer, ``model.to(...)``, or a name that was not
there before all make it look again). Where it cannot be sure, it calls ``functional_call``
itself: while ``torch.compile`` or ``torch.jit`` traces, for a scripted or ``DataParallel``
module, for a name that is not a parameter or buffer of the module, and for two names of tied
weights given together (``functional_call`` decides, and raises if their values differ).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

__all__ = ["ModuleCall"]

# (the submodule, "_parameters" or "_buffers", the key, the tensor found there when the places
# were found)
_Slot = tuple[nn.Module, str, str, Any]
_MISSING = object()


class ModuleCall:
    """``ModuleCall(model)(tensors, args)`` is ``torch.func.functional_call(model, tensors,
    args)``, with the places of the module's parameters and buffers found once.

    Args:
        model: the module.

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> call = ModuleCall(model)
        >>> p = {"weight": torch.ones(1, 2), "bias": torch.zeros(1)}
        >>> call(p, (torch.tensor([[1.0, 2.0]]),))
        tensor([[3.]])
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        scripted = (torch.jit.ScriptModule, torch.jit.ScriptFunction)
        self._plain = not isinstance(model, (*scripted, nn.DataParallel))
        self._edges: list[tuple[nn.Module, str, Any]] = []
        self._slots: dict[str, list[_Slot]] = {}
        self._tied: list[frozenset[str]] = []
        if self._plain:
            self._find()

    def _find(self) -> None:
        """Every submodule's place in its parent, and every parameter's and buffer's slots (a
        tied tensor has the slots of all its names under each of them)."""
        self._edges = [
            (module, name, child)
            for _, module in self.model.named_modules(remove_duplicate=False)
            for name, child in module._modules.items()
        ]
        by_tensor: dict[int, list[_Slot]] = {}
        names: dict[int, list[str]] = {}
        for kind, named in (
            ("_parameters", self.model.named_parameters(remove_duplicate=False)),
            ("_buffers", self.model.named_buffers(remove_duplicate=False)),
        ):
            for name, tensor in named:
                owner, _, attr = name.rpartition(".")
                slot = (self.model.get_submodule(owner), kind, attr, tensor)
                slots = by_tensor.setdefault(id(tensor), [])
                if not any(s[0] is slot[0] and s[1:3] == slot[1:3] for s in slots):
                    slots.append(slot)  # (a submodule used twice: its slot once)
                names.setdefault(id(tensor), []).append(name)
        self._slots = {name: by_tensor[key] for key, group in names.items() for name in group}
        self._tied = [frozenset(group) for group in names.values() if len(group) > 1]

    def __call__(self, tensors: Mapping[str, Any], args: tuple[Any, ...]) -> Any:
        """``self.model(*args)`` with ``tensors`` in place of its parameters and buffers."""
        if self._plain and not torch.compiler.is_compiling() and not torch.jit.is_tracing():
            swapped = self._swap(tensors)
            if swapped is None:  # the module changed since the places were found: again
                self._find()
                swapped = self._swap(tensors)
            if swapped is not None:
                try:
                    return self.model(*args)
                finally:
                    _restore(swapped)
        return functional_call(self.model, dict(tensors), args)

    def _swap(self, tensors: Mapping[str, Any]) -> list[_Slot] | None:
        """Put ``tensors`` in their slots; return what they held. None (nothing changed) where
        the places are not the module's any more, or a case :meth:`__call__` leaves to
        ``functional_call``."""
        for module, name, child in self._edges:
            if module._modules.get(name, _MISSING) is not child:
                return None
        slots = self._slots
        if not all(name in slots for name in tensors):
            return None
        if self._tied and any(len(group.intersection(tensors)) > 1 for group in self._tied):
            return None
        swapped: list[_Slot] = []
        for name, value in tensors.items():
            for slot in slots[name]:
                module, kind, attr, found = slot
                where = getattr(module, kind)
                if where.get(attr, _MISSING) is not found:
                    _restore(swapped)
                    return None
                swapped.append(slot)
                where[attr] = value
        return swapped


def _restore(swapped: list[_Slot]) -> None:
    for module, kind, attr, found in reversed(swapped):
        getattr(module, kind)[attr] = found
