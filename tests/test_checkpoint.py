"""Lazy safetensors access: byte-exact agreement with the safetensors library, lazy reads on
sharded checkpoints, strict validation of hand-corrupted files, and refusal of unsafe inputs."""
from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from zoospectra.errors import (
    CheckpointNotFoundError,
    CorruptSafetensorsError,
    NonFiniteWeightsError,
    TensorNotFoundError,
    UnsafeCheckpointError,
    UnsupportedDtypeError,
)
from zoospectra.io.checkpoint import (
    Checkpoint,
    FileSource,
    LocalFileSource,
    TensorInfo,
    read_header,
)


def reference(path: Path, key: str) -> torch.Tensor:
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(key)


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Same dtype, shape and bits (works for fp8/bool, where torch.equal may not)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


class RecordingSource(LocalFileSource):
    """Logs every byte range read, to prove laziness."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.reads: list[tuple[str, int, int]] = []

    def read_range(self, filename: str, start: int, end: int) -> bytearray:
        self.reads.append((filename, start, end))
        return super().read_range(filename, start, end)


class MemorySource:
    """A FileSource with no file system at all (what the Hub source will look like)."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files, self.name = files, "memory://test"

    def exists(self, filename: str) -> bool:
        return filename in self.files

    def size(self, filename: str) -> int:
        return len(self.files[filename])

    def read_range(self, filename: str, start: int, end: int) -> bytes:
        return self.files[filename][start:end]

    def read_text(self, filename: str) -> str:
        return self.files[filename].decode()


# --- fixtures ------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def sharded_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 shards, bf16 and f32 (and f16) tensors, with a Hugging Face index."""
    root = tmp_path_factory.mktemp("sharded")
    g = torch.Generator().manual_seed(0)
    shards = {
        "model-00001-of-00003.safetensors": {
            "embed.weight": torch.randn(64, 32, generator=g, dtype=torch.float32),
            "layer.0.q.weight": torch.randn(32, 32, generator=g).to(torch.bfloat16)},
        "model-00002-of-00003.safetensors": {
            "layer.0.k.weight": torch.randn(32, 32, generator=g).to(torch.bfloat16),
            "layer.0.v.weight": torch.randn(48, 32, generator=g, dtype=torch.float32),
            "layer.0.norm.bias": torch.randn(32, generator=g).to(torch.float16)},
        "model-00003-of-00003.safetensors": {
            "layer.1.q.weight": torch.randn(32, 32, generator=g).to(torch.bfloat16),
            "head.weight": torch.randn(10, 32, generator=g, dtype=torch.float32)},
    }
    weight_map = {}
    for shard, tensors in shards.items():
        save_file(tensors, str(root / shard), metadata={"format": "pt"})
        weight_map.update({k: shard for k in tensors})
    (root / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return root


@pytest.fixture(scope="session")
def all_dtypes_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 5, generator=g) * 10
    tensors = {
        "f64": x.double(), "f32": x, "f16": x.half(), "bf16": x.bfloat16(),
        "i64": x.long(), "i32": x.int(), "i16": x.short(), "i8": x.to(torch.int8),
        "u8": x.abs().to(torch.uint8), "bool": x > 0, "f8": x.to(torch.float8_e4m3fn),
        "empty": torch.zeros(0, 7), "scalar": torch.tensor(3.5),
    }
    path = tmp_path_factory.mktemp("dtypes") / "model.safetensors"
    save_file(tensors, str(path))
    return path


def write_raw(path: Path, header: dict | bytes, data: bytes = b"",
              length: int | None = None) -> Path:
    """A safetensors file built by hand, so any field can be wrong."""
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body) if length is None else length) + body + data)
    return path


def entry(dtype: str = "F32", shape: list | None = None, offsets: list | None = None) -> dict:
    return {"dtype": dtype, "shape": [2, 2] if shape is None else shape,
            "data_offsets": [0, 16] if offsets is None else offsets}


