"""Read a PyTorch checkpoint (what `torch.save(state_dict, f)` writes) into NumPy arrays.

What this is: `read_checkpoint(path)` returns the state dict as an ordered `dict` from key
(`Mixed_5b.branch1x1.conv.weight`) to a fresh, C-contiguous `numpy.ndarray`. It never imports
torch and never runs code from the file. What this is not: a general `torch.load`. Only plain
dense tensors of ten dtypes are understood; whole pickled `nn.Module`s, TorchScript archives,
and quantized, sparse, complex or float8 tensors are refused with a `CheckpointError`.
Turning the arrays into pyincept weights (key and shape checks) is `npz.py`'s and `convert.py`'s job.

A checkpoint is a pickle that describes the object, plus the raw bytes of every tensor's
*storage*: the flat buffer a tensor views through an element offset, a shape and strides
(several tensors may view one storage). In the pickle a storage is a *persistent id*, a
tuple torch's pickler writes in place of the bytes, and each tensor is a call to
`torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad,
backward_hooks[, metadata])`. Two layouts carry that pickle (torch/serialization.py, `_save`
and `_legacy_save`):

* zip (the default since torch 1.6): an uncompressed zip whose records all sit under one top
  folder, named after the file when it was saved (so, arbitrary): `<top>/data.pkl` is the
  pickle, `<top>/data/<key>` holds one storage's bytes, `<top>/byteorder` says `little` or
  `big` (absent means little). Persistent id: `('storage', storage_type, key, location, numel)`.
* legacy (`_use_new_zipfile_serialization=False`): pickles back to back in one stream: the
  magic number 0x1950A86A20F9469CFC6C, the protocol version 1001, a sys_info dict, the object,
  then the sorted list of storage keys; after that, for each key in that order, an 8-byte
  little-endian element count and the storage's bytes, always little-endian. Persistent id:
  `('storage', storage_type, key, location, numel, view_metadata)`.

Why a restricted unpickler: unpickling *executes* the file. A pickle may name any importable
callable (`os.system`, `builtins.exec`) and its REDUCE opcode calls it with arguments of the
file's choosing, so `pickle.load` of a downloaded checkpoint runs a stranger's program. Here
`find_class` maps a closed list of globals to harmless stand-ins of our own and refuses every
other name, so nothing outside this module is reachable. The stand-ins only record what the
pickle asks for; arrays are built afterwards, once the storages are read, with every offset
and stride checked against the storage it views.
"""

import collections
import io
import lzma
import os
import pickle
import pickletools
import struct
import zipfile
import zlib
from typing import NamedTuple

import numpy as np

from pyincept.errors import CheckpointError

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001

# The storage class torch pickles for each tensor dtype, and the NumPy dtype of its bytes.
# NumPy has no bfloat16: its 16-bit patterns are read as uint16 and widened to float32.
STORAGE_DTYPES = {
    "FloatStorage": "f4",
    "DoubleStorage": "f8",
    "HalfStorage": "f2",
    "BFloat16Storage": "u2",
    "LongStorage": "i8",
    "IntStorage": "i4",
    "ShortStorage": "i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "u1",
}

# What pickle, zipfile, zlib, lzma, struct and NumPy raise on malformed bytes. Any of these
# while parsing means a bad file, which the caller hears about as one CheckpointError.
_MALFORMED_FILE_ERRORS = (
    pickle.UnpicklingError, zipfile.BadZipFile, zlib.error, lzma.LZMAError, struct.error,
    EOFError, OSError, ValueError, TypeError, KeyError, IndexError, AttributeError,
    OverflowError, RuntimeError, MemoryError,
)


class _Malformed(Exception):
    """A bad file, with a message that does not yet name the file."""


class _RefusedGlobal(_Malformed):
    """The pickle asked for a global outside the allowed list."""


# The pickle's BUILD opcode can set attributes on any object it holds. These records are
# NamedTuples, which have neither a __dict__ nor settable fields, so BUILD cannot alter them.
class _StorageType(NamedTuple):
    """Stand-in for `torch.FloatStorage` and friends: only the name matters."""

    name: str


class _StorageRef(NamedTuple):
    """One storage the pickle refers to; its bytes are read later, from the zip or the legacy file."""

    key: str
    storage_type: _StorageType
    numel: int


