"""Tests for pyincept.checkpoint: torch writes the files, torch's `.numpy()` is the oracle.

Covers both layouts torch.save writes (zip and legacy), every supported dtype and tensor
layout (views, offsets, shared storages, 0-d, empty), a real torchvision state dict, refusal
of malicious pickles (with a payload that would leave a marker file if it ever ran), and
corrupt or truncated files, which must all raise CheckpointError with a one-line message.
Files torch itself would never write (a big-endian zip, a storage shorter than its tensor)
are built by `write_zip` / `write_legacy` below from fake tensors and storages.
"""

import builtins
import collections
import io
import os
import pickle
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
import torchvision
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyincept.io import checkpoint
from pyincept.io.checkpoint import LEGACY_MAGIC_NUMBER, LEGACY_PROTOCOL_VERSION, read_checkpoint
from pyincept.errors import CheckpointError

FORMATS = ["zip", "legacy"]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
          torch.int16, torch.int8, torch.uint8, torch.bool]
fuzz_settings = settings(max_examples=150, deadline=None,
                         suppress_health_check=[HealthCheck.function_scoped_fixture])


def save(obj, path, fmt):
    torch.save(obj, path, _use_new_zipfile_serialization=(fmt == "zip"))
    return path


def expected(tensor):
    """What read_checkpoint should return for `tensor`: bfloat16 as float32, views resolved."""
    tensor = tensor.detach().resolve_neg()
    return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()


def random_tensor(dtype, shape, generator):
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=generator, dtype=torch.float64) * 100).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -10**6), min(info.max, 10**6) + 1, shape, generator=generator, dtype=dtype)


def assert_same_state(got, state):
    assert list(got) == list(state)
    for key, tensor in state.items():
        want = expected(tensor)
        assert isinstance(got[key], np.ndarray), key
        assert got[key].dtype == want.dtype and got[key].shape == want.shape, key
        assert got[key].flags.c_contiguous and got[key].flags.writeable, key
        np.testing.assert_array_equal(got[key], want, err_msg=key)


def assert_checkpoint_error(path, *fragments):
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message
    assert os.path.basename(path) in message
    for fragment in fragments:
        assert fragment in message
    return message


# --- round trips through torch.save ------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_dtype_and_layout_round_trips(tmp_path, fmt):
    generator = torch.Generator().manual_seed(0)
    state = collections.OrderedDict()
    for dtype in DTYPES:
        name = str(dtype).removeprefix("torch.")
        state[f"{name}.matrix"] = random_tensor(dtype, (3, 5), generator)
        state[f"{name}.scalar"] = random_tensor(dtype, (), generator)
        state[f"{name}.empty"] = random_tensor(dtype, (0, 4), generator)
    base = torch.arange(24, dtype=torch.float32)
    state["shared.whole"] = base                          # these four view one storage
    state["shared.offset"] = base[5:11]                   # storage_offset 5
    state["shared.transposed"] = base.view(4, 6).t()      # non-contiguous strides (1, 6)
    state["shared.strided"] = base.view(4, 6)[1:, ::2]    # offset and a step
    state["negated"] = torch.tensor([1.5, -2.0])._neg_view()  # pickled with metadata {'neg': True}
    state["parameter"] = torch.nn.Parameter(torch.ones(2, 2))
    state["num_batches_tracked"] = torch.tensor(7)
    got = read_checkpoint(save(state, tmp_path / "state.pt", fmt))
    assert_same_state(got, state)
    arrays = list(got.values())                           # fresh arrays, even where storages were shared
    assert not any(np.shares_memory(a, b) for i, a in enumerate(arrays) for b in arrays[i + 1:])


@st.composite
def tensor_layouts(draw):
    """A random tensor seen through a random layout: contiguous, permuted, sliced with an offset and step."""
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.integers(0, 5), max_size=4))
    tensor = random_tensor(dtype, shape, torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1))))
    if len(shape) >= 2 and draw(st.booleans()):
        tensor = tensor.transpose(0, -1)
    if tensor.dim() >= 1 and tensor.shape[0] >= 2 and draw(st.booleans()):
        tensor = tensor[draw(st.integers(0, 1))::draw(st.integers(1, 2))]
    return tensor


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tensors=st.lists(tensor_layouts(), min_size=1, max_size=4), fmt=st.sampled_from(FORMATS))
def test_random_tensors_round_trip(tmp_path, tensors, fmt):
    state = {f"t{i}": tensor for i, tensor in enumerate(tensors)}
    assert_same_state(read_checkpoint(save(state, tmp_path / "random.pt", fmt)), state)


