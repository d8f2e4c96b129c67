"""A restricted reader for NVlabs/edm and edm2 network pickles that never runs their code.

NVlabs pickles store every network class through ``torch_utils.persistence``: a call
``_reconstruct_persistent_obj(meta)`` whose ``meta`` holds the *source code* of the class's module,
the class name and the object state (``__dict__``: parameters, buffers, child modules and the
``_init_kwargs`` it was built with). ``pickle.load`` would ``exec`` that source. This reader
resolves only the globals listed below, and builds inert records in their place:

- ``torch_utils.persistence._reconstruct_persistent_obj`` -> :class:`PersistentRecord` (class
  name, init args/kwargs, state; the embedded source is kept as text, never executed);
- ``torch.nn.modules.*`` classes (``ModuleDict`` ...) -> a :class:`ModuleRecord` holding the state;
- ``dnnlib.util.EasyDict`` -> :class:`EasyDict` (a plain ``dict``);
- tensors (``torch._utils._rebuild_*``; storages through ``torch.load(weights_only=True)``),
  ``collections.OrderedDict``, sets, torch dtypes/devices and numpy arrays/scalars.

Any other global is refused with :class:`UnsafePickleError` naming it.
"""

from __future__ import annotations

import collections
import io
import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from diffusionlab.errors import CheckpointError


class UnsafePickleError(CheckpointError):
    """A pickle that asks for a global this reader does not allow (it could run code)."""


class Record:
    """An inert stand-in for an object of a class we do not instantiate: its state only."""

    source_class: str = "?"
    state: dict[str, Any] | None = None  # set by BUILD (pickle's __setstate__ call)

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slots state)
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict):
            raise UnsafePickleError(
                f"{self.source_class}: unexpected state of type {type(state).__name__}"
            )
        self.state = dict(state)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.source_class}>"


class ModuleRecord(Record):
    """A ``torch.nn`` container or layer (``ModuleDict``, ``ModuleList``, ...) as its state."""


class PersistentRecord(Record):
    """One ``torch_utils.persistence`` object: ``class_name``, ``init_args``, ``init_kwargs``,
    ``state`` and ``module_src`` (the pickled source, kept as text and never executed)."""

    def __init__(self, meta: dict[str, Any]) -> None:
        if not isinstance(meta, dict) or meta.get("type") != "class":
            raise UnsafePickleError("a persistent object record without type 'class'")
        self.class_name = str(meta.get("class_name"))
        self.source_class = self.class_name
        self.version = meta.get("version")
        self.module_src = meta.get("module_src")
        self.__setstate__(meta.get("state") or {})

    @property
    def init_args(self) -> tuple:
        return tuple(self.state.get("_init_args") or ())

    @property
    def init_kwargs(self) -> dict[str, Any]:
        return dict(self.state.get("_init_kwargs") or {})