class _TensorRecord(NamedTuple):
    """What `_rebuild_tensor_v2` was asked to build, kept until the storages are read."""

    storage: _StorageRef
    offset: int
    size: tuple
    stride: tuple
    negated: bool


def _is_count(value):
    return type(value) is int and value >= 0


# The allowed functions take *args, not named parameters: BUILD can also setattr on a
# function, and a `__defaults__` planted by one file would outlive it and change how the
# next file is read. A function without named parameters has no defaults to plant.
def _rebuild_tensor_v2(*args):
    """(storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])."""
    if len(args) not in (6, 7):
        raise _Malformed(f"_rebuild_tensor_v2 called with {len(args)} arguments")
    storage, offset, size, stride = args[:4]
    if not isinstance(storage, _StorageRef):
        raise _Malformed("tensor without a storage")
    if not (_is_count(offset) and isinstance(size, tuple) and isinstance(stride, tuple)
            and len(size) == len(stride) and all(map(_is_count, size + stride))):
        raise _Malformed("tensor with a malformed offset, shape or stride")
    # torch adds metadata only for lazy views: {'neg': True} marks a `_neg_view`, whose
    # storage holds the negatives of its values. Conjugate views need complex dtypes.
    metadata = args[6] if len(args) == 7 else {}
    if not (isinstance(metadata, dict) and set(metadata) <= {"neg"}):
        raise _Malformed("unsupported tensor metadata (only 'neg' is understood)")
    return _TensorRecord(storage, offset, size, stride, metadata.get("neg") is True)


