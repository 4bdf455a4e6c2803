"""Read the tensor layout from a PyTorch checkpoint's data.pkl without running code from the file.

torch.save (zip format, torch >= 1.6) pickles a state dict. Each tensor in it
is a call such as ``torch._utils._rebuild_tensor_v2(storage, storage_offset,
size, stride, ...)``, and each storage is a persistent id that names a zip
member holding the raw bytes. ``RestrictedUnpickler`` resolves only the
globals that torch uses for this, and resolves them to objects of this module
that record the layout instead of building tensors. No torch code runs, and
neither does any other global the file names, because every other global is
rejected before it is looked up.
"""

import io
import pickle
import re
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .errors import SourceError

# Safetensors codes of torch's typed storage classes, which torch.save uses
# for tensors of the older dtypes (module "torch", e.g. torch.FloatStorage).
STORAGE_TYPE_CODES: dict[str, str] = {
    "FloatStorage": "F32",
    "DoubleStorage": "F64",
    "HalfStorage": "F16",
    "BFloat16Storage": "BF16",
    "LongStorage": "I64",
    "IntStorage": "I32",
    "ShortStorage": "I16",
    "CharStorage": "I8",
    "ByteStorage": "U8",
    "BoolStorage": "BOOL",
}

# Safetensors codes of the torch dtypes (module "torch", e.g. torch.float8_e4m3fn).
# torch >= 2.1 pickles the dtype itself for tensors whose dtype has no typed
# storage class, such as float8 and uint16, and rebuilds them with
# _rebuild_tensor_v3 on an untyped storage.
DTYPE_CODES: dict[str, str] = {
    "float32": "F32",
    "float64": "F64",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "uint16": "U16",
    "uint32": "U32",
    "uint64": "U64",
    "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
}

# torch.storage.UntypedStorage counts bytes, which we treat as uint8 elements,
# as torch.load does.
UNTYPED_STORAGE_CODE = "U8"

# torch names storages by decimal keys. Any key is used only to look up a zip
# member by exact name, but a narrow pattern keeps error messages readable.
_STORAGE_KEY = re.compile(r"[0-9A-Za-z_]{1,64}")


class _NoBuild:
    """Base of every object that this unpickler returns for a global or a persistent id.

    The BUILD opcode calls ``__setstate__`` when an object has one. Raising
    there stops a crafted pickle from overwriting the fields of a recorded
    tensor, which frozen dataclasses alone do not prevent because BUILD writes
    to ``__dict__`` directly.
    """

    def __setstate__(self, state: object) -> None:
        raise pickle.UnpicklingError(f"the pickle changes the state of {self!r}, which torch.save never does")


@dataclass(frozen=True)
class StorageRef(_NoBuild):
    """A storage named by a persistent id: the zip member ``<archive>/data/<key>``."""

    key: str
    dtype: str  # safetensors code of the storage's elements
    numel: int  # elements of dtype, so the member is numel * item size bytes


@dataclass(frozen=True)
class TensorRecord(_NoBuild):
    """The layout of one pickled tensor, before it is checked against the zip members."""

    storage: StorageRef
    dtype: str  # safetensors code of the tensor's elements
    storage_offset: int  # elements of dtype from the start of the storage
    shape: tuple[int, ...]
    stride: tuple[int, ...]  # elements of dtype
    lazy_flags: tuple[str, ...]  # torch's lazy "conj" or "neg" bits that are set, which change values
    python_attributes: tuple[str, ...]  # names of extra Python attributes, which we drop


@dataclass(frozen=True)
class _StorageType(_NoBuild):
    code: str


@dataclass(frozen=True)
class _Dtype(_NoBuild):
    code: str


@dataclass(frozen=True)
class _TensorClass(_NoBuild):
    name: str


class _Rebuild(_NoBuild):
    """Stand-in for one of torch's tensor rebuild functions."""

    def __init__(self, name: str, function: Any):
        self.name = name
        self._function = function

    def __call__(self, *args: Any) -> "TensorRecord":
        return self._function(*args)

    def __repr__(self) -> str:
        return self.name


