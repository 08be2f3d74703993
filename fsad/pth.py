"""PyTorch checkpoints (`torch.save` of a state_dict) read into NumPy, without PyTorch.

    obj = read_pth("resnet18-f37072fd.pth")    # OrderedDict[str, np.ndarray], as saved
    sd = state_dict_arrays(obj)                 # {key: ndarray}, "state_dict" wrapper removed

Two on-disk formats are read, told apart by their first bytes:

* zip (torch >= 1.6): ``<archive>/data.pkl`` is the object's pickle, whose storages are
  persistent ids ``("storage", <storage type>, key, location, numel)``; the bytes of
  storage ``key`` are the record ``<archive>/data/<key>``, in the byte order named by
  ``<archive>/byteorder`` (little when absent). ``<archive>`` can be any folder name.
* legacy (``_use_new_zipfile_serialization=False``, e.g. torchvision's older
  resnet18-5c106cde.pth): five pickles in a row - magic number, protocol version,
  sys_info, the object (persistent ids carry a sixth item, view_metadata), the sorted
  storage keys - then, per key, an int64 element count and the raw little-endian bytes.

Unpickling is restricted to what a state_dict is made of (OrderedDict, tensor rebuild
functions, storage types, dtypes, torch.Size); any other global, e.g. ``os.system``, is
refused before it is called, so reading an untrusted file runs none of its code.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Mapping

import numpy as np

from fsad.errors import UserError

__all__ = ["read_pth", "state_dict_arrays", "UnsafeCheckpointError"]

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
_LEGACY_PROTOCOL = 1001  # torch.serialization.PROTOCOL_VERSION


class UnsafeCheckpointError(UserError, pickle.UnpicklingError):
    """The checkpoint's pickle names something other than a state_dict's building blocks."""


@dataclass(frozen=True)
class _DType:
    """A torch element type: its NumPy storage type (bfloat16 is kept as raw uint16)."""
    name: str
    np_type: str  # NumPy type code, without byte order

    @property
    def itemsize(self) -> int:
        return np.dtype(self.np_type).itemsize


_DTYPES = {d.name: d for d in (
    _DType("float64", "f8"), _DType("float32", "f4"), _DType("float16", "f2"),
    _DType("bfloat16", "u2"), _DType("int64", "i8"), _DType("int32", "i4"),
    _DType("int16", "i2"), _DType("int8", "i1"), _DType("uint8", "u1"),
    _DType("uint16", "u2"), _DType("uint32", "u4"), _DType("uint64", "u8"),
    _DType("bool", "?"), _DType("complex64", "c8"), _DType("complex128", "c16"))}
# torch's dtype aliases pickle under their canonical names, but old files may differ
_DTYPES.update({"float": _DTYPES["float32"], "double": _DTYPES["float64"],
                "half": _DTYPES["float16"], "long": _DTYPES["int64"],
                "int": _DTYPES["int32"], "short": _DTYPES["int16"]})

# Legacy typed storages (torch.FloatStorage, ...): how every state_dict before the
# new dtypes of torch 2.x names the element type of a storage.
_STORAGE_TYPES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
    "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128"}
# Untyped storages (raw bytes) go with _rebuild_tensor_v3, which names the dtype itself.
_UNTYPED = _DType("untyped", "u1")


@dataclass(frozen=True, slots=True)
class _StorageRef:
    """A storage named by a persistent id: its record key and, for legacy views, a slice.

    `offset` and `numel` count elements of `dtype` (numel None: to the end).
    """
    key: str
    dtype: _DType
    offset: int = 0
    numel: int | None = None


@dataclass(frozen=True, slots=True)
class _TensorRef:
    """A tensor waiting for its storage's bytes (legacy files store them after the pickle)."""
    storage: _StorageRef
    offset: int
    size: tuple
    stride: tuple
    dtype: _DType


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    """torch._utils._rebuild_tensor and _v2; requires_grad, hooks, metadata don't matter."""
    return _tensor_ref(storage, storage_offset, size, stride, storage.dtype)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       dtype, metadata=None):
    """torch._utils._rebuild_tensor_v3: an untyped storage read as `dtype` (uint16, ...)."""
    if not isinstance(dtype, _DType):
        raise pickle.UnpicklingError(f"_rebuild_tensor_v3 got dtype {dtype!r}")
    return _tensor_ref(storage, storage_offset, size, stride, dtype)