def _rebuild_parameter(*args):
    """(data, requires_grad, backward_hooks[, state]): a Parameter is its tensor plus autograd flags."""
    if len(args) not in (3, 4) or not isinstance(args[0], _TensorRecord):
        raise _Malformed("malformed parameter")
    return args[0]


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only `_ALLOWED_GLOBALS` and the storage types of `STORAGE_DTYPES`.

    `stream` is an in-memory `io.BytesIO`, so a corrupt length asks it for more bytes than
    it has and fails, where a file read would allocate first. `storage_id_fields` is the
    length of a storage's persistent id (5 zip, 6 legacy), or None for the small legacy
    pickles, which must not refer to storages at all.
    """

    def __init__(self, stream, storage_id_fields=None):
        super().__init__(stream)
        self.stream = stream
        self.storage_id_fields = storage_id_fields
        self.storages = {}  # key -> _StorageRef, so tensors sharing a storage share one ref

    def load(self):
        # A dry run first: pickletools walks the opcodes without acting on them. CPython's
        # unpickler grows its memo to the largest index a PUT names, so one corrupt byte could
        # ask for gigabytes. A genuine index is smaller than the pickle itself (a PUT takes
        # at least two bytes), and the dry run also stops a truncated or garbled pickle early.
        start = self.stream.tell()
        for opcode, argument, position in pickletools.genops(self.stream):
            if opcode.name in ("PUT", "BINPUT", "LONG_BINPUT") and int(argument) > position - start:
                raise _Malformed(f"corrupt pickle (memo index {int(argument)} at byte {position})")
        self.stream.seek(start)
        return super().load()

    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[module, name]
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        if module in ("torch", "torch.storage") and name.endswith("Storage"):
            raise _Malformed(f"unsupported tensor dtype (storage type 'torch.{name}')")
        if (module, name) == ("torch._utils", "_rebuild_tensor_v3"):
            # torch pickles dtypes without a storage class of their own this way (uint16/32/64, float8)
            raise _Malformed("unsupported tensor dtype (a tensor written by _rebuild_tensor_v3)")
        raise _RefusedGlobal(f"refused pickle global '{module}.{name}'")

    def persistent_load(self, pid):
        if not (self.storage_id_fields and isinstance(pid, tuple)
                and len(pid) == self.storage_id_fields and pid[0] == "storage"):
            raise _Malformed(f"unexpected persistent id of type {type(pid).__name__}")
        # The location ('cpu', 'cuda:0') says where torch would put the bytes; ours go to NumPy.
        _, storage_type, key, _location, numel = pid[:5]
        if not (isinstance(storage_type, _StorageType) and isinstance(key, str) and _is_count(numel)):
            raise _Malformed("malformed storage persistent id")
        if len(pid) == 6 and pid[5] is not None:
            raise _Malformed("legacy storage views are not supported")  # torch >= 1.0 never writes one
        ref = self.storages.setdefault(key, _StorageRef(key, storage_type, numel))
        if ref != (key, storage_type, numel):
            raise _Malformed(f"storage {key!r} is declared twice with different dtypes or sizes")
        return ref


def _storage_nbytes(ref):
    return ref.numel * np.dtype(STORAGE_DTYPES[ref.storage_type.name]).itemsize


def _read_zip(archive):
    """Unpickle `<top>/data.pkl`; return (object, function from _StorageRef to bytes, byte order)."""
    names = archive.namelist()
    top = names[0].split("/", 1)[0] if names else ""  # as torch's reader: the first record's folder
    if f"{top}/data.pkl" not in names:
        raise _Malformed("not a PyTorch checkpoint (a zip archive without data.pkl)")
    byteorder = "little"
    if f"{top}/byteorder" in names:
        byteorder = archive.read(f"{top}/byteorder").decode("ascii", "replace")
        if byteorder not in ("little", "big"):
            raise _Malformed(f"unknown byte order {byteorder[:20]!r}")
    obj = _RestrictedUnpickler(io.BytesIO(archive.read(f"{top}/data.pkl")), storage_id_fields=5).load()

    def storage_bytes(ref):
        name = f"{top}/data/{ref.key}"
        if name not in names:
            raise _Malformed(f"missing storage record 'data/{ref.key}'")
        nbytes = archive.getinfo(name).file_size
        if nbytes != _storage_nbytes(ref):
            raise _Malformed(f"storage record 'data/{ref.key}' holds {nbytes} bytes, "
                             f"the pickle declares {_storage_nbytes(ref)}")
        return archive.read(name)

    return obj, storage_bytes, byteorder


def _read_legacy(blob):
    """Parse the legacy format from the file's bytes; return as `_read_zip` does."""
    stream = io.BytesIO(blob)
    try:
        magic_number = _RestrictedUnpickler(stream).load()
    except _RefusedGlobal:
        raise
    except (_Malformed, *_MALFORMED_FILE_ERRORS):
        magic_number = None  # not even a pickle
    if not (type(magic_number) is int and magic_number == LEGACY_MAGIC_NUMBER):
        raise _Malformed("not a PyTorch checkpoint (neither a zip archive nor torch's legacy format)")
    protocol_version = _RestrictedUnpickler(stream).load()
    if not (type(protocol_version) is int and protocol_version == LEGACY_PROTOCOL_VERSION):
        raise _Malformed(f"unsupported legacy protocol version {protocol_version!r:.40}")
    _RestrictedUnpickler(stream).load()  # sys_info: C type sizes from the Python 2 days; unused
    unpickler = _RestrictedUnpickler(stream, storage_id_fields=6)
    obj = unpickler.load()
    keys = _RestrictedUnpickler(stream).load()
    if not (isinstance(keys, list) and all(isinstance(key, str) for key in keys)):
        raise _Malformed("malformed list of storage keys")

    # The storages follow in the order of `keys`, each an element count and its bytes.
    data = {}
    for key in keys:
        if key not in unpickler.storages:
            raise _Malformed(f"storage {key!r} is listed but no tensor uses it")
        ref = unpickler.storages[key]
        (numel,) = struct.unpack("<q", stream.read(8))
        if numel != ref.numel:
            raise _Malformed(f"storage {key!r} holds {numel} elements, the pickle declares {ref.numel}")
        start, end = stream.tell(), stream.tell() + _storage_nbytes(ref)
        if end > len(blob):
            raise _Malformed(f"truncated: storage {key!r} needs {end - start} bytes, "
                             f"the file has {len(blob) - start}")
        data[key] = memoryview(blob)[start:end]  # a window on the file's bytes, not a copy
        stream.seek(end)

    def storage_bytes(ref):
        if ref.key not in data:
            raise _Malformed(f"missing storage {ref.key!r}")
        return data[ref.key]

    return obj, storage_bytes, "little"


