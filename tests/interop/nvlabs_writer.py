"""Write network pickles in NVlabs' ``torch_utils.persistence`` format without NVlabs' code.

A persistent object pickles as ``torch_utils.persistence._reconstruct_persistent_obj(meta)`` with
``meta = {type: 'class', version: 6, module_src, class_name, state}`` and ``state`` the module's
``__dict__`` (``_parameters``, ``_buffers``, ``_modules``, ``_init_args``, ``_init_kwargs``, ...);
``torch.nn.ModuleDict`` children pickle as torch objects (``NEWOBJ`` + state), tensors as torch
pickles them. Stand-in modules ``torch_utils.persistence`` and ``dnnlib.util`` exist only while
dumping, so ``pickle`` can name their globals.
"""

from __future__ import annotations

import contextlib
import copyreg
import pickle
import sys
import types
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

# what NVlabs' pickles carry as module_src: here a harmless stand-in (never executed on reading)
MODULE_SRC = "# training/networks.py source would be here\n"


def _reconstruct_persistent_obj(meta):  # the global the pickle names; never called here
    raise AssertionError("only for pickling")


class EasyDict(dict):
    """Stand-in of ``dnnlib.util.EasyDict`` (a dict subclass)."""


@contextlib.contextmanager
def nvlabs_modules():
    """``torch_utils.persistence`` and ``dnnlib.util`` in ``sys.modules`` while dumping."""
    names = ["torch_utils", "torch_utils.persistence", "dnnlib", "dnnlib.util"]
    saved = {n: sys.modules.get(n) for n in names}
    tu, pers = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")
    dn, util = types.ModuleType("dnnlib"), types.ModuleType("dnnlib.util")
    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    pers._reconstruct_persistent_obj = _reconstruct_persistent_obj
    EasyDict.__module__ = "dnnlib.util"
    util.EasyDict = EasyDict
    tu.persistence, dn.util = pers, util
    sys.modules.update(zip(names, [tu, pers, dn, util], strict=True))
    try:
        yield
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


class Persistent:
    """A persistent object: pickles as ``_reconstruct_persistent_obj(meta)``."""

    def __init__(self, class_name: str, state: dict[str, Any], module_src: str = MODULE_SRC):
        self.class_name, self.state, self.module_src = class_name, state, module_src

    def __reduce__(self):
        meta = dict(
            type="class",
            version=6,
            module_src=self.module_src,
            class_name=self.class_name,
            state=self.state,
        )
        return _reconstruct_persistent_obj, (meta,)


class TorchModule:
    """A ``torch.nn`` container (ModuleDict ...): ``NEWOBJ(cls)`` then ``BUILD(state)``."""

    def __init__(self, cls: type, state: dict[str, Any]):
        self.cls, self.state = cls, state

    @property
    def __class__(self):  # pickle checks that NEWOBJ's class is the object's
        return self.cls

    def __reduce_ex__(self, protocol):
        return copyreg.__newobj__, (self.cls,), self.state


def module_state(m: torch.nn.Module, children: dict[str, Any], **attrs: Any) -> dict[str, Any]:
    """A module ``__dict__`` as ``nn.Module`` keeps it (hooks left out)."""
    return {
        "training": False,
        "_parameters": OrderedDict(m._parameters),
        "_buffers": OrderedDict(m._buffers),
        "_non_persistent_buffers_set": set(m._non_persistent_buffers_set),
        "_modules": OrderedDict(children),
        **attrs,
    }


def to_records(m: torch.nn.Module, names: dict[type, str] | None = None) -> Any:
    """Our module tree as NVlabs would pickle its twin: persistent records, ModuleDicts as torch."""
    children = {k: to_records(c, names) for k, c in m._modules.items() if c is not None}
    children.update({k: None for k, c in m._modules.items() if c is None})
    if isinstance(m, torch.nn.ModuleDict | torch.nn.ModuleList):
        return TorchModule(type(m), module_state(m, children))
    name = (names or {}).get(type(m), type(m).__name__)
    return Persistent(name, module_state(m, children, _init_args=(), _init_kwargs={}))


def precond(
    class_name: str,
    net: torch.nn.Module,
    init_kwargs: dict[str, Any],
    child: str = "model",
    lift: tuple[str, ...] = (),
) -> Persistent:
    """A preconditioning record around ``net`` (as ``child``), built with ``init_kwargs``;
    ``lift`` moves children of ``net`` up to the wrapper (EDM2's ``logvar_*`` head)."""
    inner = to_records(net, {type(net): "UNet"} if child == "unet" else None)
    mods = inner.state["_modules"]
    top = OrderedDict([(child, inner)])
    for name in lift:
        top[name] = mods.pop(name)
    attrs = {k: v for k, v in init_kwargs.items() if not isinstance(v, dict | list)}
    state = module_state(torch.nn.Module(), top, _init_args=(), _init_kwargs=dict(init_kwargs))
    state.update(attrs)
    return Persistent(class_name, state)


def write_pickle(path: str | Path, data: Any) -> Path:
    """``pickle.dump(data)`` as NVlabs' training loops do (default protocol)."""
    path = Path(path)
    with nvlabs_modules(), open(path, "wb") as f:
        pickle.dump(data, f)
    return path


def easydict(**kw: Any) -> EasyDict:
    return EasyDict(**kw)