@pytest.fixture(scope="module")
def inception_state():
    return torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict()


@pytest.mark.parametrize("fmt", FORMATS)
def test_torchvision_inception_v3_round_trips(tmp_path, inception_state, fmt):
    got = read_checkpoint(save(inception_state, tmp_path / "inception_v3.pth", fmt))
    assert "Mixed_5b.branch1x1.conv.weight" in got and "AuxLogits.fc.weight" in got
    assert_same_state(got, inception_state)


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_training_checkpoint_is_unwrapped(tmp_path, wrapper):
    state = {"fc.weight": torch.randn(2, 3)}
    got = read_checkpoint(save({"epoch": 3, wrapper: state, "best_acc": 0.5}, tmp_path / "train.pt", "zip"))
    assert_same_state(got, state)


@pytest.mark.parametrize("obj", [[torch.zeros(2)], 3, {"fc.weight": torch.zeros(2), "epoch": 3}])
def test_anything_but_a_dict_of_tensors_is_not_a_state_dict(tmp_path, obj):
    assert_checkpoint_error(save(obj, tmp_path / "other.pt", "zip"), "not a state dict")


@pytest.mark.parametrize("dtype", [torch.complex64, torch.uint16, torch.float8_e4m3fn])
def test_unsupported_dtype(tmp_path, dtype):
    path = save({"w": torch.zeros(2, dtype=dtype)}, tmp_path / "odd.pt", "zip")
    assert_checkpoint_error(path, "unsupported tensor dtype")


# --- hand-built files: what torch would not write, but a file might say ------------------


class FakeStorage:
    """Pickled as a storage persistent id; `data` goes into the zip record or the legacy byte section."""

    def __init__(self, key, data, storage_type=torch.FloatStorage, numel=None, view=None):
        self.key, self.data, self.storage_type, self.view = key, data, storage_type, view
        self.numel = len(data) // 4 if numel is None else numel


class FakeTensor:
    """Pickles as `_rebuild_tensor_v2(storage, ...)`, with an optional BUILD state."""

    def __init__(self, storage, offset, size, stride, state=None):
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())
        self.state = state

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, self.args) + ((self.state,) if self.state else ())


def pickle_with_storages(obj, legacy):
    class StoragePickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, FakeStorage):
                return ("storage", obj.storage_type, obj.key, "cpu", obj.numel) + ((obj.view,) if legacy else ())
            return None

    buffer = io.BytesIO()
    StoragePickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def write_zip(path, obj, storages, top="archive", byteorder="little"):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{top}/data.pkl", pickle_with_storages(obj, legacy=False))
        if byteorder:
            archive.writestr(f"{top}/byteorder", byteorder)
        for storage in storages:
            archive.writestr(f"{top}/data/{storage.key}", storage.data)
        archive.writestr(f"{top}/version", "3\n")
    return path


def write_legacy(path, obj, storages):
    with open(path, "wb") as file:
        for header in (LEGACY_MAGIC_NUMBER, LEGACY_PROTOCOL_VERSION, {"little_endian": True}):
            pickle.dump(header, file, protocol=2)
        file.write(pickle_with_storages(obj, legacy=True))
        pickle.dump(sorted(s.key for s in storages), file, protocol=2)
        for storage in sorted(storages, key=lambda s: s.key):
            file.write(struct.pack("<q", storage.numel) + storage.data)
    return path


@pytest.mark.parametrize("write", [write_zip, write_legacy, lambda *a: write_zip(*a, byteorder=None)])
def test_hand_built_files_read_like_torch_reads_them(tmp_path, write):
    storage = FakeStorage("7", np.arange(8, dtype="<f4").tobytes())
    state = {"a": FakeTensor(storage, 2, (2, 3), (1, 2)), "b": FakeTensor(storage, 0, (), ())}
    path = write(tmp_path / "hand.pt", state, [storage])
    assert_same_state(read_checkpoint(path), torch.load(path, weights_only=False))


def test_big_endian_zip_with_any_top_folder(tmp_path):
    values = np.arange(6, dtype=">f4")
    storage = FakeStorage("0", values.tobytes())
    path = write_zip(tmp_path / "big.pt", {"w": FakeTensor(storage, 1, (2, 2), (1, 2))}, [storage],
                     top="renamed_after_saving", byteorder="big")
    want = torch.load(path, weights_only=True)["w"].numpy()  # torch agrees on the layout
    np.testing.assert_array_equal(read_checkpoint(path)["w"], want)
    np.testing.assert_array_equal(want, [[1, 3], [2, 4]])