# --- agreement with safetensors -------------------------------------------------------------
def test_minilm_matches_safetensors_for_every_tensor(minilm_dir: Path) -> None:
    path = minilm_dir / "model.safetensors"
    ckpt = Checkpoint.open(minilm_dir)
    with safe_open(str(path), framework="pt") as f:
        assert sorted(ckpt.keys()) == sorted(f.keys())
        for key in ckpt.keys():
            ref = f.get_tensor(key)
            assert_same(ckpt.get(key, dtype=None), ref)
            if ref.is_floating_point():
                assert_same(ckpt.get(key), ref.float())
    assert ckpt.info("embeddings.position_ids").dtype == "I64"
    with pytest.raises(UnsupportedDtypeError, match="embeddings.position_ids"):
        ckpt.get("embeddings.position_ids")
    # Every data byte read once per get() (floats twice), the header once.
    header = ckpt.header("model.safetensors").header_bytes
    assert ckpt.header_bytes_read == header
    floats = sum(ckpt.info(k).nbytes for k in ckpt.keys() if ckpt.info(k).dtype == "F32")
    assert ckpt.bytes_read == path.stat().st_size - header + floats


def test_every_dtype_matches_safetensors(all_dtypes_file: Path) -> None:
    ckpt = Checkpoint.open(all_dtypes_file)  # a single file path
    for key in ckpt.keys():
        assert_same(ckpt.get(key, dtype=None), reference(all_dtypes_file, key))
    for key in ("f64", "f32", "f16", "bf16", "empty", "scalar"):
        ref = reference(all_dtypes_file, key)
        assert_same(ckpt.get(key), ref.float())
        assert_same(ckpt.get(key, dtype=torch.float64), ref.double())
    assert ckpt.get("empty").shape == (0, 7) and ckpt.get("scalar").shape == ()
    assert ckpt.info("f8") == TensorInfo("f8", "F8_E4M3", (6, 5), "model.safetensors",
                                         ckpt.info("f8").start, ckpt.info("f8").start + 30)


@pytest.mark.parametrize("key", ["i64", "i32", "i16", "i8", "u8", "bool", "f8"])
def test_non_float_tensors_refused_as_float(all_dtypes_file: Path, key: str) -> None:
    with pytest.raises(UnsupportedDtypeError) as err:
        Checkpoint.open(all_dtypes_file).get(key, dtype=torch.float32)
    assert f"'{key}'" in str(err.value) and str(all_dtypes_file) in str(err.value)
    assert "dequantise" in str(err.value)


def test_packed_fp4_parses_but_cannot_be_read(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "m.safetensors", {"w": entry("F4", [4, 4], [0, 8])}, bytes(8))
    ckpt = Checkpoint.open(path)
    assert ckpt.info("w").nbytes == 8
    with pytest.raises(UnsupportedDtypeError, match="F4 tensor 'w'"):
        ckpt.get("w", dtype=None)


# --- laziness ---------------------------------------------------------------------------------
def test_sharded_reads_only_the_requested_tensor(sharded_dir: Path) -> None:
    source = RecordingSource(sharded_dir)
    ckpt = Checkpoint.open(source)
    assert len(ckpt.keys()) == 7 and source.reads == []  # keys() come from the index alone
    shard = "model-00002-of-00003.safetensors"
    key = "layer.0.k.weight"
    got = ckpt.get(key)
    info = ckpt.info(key)
    ref = reference(sharded_dir / shard, key)
    assert ref.dtype == torch.bfloat16 and info.file == shard
    assert torch.equal(got, ref.float())
    assert ckpt.bytes_read == ref.nbytes == info.nbytes
    n_header = ckpt.header(shard).header_bytes
    assert ckpt.header_bytes_read == n_header
    # Exactly: header length, header JSON, that tensor's bytes; nothing from other shards.
    assert source.reads == [(shard, 0, 8), (shard, 8, n_header), (shard, info.start, info.end)]
    # A second tensor in the same shard reuses the cached header.
    assert torch.equal(ckpt.get("layer.0.v.weight"),
                       reference(sharded_dir / shard, "layer.0.v.weight"))
    assert ckpt.header_bytes_read == n_header and len(source.reads) == 4