def _tensor_ref(storage, offset, size, stride, dtype) -> _TensorRef:
    if not isinstance(storage, _StorageRef):
        raise pickle.UnpicklingError(f"a tensor's storage is {type(storage).__name__}, "
                                     f"not a persistent storage id")
    size, stride = tuple(size), tuple(stride)
    if not all(isinstance(v, int) for v in (offset, *size, *stride)) or len(size) != len(
            stride):
        raise pickle.UnpicklingError(f"malformed tensor geometry: offset {offset!r}, "
                                     f"size {size!r}, stride {stride!r}")
    return _TensorRef(storage, offset, size, stride, dtype)


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
    """torch._utils._rebuild_parameter(_with_state): an nn.Parameter is its data here."""
    return data


# (module, name) -> what find_class returns. Nothing here can run code: each entry builds
# a tensor placeholder, an OrderedDict, a tuple, or names an element type.
_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "Size"): lambda dims=(): tuple(dims),
    ("torch", "UntypedStorage"): _UNTYPED,
    ("torch.storage", "UntypedStorage"): _UNTYPED,
    **{("torch", name): _DTYPES[dtype] for name, dtype in _STORAGE_TYPES.items()},
    **{("torch", name): dtype for name, dtype in _DTYPES.items()},
}


class _Unpickler(pickle._Unpickler):  # Python's: its BUILD can be checked (below)
    """An Unpickler that resolves only `_ALLOWED` globals and torch's storage ids, and
    sets state (BUILD) on OrderedDicts only (a state_dict's `_metadata`): on anything
    else, BUILD wrote into the objects this module shares between loads (a dtype's
    numpy type, a function's defaults; frozen dataclasses too, through their
    `__setstate__`), so a crafted file made every later load read float32 weights as
    float16.

    Args:
      file: the binary stream positioned at a pickle.
      where: the file's name, for error messages.
      legacy: persistent ids have the legacy format's sixth item (view_metadata).

    After load(), `roots` maps each storage key to its whole (not view) storage.
    """

    def __init__(self, file: BinaryIO, where: str, legacy: bool = False):
        # utf-8 as torch.load: Python 2 pickles' str become str, not bytes
        super().__init__(file, encoding="utf-8")
        self.where = where
        self.legacy = legacy
        self.roots: dict[str, _StorageRef] = {}

    dispatch = dict(pickle._Unpickler.dispatch)

    def load_build(self) -> None:
        target = self.stack[-2]  # (the state is on top)
        if not isinstance(target, collections.OrderedDict):
            raise UnsafeCheckpointError(
                f"{self.where}: refusing to set the state of a {type(target).__name__}: a "
                f"plain state_dict sets none but its OrderedDict's; save model.state_dict()")
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except (KeyError, TypeError):
            pass
        hint = ""
        if module.startswith("torch") and name.endswith(("Storage", "qtensor")) or (
                module == "torch" and name.startswith(("float8", "qint", "quint", "bits"))):
            hint = " (a quantized or float8 tensor, which this reader does not support)"
        raise UnsafeCheckpointError(
            f"{self.where}: refusing to load global {module}.{name}{hint}: the file is not a "
            f"plain state_dict of tensors, so it is not read (its pickle could run code). "
            f"Save model.state_dict() instead of the model or other objects.")

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not isinstance(pid, tuple) or not pid:
            raise pickle.UnpicklingError(f"{self.where}: unexpected persistent id {pid!r}")
        kind = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
        if kind == "module":
            raise UnsafeCheckpointError(
                f"{self.where}: the file pickles a whole nn.Module, not a state_dict; "
                f"save model.state_dict() instead")
        expected = 6 if self.legacy else 5
        if kind != "storage" or len(pid) != expected:
            raise pickle.UnpicklingError(f"{self.where}: unexpected persistent id {pid!r}")
        dtype, key = pid[1], pid[2]
        if not isinstance(dtype, _DType):
            raise pickle.UnpicklingError(f"{self.where}: storage type {dtype!r} is not one")
        root = self.roots.setdefault(str(key), _StorageRef(str(key), dtype))
        if self.legacy and pid[5] is not None:
            # an old view into another storage: (view_key, offset, size) in elements
            _, offset, numel = pid[5]
            return _StorageRef(root.key, dtype, int(offset), int(numel))
        return root