class EasyDict(dict):
    """``dnnlib.util.EasyDict`` read as a plain dict (attribute access as the original)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _load_storage(data: bytes) -> Any:
    """``torch.storage._load_from_bytes``: the storage's own ``torch.save`` bytes, read with
    ``weights_only=True`` (CUDA storages land on the CPU)."""
    if not isinstance(data, bytes | bytearray):
        raise UnsafePickleError("torch.storage._load_from_bytes got a non-bytes argument")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _no_hooks(hooks: Any) -> None:
    if hooks:
        raise UnsafePickleError("a tensor with backward hooks is refused")


def _rebuild_tensor_v2(
    storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None
):
    _no_hooks(backward_hooks)
    t = torch._utils._rebuild_tensor(storage, storage_offset, size, stride)
    return t.requires_grad_(bool(requires_grad)) if t.is_floating_point() else t


def _rebuild_tensor(storage, storage_offset, size, stride):
    return torch._utils._rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
    _no_hooks(backward_hooks)
    return torch.nn.Parameter(data, requires_grad=bool(requires_grad))


def _reconstructor(cls: Any, base: Any, state: Any = None) -> Any:
    """``copyreg._reconstructor`` (pickle protocols 0 and 1), for record classes only."""
    if not (isinstance(cls, type) and issubclass(cls, Record | EasyDict)) or base is not object:
        raise UnsafePickleError(f"copyreg._reconstructor of {cls!r} is refused")
    return cls()


_MODULE_RECORDS: dict[str, type[ModuleRecord]] = {}


def _module_record(module: str, name: str) -> type[ModuleRecord]:
    key = f"{module}.{name}"
    if key not in _MODULE_RECORDS:
        _MODULE_RECORDS[key] = type(name, (ModuleRecord,), {"source_class": key})
    return _MODULE_RECORDS[key]


_DTYPES = {
    name
    for name in dir(torch)
    if isinstance(getattr(torch, name, None), torch.dtype) and not name.startswith("_")
}

_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): PersistentRecord,
    ("dnnlib.util", "EasyDict"): EasyDict,
    ("dnnlib", "EasyDict"): EasyDict,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("__builtin__", "set"): set,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("copy_reg", "_reconstructor"): _reconstructor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_storage,
    ("torch", "device"): torch.device,
    ("torch", "Size"): torch.Size,
}


def _numpy_globals() -> dict[tuple[str, str], Any]:
    import numpy as np

    reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]  # numpy's own _reconstruct
    scalar = np.float32(0).__reduce__()[0]
    out: dict[tuple[str, str], Any] = {}
    for core in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out[(core, "_reconstruct")] = reconstruct
        out[(core, "scalar")] = scalar
    out[("numpy", "ndarray")] = np.ndarray
    out[("numpy", "dtype")] = np.dtype
    return out


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` resolves only the allow-list of this module."""

    def __init__(self, file: Any, name: str = "<pickle>") -> None:
        super().__init__(file)
        self.name = name

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        if key in _ALLOWED:
            return _ALLOWED[key]
        if module == "torch" and name in _DTYPES:
            return getattr(torch, name)
        if module.startswith("numpy") and key in (numpy := _numpy_globals()):
            return numpy[key]
        if module.startswith("torch.nn.modules.") and re.fullmatch(r"[A-Za-z_]\w*", name):
            return _module_record(module, name)
        raise UnsafePickleError(
            f"{self.name}: refuses the global {module}.{name} (it could run code); an NVlabs "
            "network pickle holds only tensors, containers and torch_utils.persistence records"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(
            f"{self.name}: a persistent id ({str(pid)[:40]}) — a torch.save file, not an NVlabs "
            "network pickle"
        )


def read_pickle(path: str | Path, key: str = "ckpt") -> Any:
    """The object tree of an NVlabs pickle, read with :class:`RestrictedUnpickler`."""
    p = Path(path).expanduser()
    where = f"{key}={str(path)!r}"
    if not p.is_file():
        raise CheckpointError(f"{where} does not exist")
    with open(p, "rb") as f:
        try:
            return RestrictedUnpickler(f, where).load()
        except UnsafePickleError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"{where} is truncated or not a network pickle ({first})"
            ) from None


def module_state(obj: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for every parameter and persistent buffer of a module record tree,
    named as ``nn.Module.state_dict`` names them."""
    state = getattr(obj, "state", None) if isinstance(obj, Record) else None
    if state is None:
        raise CheckpointError(f"expected a network module at {prefix or '<root>'}, got {obj!r}")
    skip = set(state.get("_non_persistent_buffers_set") or ())
    for group in ("_parameters", "_buffers"):
        for name, value in (state.get(group) or {}).items():
            if value is None or (group == "_buffers" and name in skip):
                continue
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(f"{prefix}{name} is not a tensor")
            yield prefix + name, value.detach()
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            yield from module_state(child, f"{prefix}{name}.")


def state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """:func:`module_state` as a dict."""
    return dict(module_state(obj))