def test_sharded_all_tensors_match(sharded_dir: Path) -> None:
    ckpt = Checkpoint.open(sharded_dir)
    index = json.loads((sharded_dir / "model.safetensors.index.json").read_text())
    for key, shard in index["weight_map"].items():
        assert_same(ckpt.get(key, dtype=None), reference(sharded_dir / shard, key))
    assert ckpt.header_bytes_read == sum(ckpt.header(s).header_bytes for s in ckpt.files)
    assert ckpt.header("model-00001-of-00003.safetensors").metadata == {"format": "pt"}
    by_index_path = Checkpoint.open(sharded_dir / "model.safetensors.index.json")
    assert by_index_path.keys() == ckpt.keys() and len(by_index_path.files) == 3


def test_memory_source_satisfies_protocol(all_dtypes_file: Path) -> None:
    source = MemorySource({"adapter_model.safetensors": all_dtypes_file.read_bytes()})
    assert isinstance(source, FileSource)
    ckpt = Checkpoint.open(source)  # falls back to adapter_model.safetensors
    assert_same(ckpt.get("bf16"), reference(all_dtypes_file, "bf16").float())
    assert_same(ckpt.get("f16", dtype=None), reference(all_dtypes_file, "f16"))


def test_adapter_directory(tmp_path: Path) -> None:
    save_file({"base_model.model.q.lora_A.weight": torch.ones(2, 8)},
              str(tmp_path / "adapter_model.safetensors"))
    ckpt = Checkpoint.open(tmp_path)
    assert ckpt.keys() == ["base_model.model.q.lora_A.weight"]
    assert torch.equal(ckpt.get("base_model.model.q.lora_A.weight"), torch.ones(2, 8))