def _geometry_error(ref: _TensorRef, n_items: int) -> str | None:
    """Why the tensor's strided view would leave its storage of n_items elements, or None.

    This guards as_strided, which would otherwise read arbitrary memory for a crafted file.
    """
    if ref.offset < 0 or any(n < 0 for n in ref.size) or any(s < 0 for s in ref.stride):
        return "negative offset, size or stride"
    if 0 in ref.size:
        return None
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride))
    return None if last < n_items else f"it needs element {last}, the storage has {n_items}"


def _to_array(ref: _TensorRef, raw: bytes, byteorder: str) -> np.ndarray:
    """One tensor as a fresh, contiguous, native-order array.

    Args:
      ref: the tensor: storage slice, offset, size and stride in elements of ref.dtype.
      raw: the whole storage record's bytes.
      byteorder: "little" or "big", the order of `raw`.
    Returns:
      ndarray of shape ref.size; bfloat16 becomes float32.
    """
    dtype = np.dtype(ref.dtype.np_type).newbyteorder("<" if byteorder == "little" else ">")
    start = ref.storage.offset * ref.storage.dtype.itemsize
    stop = len(raw) if ref.storage.numel is None else (
        start + ref.storage.numel * ref.storage.dtype.itemsize)
    if stop > len(raw):
        raise pickle.UnpicklingError(f"storage {ref.storage.key!r} has {len(raw)} bytes, a "
                                     f"view wants {stop}")
    n_items = (stop - start) // dtype.itemsize
    flat = np.frombuffer(raw, dtype, count=n_items, offset=start)
    error = _geometry_error(ref, n_items)
    if error:
        raise pickle.UnpicklingError(f"tensor of size {ref.size}, stride {ref.stride}, offset "
                                     f"{ref.offset} does not fit its storage: {error}")
    if 0 in ref.size:
        out = np.zeros(ref.size, dtype)
    else:
        view = np.lib.stride_tricks.as_strided(
            flat[ref.offset:], ref.size, [s * dtype.itemsize for s in ref.stride],
            writeable=False)
        out = np.array(view, dtype.newbyteorder("="))  # copy: frees the file's buffer
    if ref.dtype.name == "bfloat16":
        # bfloat16 is the top half of a float32: shift its bits back into place
        out = (out.astype(np.uint32) << 16).view(np.float32)
    return out


def _materialize(obj: Any, make: Callable[[_TensorRef], np.ndarray],
                 done: dict[int, Any]) -> Any:
    """Replaces every _TensorRef in obj's dicts, lists and tuples by make(ref).

    Dicts and lists are changed in place, keeping their type and attributes (a
    state_dict's OrderedDict and its `_metadata`); `done` (by id) keeps objects the
    pickle shared shared, and stops on cycles.
    """
    if id(obj) in done:
        return done[id(obj)]
    if isinstance(obj, _TensorRef):
        done[id(obj)] = out = make(obj)
        return out
    if isinstance(obj, dict):
        done[id(obj)] = obj
        for k, v in list(obj.items()):
            obj[k] = _materialize(v, make, done)
    elif isinstance(obj, list):
        done[id(obj)] = obj
        obj[:] = [_materialize(v, make, done) for v in obj]
    elif isinstance(obj, tuple):
        done[id(obj)] = out = tuple(_materialize(v, make, done) for v in obj)
        return out
    return obj