def _check_int(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise pickle.UnpicklingError(f"{what} must be a non-negative integer, got {value!r}")
    return value


def _check_int_tuple(value: object, what: str) -> tuple[int, ...]:
    # torch.Size is a tuple subclass, but torch.save pickles sizes as plain tuples.
    if not isinstance(value, tuple):
        raise pickle.UnpicklingError(f"{what} must be a tuple of integers, got {value!r}")
    return tuple(_check_int(item, what) for item in value)


def _lazy_flags(metadata: object) -> tuple[str, ...]:
    # torch.save passes metadata only when a lazy bit is set, as {"neg": True}
    # or {"conj": True}. Those bits mean the stored bytes are not the values.
    if metadata is None:
        return ()
    if not isinstance(metadata, dict):
        raise pickle.UnpicklingError(f"tensor metadata must be a dict, got {metadata!r}")
    return tuple(sorted(str(key) for key, value in metadata.items() if value))


def _attribute_names(state: object) -> tuple[str, ...]:
    # Python state is __dict__, or (__dict__, slots) for classes with slots.
    # Either part may be None.
    parts = state if isinstance(state, tuple) else (state,)
    names = []
    for part in parts:
        if isinstance(part, dict):
            names.extend(str(key) for key in part)
    return tuple(names)


def _record(
    storage: object, dtype: str, storage_offset: object, size: object, stride: object, metadata: object
) -> TensorRecord:
    if not isinstance(storage, StorageRef):
        raise pickle.UnpicklingError(f"a tensor's storage must be a persistent id, got {storage!r}")
    shape = _check_int_tuple(size, "tensor size")
    strides = _check_int_tuple(stride, "tensor stride")
    if len(strides) != len(shape):
        raise pickle.UnpicklingError(f"tensor size {shape} and stride {strides} differ in length")
    return TensorRecord(
        storage=storage,
        dtype=dtype,
        storage_offset=_check_int(storage_offset, "storage offset"),
        shape=shape,
        stride=strides,
        lazy_flags=_lazy_flags(metadata),
        python_attributes=(),
    )


def _rebuild_tensor_v2(
    storage: object,
    storage_offset: object,
    size: object,
    stride: object,
    requires_grad: object,
    backward_hooks: object,
    metadata: object = None,
) -> TensorRecord:
    # The storage's own element type is the tensor's dtype.
    dtype = storage.dtype if isinstance(storage, StorageRef) else ""
    return _record(storage, dtype, storage_offset, size, stride, metadata)


def _rebuild_tensor_v3(
    storage: object,
    storage_offset: object,
    size: object,
    stride: object,
    requires_grad: object,
    backward_hooks: object,
    dtype: object,
    metadata: object = None,
) -> TensorRecord:
    # The storage is untyped and the pickle names the dtype. As in torch's
    # Tensor.set_, the offset and strides count elements of that dtype.
    if not isinstance(dtype, _Dtype):
        raise pickle.UnpicklingError(f"_rebuild_tensor_v3 expects a torch dtype, got {dtype!r}")
    return _record(storage, dtype.code, storage_offset, size, stride, metadata)


def _rebuild_parameter(data: object, requires_grad: object, backward_hooks: object) -> TensorRecord:
    # An nn.Parameter stores the same bytes as its data tensor.
    if not isinstance(data, TensorRecord):
        raise pickle.UnpicklingError(f"_rebuild_parameter expects a tensor, got {data!r}")
    return data


def _rebuild_parameter_with_state(
    data: object, requires_grad: object, backward_hooks: object, state: object
) -> TensorRecord:
    record = _rebuild_parameter(data, requires_grad, backward_hooks)
    return _with_attributes(record, state)


def _rebuild_from_type_v2(function: object, new_type: object, args: object, state: object) -> TensorRecord:
    # torch.save uses this wrapper for a tensor that has extra Python
    # attributes. new_type may only be Tensor or Parameter, because a global
    # for any other tensor subclass is rejected before it reaches here.
    if not isinstance(function, _Rebuild) or not isinstance(new_type, _TensorClass) or not isinstance(args, tuple):
        raise pickle.UnpicklingError(f"_rebuild_from_type_v2 got invalid arguments {function!r}, {new_type!r}")
    record = function(*args)
    if not isinstance(record, TensorRecord):
        raise pickle.UnpicklingError(f"{function!r} inside _rebuild_from_type_v2 did not return a tensor")
    return _with_attributes(record, state)


def _with_attributes(record: TensorRecord, state: object) -> TensorRecord:
    names = record.python_attributes + _attribute_names(state)
    return replace(record, python_attributes=names)


# Every global that RestrictedUnpickler resolves, as "module.name", mapped to
# our stand-in. These are the globals that torch.save of torch 2.13 writes for
# a dict of dense tensors and nn.Parameters (see Tensor._reduce_ex_internal
# and Parameter.__reduce_ex__ there).
ALLOWED_GLOBALS: dict[str, object] = {
    # The state dict itself. Building one from pickled items runs no code of the file.
    "collections.OrderedDict": OrderedDict,
    # Tensors and nn.Parameters, with and without extra Python attributes.
    "torch._utils._rebuild_tensor_v2": _Rebuild("_rebuild_tensor_v2", _rebuild_tensor_v2),
    "torch._utils._rebuild_tensor_v3": _Rebuild("_rebuild_tensor_v3", _rebuild_tensor_v3),
    "torch._utils._rebuild_parameter": _Rebuild("_rebuild_parameter", _rebuild_parameter),
    "torch._utils._rebuild_parameter_with_state": _Rebuild(
        "_rebuild_parameter_with_state", _rebuild_parameter_with_state
    ),
    "torch._tensor._rebuild_from_type_v2": _Rebuild("_rebuild_from_type_v2", _rebuild_from_type_v2),
    # The classes that _rebuild_from_type_v2 names.
    "torch.Tensor": _TensorClass("torch.Tensor"),
    "torch.nn.parameter.Parameter": _TensorClass("torch.nn.parameter.Parameter"),
    # Storage classes in persistent ids, and dtypes for _rebuild_tensor_v3.
    "torch.storage.UntypedStorage": _StorageType(UNTYPED_STORAGE_CODE),
    **{f"torch.{name}": _StorageType(code) for name, code in STORAGE_TYPE_CODES.items()},
    **{f"torch.{name}": _Dtype(code) for name, code in DTYPE_CODES.items()},
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only ALLOWED_GLOBALS and turns storages into StorageRefs."""

    def __init__(self, data: bytes, path: Path):
        super().__init__(io.BytesIO(data))
        self.path = path
        self._storages: dict[str, StorageRef] = {}

    def find_class(self, module: str, name: str) -> object:
        # Every opcode that can call or look up Python code (GLOBAL,
        # STACK_GLOBAL, INST, OBJ, EXT*) gets its callable here, so rejecting
        # unknown names here blocks REDUCE, NEWOBJ and BUILD on them too.
        qualified = f"{module}.{name}"
        allowed = ALLOWED_GLOBALS.get(qualified)
        if allowed is not None:
            return allowed
        if module == "torch" or module.startswith("torch."):
            raise SourceError(
                f"{self.path}: data.pkl uses {qualified}, which lowmem-moe does not support. Only dense tensors "
                f"and nn.Parameters of these dtypes are read: {', '.join(DTYPE_CODES)}. Quantized, sparse and "
                "other special tensors must be converted to dense tensors, and the file re-saved, first."
            )
        raise SourceError(
            f"{self.path}: data.pkl refers to the Python global {qualified}, which is not allowed in a "
            "checkpoint because loading it could run code. lowmem-moe reads only tensors written by torch.save. "
            "Do not load this file with torch.load unless you trust its source."
        )

    def persistent_load(self, pid: object) -> StorageRef:
        # torch.save writes ("storage", storage class, key, location, numel).
        # The location (such as "cuda:0") does not change the bytes.
        if not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage":
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"persistent id names {storage_type!r}, not a storage class")
        if not isinstance(key, str) or not _STORAGE_KEY.fullmatch(key):
            raise pickle.UnpicklingError(f"invalid storage key {key!r}")
        storage = StorageRef(key=key, dtype=storage_type.code, numel=_check_int(numel, "storage size"))
        earlier = self._storages.setdefault(key, storage)
        if earlier != storage:
            raise pickle.UnpicklingError(f"storage {key!r} is declared both as {earlier} and as {storage}")
        return storage


# Exceptions that a malformed pickle can raise from inside the unpickler,
# besides the UnpicklingError of our stand-ins. Our SourceError passes through.
_MALFORMED_PICKLE_ERRORS = (
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    OverflowError,
    RecursionError,
)


def read_tensor_records(data: bytes, path: Path) -> dict[str, TensorRecord]:
    """Parse a data.pkl that torch.save wrote for a state dict, without running code from it.

    Args:
        data: the bytes of the ``<archive>/data.pkl`` zip member.
        path: the checkpoint file, for error messages.

    Returns:
        The state dict's tensor layouts by name, in the pickle's order.

    Raises:
        SourceError: the pickle names a global outside ALLOWED_GLOBALS, is
            malformed, or is not a flat dict of tensors.
    """
    unpickler = RestrictedUnpickler(data, path)
    try:
        state_dict = unpickler.load()
    except _MALFORMED_PICKLE_ERRORS as error:
        raise SourceError(
            f"{path}: data.pkl is not a valid PyTorch state dict pickle ({type(error).__name__}: {error}). "
            "The file is damaged or was not written by torch.save."
        ) from error

    if not isinstance(state_dict, dict):
        raise SourceError(
            f"{path}: data.pkl contains a {type(state_dict).__name__}, not a state dict. "
            "Save model.state_dict() rather than a whole model or training checkpoint."
        )
    records = {}
    for name, value in state_dict.items():
        if not isinstance(name, str):
            raise SourceError(f"{path}: state dict key {name!r} is not a string.")
        if not isinstance(value, TensorRecord):
            raise SourceError(
                f"{path}: state dict entry {name!r} is a {type(value).__name__}, not a tensor. "
                "lowmem-moe reads flat dicts of tensors, as transformers saves them."
            )
        records[name] = value
    return records