# --- corrupt files ----------------------------------------------------------------------------
DATA = bytes(64)
# case -> (header JSON or raw bytes, header length override, tensor to name, message fragment)
CORRUPT: dict[str, tuple] = {
    "length_past_eof": (b"{}", 1000, None, "larger than the file"),
    "length_absurd": (b"{}", 2**62, None, "byte cap"),
    "bad_json": (b"{not json", None, None, "not valid UTF-8 JSON"),
    "not_utf8": (b"\xff\xfe", None, None, "not valid UTF-8 JSON"),
    "duplicate_key": (b'{"w": {}, "w": {}}', None, None, "duplicate key 'w'"),
    "not_dict": ([1, 2], None, None, "JSON list, not an object"),
    "bad_metadata": ({"__metadata__": {"a": 1}}, None, None, "__metadata__"),
    "entry_not_dict": ({"w": [1]}, None, "w", "not an object"),
    "unknown_dtype": ({"w": entry("F33")}, None, "w", "unknown dtype 'F33'"),
    "negative_shape": ({"w": entry(shape=[-2, -2])}, None, "w", "shape"),
    "float_shape": ({"w": entry(shape=[2.0, 2])}, None, "w", "shape"),
    "bool_shape": ({"w": entry(shape=[True, 4])}, None, "w", "shape"),
    "offsets_mismatch": ({"w": entry(offsets=[0, 12])}, None, "w", "needs 16 bytes"),
    "offsets_reversed": ({"w": entry(offsets=[16, 0])}, None, "w", "begin <= end"),
    "offsets_past_eof": ({"w": entry(shape=[4, 8], offsets=[0, 128])}, None, "w",
                         "past the end of the file"),
    "overlap": ({"a": entry(), "b": entry(shape=[4], offsets=[8, 24])}, None, "b", "overlaps"),
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corrupt_file_raises_typed_error_naming_file_and_tensor(tmp_path: Path,
                                                                case: str) -> None:
    header, length, tensor, fragment = CORRUPT[case]
    path = write_raw(tmp_path / "model.safetensors", header, DATA, length)
    with pytest.raises(CorruptSafetensorsError) as err:
        Checkpoint.open(path).keys()
    msg = str(err.value)
    assert fragment in msg and str(path) in msg and "re-download" in msg, msg
    assert err.value.context["file"] == str(path) and isinstance(err.value, ValueError)
    if tensor is not None:
        assert f"tensor={tensor}" in msg and err.value.context["tensor"] == tensor


def test_file_shorter_than_length_prefix(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"\x01\x02\x03")
    with pytest.raises(CorruptSafetensorsError, match="shorter than the 8-byte") as err:
        Checkpoint.open(tmp_path).get("w")
    assert str(tmp_path / "model.safetensors") in str(err.value)


def test_truncated_real_file(tmp_path: Path, all_dtypes_file: Path) -> None:
    raw = all_dtypes_file.read_bytes()
    path = tmp_path / "model.safetensors"
    path.write_bytes(raw[:-10])
    with pytest.raises(CorruptSafetensorsError, match="past the end of the file"):
        read_header(LocalFileSource(tmp_path), "model.safetensors")


def test_valid_hand_written_file_reads_back(tmp_path: Path) -> None:
    """The hand-built writer above is right, so the corrupt cases fail for their stated reason."""
    data = struct.pack("<4f", 1, 2, 3, 4) + struct.pack("<4f", 5, 6, 7, 8)
    path = write_raw(tmp_path / "ok.safetensors", {
        "__metadata__": {"k": "v"}, "b": entry(offsets=[16, 32]), "a": entry()}, data)
    ckpt = Checkpoint.open(path)
    assert torch.equal(ckpt.get("b"), torch.tensor([[5.0, 6], [7, 8]]))
    assert torch.equal(ckpt.get("a"), reference(path, "a"))


def test_index_errors(tmp_path: Path, sharded_dir: Path) -> None:
    (tmp_path / "model.safetensors.index.json").write_text("[1]")
    with pytest.raises(CorruptSafetensorsError, match="index"):
        Checkpoint.open(tmp_path)
    save_file({"x": torch.ones(2)}, str(tmp_path / "s1.safetensors"))
    index = {"weight_map": {"x": "s1.safetensors", "y": "s1.safetensors",
                            "z": "missing.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    ckpt = Checkpoint.open(tmp_path)
    with pytest.raises(CorruptSafetensorsError) as err:
        ckpt.get("y")
    assert "s1.safetensors" in str(err.value) and "tensor=y" in str(err.value)
    with pytest.raises(CheckpointNotFoundError, match="missing.safetensors"):
        ckpt.get("z")


# --- values -----------------------------------------------------------------------------------
def test_non_finite_weights(tmp_path: Path) -> None:
    w = torch.ones(4, 4)
    w[0, 0], w[1, 1], w[2, 2] = float("nan"), float("nan"), float("-inf")
    big = torch.full((3,), 1e300, dtype=torch.float64)  # finite as f64, Inf as f32
    path = tmp_path / "model.safetensors"
    save_file({"w": w.bfloat16(), "big": big, "ok": torch.ones(3)}, str(path))
    ckpt = Checkpoint.open(tmp_path)
    with pytest.raises(NonFiniteWeightsError) as err:
        ckpt.get("w")
    msg = str(err.value)
    assert "2 NaN and 1 Inf" in msg and "tensor=w" in msg and str(path) in msg
    assert err.value.context["nan"] == 2 and err.value.context["inf"] == 1
    with pytest.raises(NonFiniteWeightsError, match="0 NaN and 3 Inf"):
        ckpt.get("big")
    assert torch.equal(ckpt.get("big", dtype=torch.float64), big)
    assert torch.equal(ckpt.get("ok"), torch.ones(3))


def test_scalar_decodes_the_bytes_as_get_reads_them(tmp_path: Path) -> None:
    """Checkpoint.scalar (kohya alphas, read while planning, without torch) gives the first
    element exactly as get() does, for every float dtype and shape; other dtypes, NaN/Inf and
    a value cut short are typed errors naming the tensor."""
    values = {"f64": torch.tensor(1 / 3, dtype=torch.float64), "f32": torch.tensor([0.1, 2.0]),
              "f16": torch.tensor([[6.5e-5, 1.0]], dtype=torch.float16), "bf16": torch.tensor(-3.140625).bfloat16(),
              "bf16_odd": torch.tensor([1 / 7]).bfloat16(), "i64": torch.tensor(4), "nan": torch.tensor(float("nan")),
              "inf": torch.tensor([float("-inf"), 1.0], dtype=torch.float16)}
    save_file(values, str(tmp_path / "model.safetensors"))
    ckpt = Checkpoint.open(tmp_path)
    for key in ("f64", "f32", "f16", "bf16", "bf16_odd"):
        got = ckpt.scalar(key)
        assert got == float(ckpt.get(key, dtype=torch.float64).reshape(-1)[0]), key
        assert got == float(values[key].double().reshape(-1)[0]), key
    with pytest.raises(UnsupportedDtypeError, match="I64 tensor 'i64'"):
        ckpt.scalar("i64")
    with pytest.raises(NonFiniteWeightsError, match="tensor 'nan'"):
        ckpt.scalar("nan")
    with pytest.raises(NonFiniteWeightsError, match="tensor 'inf'"):
        ckpt.scalar("inf")
    empty = tmp_path / "empty"
    empty.mkdir()
    save_file({"a": torch.zeros(0)}, str(empty / "model.safetensors"))
    with pytest.raises(CorruptSafetensorsError, match="holds 0 bytes"):
        Checkpoint.open(empty).scalar("a")


def test_missing_key(sharded_dir: Path, all_dtypes_file: Path) -> None:
    for location in (sharded_dir, all_dtypes_file):
        with pytest.raises(TensorNotFoundError) as err:
            Checkpoint.open(location).get("nope.weight")
        assert "'nope.weight'" in str(err.value) and isinstance(err.value, KeyError)


# --- refusals ---------------------------------------------------------------------------------
class _Evil:
    """Unpickling this writes a marker file: proof that nobody unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "adapter_model.bin"])
def test_pickle_only_directory_is_refused_unopened(tmp_path: Path, name: str) -> None:
    marker = tmp_path / "PWNED"
    (tmp_path / name).write_bytes(pickle.dumps(_Evil(marker)))
    for location in (tmp_path, tmp_path / name):
        with pytest.raises(UnsafeCheckpointError) as err:
            Checkpoint.open(location)
        msg = str(err.value)
        assert "never unpickles" in msg and "safetensors" in msg and name in msg
    assert not marker.exists()


def test_nothing_there(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointNotFoundError, match=str(tmp_path)):
        Checkpoint.open(tmp_path)
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint"):
        Checkpoint.open(tmp_path / "does-not-exist")
    with pytest.raises(FileNotFoundError):  # catchable as the built-in
        Checkpoint.open(tmp_path / "model.safetensors")


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "a/../../x",
                                   "..\\x.safetensors", ""])
def test_index_escaping_the_directory_is_refused(tmp_path: Path, shard: str) -> None:
    root = tmp_path / "ckpt"
    root.mkdir()
    save_file({"x": torch.ones(2)}, str(tmp_path / "outside.safetensors"))
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": shard}}))
    with pytest.raises(UnsafeCheckpointError) as err:
        Checkpoint.open(root).get("x")
    assert repr(shard) in str(err.value)


def test_symlink_escaping_the_directory_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    root.mkdir()
    save_file({"x": torch.ones(2)}, str(tmp_path / "outside.safetensors"))
    (root / "model.safetensors").symlink_to(tmp_path / "outside.safetensors")
    with pytest.raises(UnsafeCheckpointError, match="resolves outside"):
        Checkpoint.open(root)
    # A symlink that stays inside the checkpoint is fine.
    (root / "model.safetensors").unlink()
    save_file({"x": torch.ones(2)}, str(root / "real.safetensors"))
    (root / "model.safetensors").symlink_to(root / "real.safetensors")
    assert torch.equal(Checkpoint.open(root).get("x"), torch.ones(2))


def test_local_source_refuses_escapes_on_every_call(tmp_path: Path) -> None:
    source = LocalFileSource(tmp_path)
    for call in (lambda: source.read_range("../x", 0, 1), lambda: source.exists("/etc/passwd"),
                 lambda: source.size("a/../../b"), lambda: source.read_text("../../etc/passwd")):
        with pytest.raises(UnsafeCheckpointError):
            call()