def _zip_archive_prefix(zf: zipfile.ZipFile, where: str) -> str:
    """The archive folder holding data.pkl, e.g. "resnet18/" (torch names it after the file)."""
    prefixes = [n[:-len("data.pkl")] for n in zf.namelist()
                if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(prefixes) == 1:
        return prefixes[0]
    if any(n.endswith("constants.pkl") for n in zf.namelist()):
        raise UnsafeCheckpointError(f"{where} is a TorchScript archive (torch.jit.save), not "
                                    f"a state_dict saved with torch.save")
    raise pickle.UnpicklingError(f"{where} is a zip file but not a torch.save checkpoint "
                                 f"(it has {len(prefixes)} <folder>/data.pkl records)")


def _read_zip(f: BinaryIO, where: str) -> Any:
    with zipfile.ZipFile(f) as zf:
        prefix = _zip_archive_prefix(zf, where)
        byteorder = "little"
        if prefix + "byteorder" in zf.namelist():
            byteorder = zf.read(prefix + "byteorder").decode("ascii").strip()
            if byteorder not in ("little", "big"):
                raise pickle.UnpicklingError(f"{where}: unknown byte order {byteorder!r}")
        with zf.open(prefix + "data.pkl") as pkl:
            obj = _Unpickler(pkl, where).load()
        records: dict[str, bytes] = {}  # each storage read once, however many views

        def make(ref: _TensorRef) -> np.ndarray:
            key = ref.storage.key
            if key not in records:
                try:
                    records[key] = zf.read(f"{prefix}data/{key}")
                except KeyError:
                    raise pickle.UnpicklingError(f"{where}: storage record data/{key} is "
                                                 f"missing") from None
            return _to_array(ref, records[key], byteorder)

        return _materialize(obj, make, {})


def _read_legacy(f: BinaryIO, where: str) -> Any:
    # the header pickles hold plain values: any global in them is refused too
    try:
        magic = _Unpickler(f, where).load()
    except UnsafeCheckpointError:
        raise
    except Exception as err:  # garbage makes pickle raise anything from EOFError to KeyError
        raise pickle.UnpicklingError(f"{where} is neither a zip nor a legacy torch.save "
                                     f"checkpoint (no pickle at its start)") from err
    if magic != _LEGACY_MAGIC:
        raise pickle.UnpicklingError(f"{where} is neither a zip nor a legacy torch.save "
                                     f"checkpoint (magic number {magic!r})")
    protocol = _Unpickler(f, where).load()
    if protocol != _LEGACY_PROTOCOL:
        raise pickle.UnpicklingError(f"{where}: legacy protocol version {protocol!r}, "
                                     f"expected {_LEGACY_PROTOCOL}")
    sys_info = _Unpickler(f, where).load()
    if not (isinstance(sys_info, dict) and sys_info.get("little_endian", True)):
        # torch wrote storages little-endian in any case, but a big-endian sys_info on an
        # old file means pickle-level sizes we have never seen: refuse rather than guess
        raise pickle.UnpicklingError(f"{where}: unsupported sys_info {sys_info!r}")
    unpickler = _Unpickler(f, where, legacy=True)
    obj = unpickler.load()
    keys = _Unpickler(f, where).load()
    if not isinstance(keys, list) or set(map(str, keys)) != set(unpickler.roots):
        raise pickle.UnpicklingError(f"{where}: the storage keys {keys!r} are not those the "
                                     f"pickle uses")
    records: dict[str, bytes] = {}
    for key in map(str, keys):
        # storages follow in the order of `keys`: int64 element count (of the storage's
        # element type, hence the roots' dtypes), then the bytes, always little-endian
        (count,) = struct.unpack("<q", _read_exact(f, 8, where))
        records[key] = _read_exact(f, count * unpickler.roots[key].dtype.itemsize, where)

    def make(ref: _TensorRef) -> np.ndarray:
        if ref.storage.key not in records:
            raise pickle.UnpicklingError(f"{where}: storage {ref.storage.key!r} is missing")
        return _to_array(ref, records[ref.storage.key], "little")

    return _materialize(obj, make, {})


def _read_exact(f: BinaryIO, n: int, where: str) -> bytes:
    data = f.read(n)
    if n < 0 or len(data) != n:
        raise pickle.UnpicklingError(f"{where} is truncated")
    return data


def read_pth(path_or_fileobj: str | os.PathLike | BinaryIO) -> Any:
    """Reads a `torch.save`d checkpoint with NumPy arrays in place of tensors; no torch needed.

    Args:
      path_or_fileobj: a path, or a binary file object (read from its current position).
    Returns:
      The saved object as pickled - usually an OrderedDict {key: ndarray} - with each
      tensor a fresh ndarray of its dtype (bfloat16 as float32) and shape; see
      `state_dict_arrays` to unwrap {"state_dict": ...}.
    Raises:
      UnsafeCheckpointError: the pickle names anything but a state_dict's building blocks
        (a pickled model or optimizer object, or a malicious file); nothing of it is run.
      pickle.UnpicklingError: not a torch checkpoint, truncated, or inconsistent.
    """
    if isinstance(path_or_fileobj, (str, os.PathLike)):
        with open(path_or_fileobj, "rb") as f:
            return _read(f, os.fspath(path_or_fileobj))
    f = path_or_fileobj
    if not (hasattr(f, "seekable") and f.seekable()):
        f = io.BytesIO(f.read())  # zipfile needs to seek
    return _read(f, getattr(path_or_fileobj, "name", "<file object>"))


def _read(f: BinaryIO, where: str) -> Any:
    start = f.tell()
    head = f.read(4)
    f.seek(start)
    if head == b"PK\x03\x04":
        return _read_zip(f, where)
    return _read_legacy(f, where)


def state_dict_arrays(obj: Any) -> dict[str, np.ndarray]:
    """The {key: ndarray} state_dict in what `read_pth` returned.

    Unwraps a checkpoint that holds its state_dict under one of `WRAPPER_KEYS`
    ({"state_dict": ...}: PyTorch Lightning; {"model": ...}, {"model_state_dict": ...},
    {"net": ...}: many training scripts) and drops non-array entries (e.g. a saved
    epoch). Key prefixes such as DataParallel's "module." are left to the caller.

    Raises:
      ValueError: no state_dict in it (another object; or arrays only under other
        keys, which it names).
    """
    while isinstance(obj, Mapping) and not any(isinstance(v, np.ndarray) for v in obj.values()):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:  # (a level that holds arrays is the state_dict: {"model": its
            break  # name} beside them is no wrapper)
        obj = inner
    if not isinstance(obj, Mapping):
        raise ValueError(f"the checkpoint holds a {type(obj).__name__}, not a state_dict")
    arrays = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, np.ndarray)}
    nested = [repr(k) for k, v in obj.items() if isinstance(v, Mapping) and v]
    if not arrays and nested:
        raise ValueError(f"the checkpoint holds no array at its top, only entries "
                         f"{', '.join(nested[:5])}, none of them one fsad unwraps "
                         f"({', '.join(map(repr, WRAPPER_KEYS))}); save the model's "
                         f"state_dict alone (torch.save(ckpt[KEY], path))")
    return arrays


# where training scripts keep the model's state_dict inside a checkpoint, looked for in
# this order
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net")