@pytest.mark.parametrize("write", [write_zip, write_legacy])
def test_tensor_reaching_past_its_storage(tmp_path, write):
    storage = FakeStorage("0", np.zeros(4, "<f4").tobytes())
    path = write(tmp_path / "short.pt", {"w": FakeTensor(storage, 1, (2, 2), (2, 1))}, [storage])
    assert_checkpoint_error(path, "'w' reaches element 4 of a storage holding 4")


def test_storage_shorter_than_declared(tmp_path):
    storage = FakeStorage("0", np.zeros(4, "<f4").tobytes(), numel=9)
    path = write_zip(tmp_path / "declared.pt", {"w": FakeTensor(storage, 0, (4,), (1,))}, [storage])
    assert_checkpoint_error(path, "storage record 'data/0' holds 16 bytes")


def test_build_opcode_cannot_alter_a_tensor(tmp_path):
    storage = FakeStorage("0", np.zeros(4, "<f4").tobytes())
    tensor = FakeTensor(storage, 0, (4,), (1,), state=(None, {"offset": -8}))
    assert_checkpoint_error(write_zip(tmp_path / "build.pt", {"w": tensor}, [storage]), "corrupt")


def test_legacy_storage_views_are_refused(tmp_path):
    # torch >= 1.0 always writes view_metadata=None; older files could name a slice of a storage.
    storage = FakeStorage("0", np.zeros(4, "<f4").tobytes(), view=("view0", 1, 2))
    path = write_legacy(tmp_path / "view.pt", {"w": FakeTensor(storage, 0, (2,), (1,))}, [storage])
    assert_checkpoint_error(path, "legacy storage views are not supported")


# --- malicious pickles: refused, and never run -------------------------------------------


class RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class RunsPython:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",))


# Pickle protocol 2, which torch.save uses, writes Python 2's name for the builtins module.
PAYLOADS = {RunsShell: f"'{os.system.__module__}.system'", RunsPython: "'__builtin__.exec'"}


@pytest.mark.parametrize("payload", PAYLOADS)
def test_payloads_are_live(tmp_path, payload):
    """The payloads below really run under a plain pickle.loads, so their refusal means something."""
    marker = tmp_path / "MARKER"
    pickle.loads(pickle.dumps(payload(marker), protocol=2))
    assert marker.exists()


@pytest.mark.parametrize("payload", PAYLOADS)
@pytest.mark.parametrize("container", ["zip", "legacy", "bare pickle"])
def test_malicious_pickle_is_refused_and_never_run(tmp_path, payload, container):
    marker = tmp_path / "MARKER"
    state = {"evil": payload(marker), "fc.weight": torch.zeros(2)}
    path = tmp_path / "evil.pt"
    if container == "bare pickle":
        path.write_bytes(pickle.dumps(state, protocol=2))
    else:
        save(state, path, container)
    assert_checkpoint_error(path, f"refused pickle global {PAYLOADS[payload]}")
    assert not marker.exists()


def test_build_cannot_plant_defaults_for_later_files(tmp_path):
    # GLOBAL _rebuild_tensor_v2, then BUILD (None, {'__defaults__': ({'neg': True},)}) on it.
    evil = (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nN}X\x0c\x00\x00\x00__defaults__"
            b"}X\x03\x00\x00\x00neg\x88s\x85s\x86b.")
    (tmp_path / "plant.pt").write_bytes(evil)
    try:
        with pytest.raises(CheckpointError):
            read_checkpoint(tmp_path / "plant.pt")
        state = {"w": torch.tensor([1.0, 2.0])}  # saved without metadata: a planted default would apply
        assert_same_state(read_checkpoint(save(state, tmp_path / "clean.pt", "zip")), state)
    finally:
        checkpoint._rebuild_tensor_v2.__defaults__ = None


# --- corrupt, truncated and foreign files ------------------------------------------------


@pytest.fixture(scope="module")
def small_checkpoints(tmp_path_factory):
    """{'zip': bytes, 'legacy': bytes, 'data.pkl': the zip's pickle} of a small state dict with several storages."""
    folder = tmp_path_factory.mktemp("small")
    generator = torch.Generator().manual_seed(1)
    state = {"conv.weight": torch.randn(4, 3, 3, 3, generator=generator), "bn.running_mean": torch.randn(4),
             "bn.num_batches_tracked": torch.tensor(5), "fc.bias": torch.randn(10).half()}
    blobs = {fmt: save(state, folder / f"small_{fmt}.pt", fmt).read_bytes() for fmt in FORMATS}
    blobs["data.pkl"] = zipfile.ZipFile(io.BytesIO(blobs["zip"])).read("small_zip/data.pkl")
    return blobs