def _find_state_dict(obj):
    """The dict of name -> tensor in the checkpoint, unwrapping {'state_dict': ...} or {'model': ...}."""

    def is_tensor_dict(value):
        return isinstance(value, dict) and all(
            isinstance(key, str) and isinstance(tensor, _TensorRecord) for key, tensor in value.items())

    if is_tensor_dict(obj):
        return obj
    if isinstance(obj, dict):
        for wrapper in ("state_dict", "model"):
            if is_tensor_dict(obj.get(wrapper)):
                return obj[wrapper]
        raise _Malformed("not a state dict (a dict whose values are not all tensors)")
    raise _Malformed(f"not a state dict (the checkpoint holds a {type(obj).__name__})")


def _to_numpy(name, record, raw, byteorder):
    """A fresh C-contiguous array of the elements `record` views in the storage bytes `raw`."""
    storage_type = record.storage.storage_type.name
    dtype = np.dtype(STORAGE_DTYPES[storage_type]).newbyteorder("<" if byteorder == "little" else ">")
    if 0 in record.size:
        values = np.empty(record.size, dtype=dtype)
    else:
        # Element offset + sum((size - 1) * stride) is the last element the tensor reads;
        # with no negative strides (checked on unpickling) it bounds every element read.
        last = record.offset + sum((n - 1) * step for n, step in zip(record.size, record.stride))
        if last >= record.storage.numel:
            raise _Malformed(f"tensor {name!r} reaches element {last} of a storage "
                             f"holding {record.storage.numel}")
        elements = np.frombuffer(raw, dtype=dtype, count=record.storage.numel)
        view = np.lib.stride_tricks.as_strided(
            elements[record.offset:], shape=record.size,
            strides=[step * dtype.itemsize for step in record.stride], writeable=False)
        values = np.array(view, order="C")  # a copy: the caller owns it, whatever it viewed
    values = values.astype(dtype.newbyteorder("="), copy=False)
    if storage_type == "BFloat16Storage":
        # bfloat16 is the top half of a float32: shift the 16 bits up and reinterpret.
        values = (values.astype(np.uint32) << 16).view(np.float32)
    elif storage_type == "BoolStorage":
        values = values != 0
    if record.negated:
        values = -values
    return np.asarray(values)  # NumPy returns scalars from 0-d arithmetic; keep an array


def _arrays_from(obj, storage_bytes, byteorder):
    state_dict = _find_state_dict(obj)
    raw = {}  # each storage is read once, however many tensors view it
    for record in state_dict.values():
        if record.storage not in raw:
            raw[record.storage] = storage_bytes(record.storage)
    return {name: _to_numpy(name, record, raw[record.storage], byteorder)
            for name, record in state_dict.items()}


def read_checkpoint(path):
    """Read a `torch.save`d state dict into an ordered dict of name -> numpy.ndarray.

    Raises `CheckpointError`, with a one-line message naming the file, for anything that is
    not a readable checkpoint of plain tensors: a missing, empty, truncated or corrupt file,
    an unsupported dtype, or any pickle global outside the allowed list.
    """
    path = os.fspath(path)
    try:
        file = open(path, "rb")
    except OSError as error:
        raise CheckpointError(f"{path}: cannot open checkpoint: {error.strerror or error}") from error
    file_kind = "checkpoint"
    try:
        with file:
            head = file.read(4)
            if not head:
                raise _Malformed("empty file, not a PyTorch checkpoint")
            file.seek(0)
            # Every zip starts with a 'PK' signature. Sniff it, so that a truncated zip, whose
            # directory at the end is gone, is reported as a broken zip and not as garbage.
            if head.startswith(b"PK"):
                file_kind = "zip checkpoint"
                with zipfile.ZipFile(file) as archive:
                    return _arrays_from(*_read_zip(archive))
            file_kind = "legacy checkpoint"
            return _arrays_from(*_read_legacy(file.read()))
    except _Malformed as error:
        cause, message = error, f"{path}: {error}"
    except _MALFORMED_FILE_ERRORS as error:
        cause, message = error, f"{path}: truncated or corrupt {file_kind} ({type(error).__name__}: {error})"
    raise CheckpointError(" ".join(message.splitlines())) from cause