def foreign_files(small):
    """(name, bytes or None) for every kind of bad file; None means the path does not exist."""
    npz = io.BytesIO()
    np.savez(npz, w=np.zeros(3))
    zipped = zipfile.ZipFile(io.BytesIO(small["zip"]))
    without_storage = io.BytesIO()
    with zipfile.ZipFile(without_storage, "w") as out:
        for info in zipped.infolist():
            if not info.filename.endswith("/data/0"):
                out.writestr(info, zipped.read(info))
    cases = [("missing.pt", None), ("empty.pt", b""), ("random.pt", np.random.default_rng(0).bytes(4096)),
             ("notes.txt", b"these are not weights\n" * 20), ("weights.npz", npz.getvalue()),
             ("plain_pickle.pkl", pickle.dumps({"a": 1}, protocol=2)),
             ("no_storage_0.pt", without_storage.getvalue())]
    for fmt in FORMATS:
        for fraction in (0.1, 0.5, 0.99):
            cases.append((f"{fmt}_cut_{int(fraction * 100)}.pt", small[fmt][: int(len(small[fmt]) * fraction)]))
    return cases


def test_corrupt_files_raise_one_line_errors(tmp_path, small_checkpoints):
    messages = {}
    for name, blob in foreign_files(small_checkpoints):
        if blob is not None:
            (tmp_path / name).write_bytes(blob)
        messages[name] = assert_checkpoint_error(str(tmp_path / name))
    assert "no such file" in messages["missing.pt"].lower()
    assert "empty file" in messages["empty.pt"]
    assert "without data.pkl" in messages["weights.npz"]
    assert "missing storage record 'data/0'" in messages["no_storage_0.pt"]
    for name in ("random.pt", "notes.txt", "plain_pickle.pkl"):
        assert "not a PyTorch checkpoint" in messages[name]
    assert "corrupt zip checkpoint" in messages["zip_cut_50.pt"]


def test_directory_and_unreadable_file(tmp_path, small_checkpoints):
    assert_checkpoint_error(str(tmp_path))
    if os.geteuid() != 0:  # root reads anything
        locked = tmp_path / "locked.pt"
        locked.write_bytes(small_checkpoints["zip"])
        locked.chmod(0)
        assert_checkpoint_error(locked, "Permission denied")


def read_bytes_or_error(path, blob):
    path.write_bytes(blob)
    try:
        assert isinstance(read_checkpoint(path), dict)
    except CheckpointError as error:
        assert "\n" not in str(error) and path.name in str(error)


@fuzz_settings
@given(blob=st.binary(max_size=2048))
def test_arbitrary_bytes_give_a_dict_or_checkpoint_error(tmp_path, blob):
    read_bytes_or_error(tmp_path / "fuzz.pt", blob)


def with_data_pkl(zip_blob, data_pkl):
    """The zip checkpoint `zip_blob` with its data.pkl replaced (CRCs recomputed, so the pickle itself is tested)."""
    source, out = zipfile.ZipFile(io.BytesIO(zip_blob)), io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name in source.namelist():
            archive.writestr(name, data_pkl if name.endswith("/data.pkl") else source.read(name))
    return out.getvalue()


@fuzz_settings
@given(target=st.sampled_from(FORMATS + ["data.pkl"]), data=st.data())
def test_truncated_and_flipped_checkpoints_give_a_dict_or_checkpoint_error(tmp_path, small_checkpoints, target, data):
    original = small_checkpoints[target] if target in FORMATS else small_checkpoints["data.pkl"]
    blob = bytearray(original[: data.draw(st.integers(0, len(original)), "cut")])
    for _ in range(data.draw(st.integers(0, 3), "flips")):
        if blob:
            blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    if target == "data.pkl":
        blob = with_data_pkl(small_checkpoints["zip"], bytes(blob))
    read_bytes_or_error(tmp_path / "fuzz.pt", bytes(blob))


def test_corrupt_memo_index_is_caught_before_unpickling(tmp_path, small_checkpoints):
    # LONG_BINPUT 2**31 - 1: CPython's unpickler would first grow its memo to ~32 GB of pointers.
    path = tmp_path / "memo.pt"
    path.write_bytes(with_data_pkl(small_checkpoints["zip"], b"\x80\x02}r\xff\xff\xff\x7f."))
    assert_checkpoint_error(path, "memo index 2147483647")


def test_import_does_not_import_torch():
    code = "import pyincept.io.checkpoint, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
