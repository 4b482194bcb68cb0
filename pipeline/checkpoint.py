"""Lazy safetensors checkpoints in Hugging Face layout (CONTRACT; being implemented).

Planned interface (other modules code against this):

    @dataclass(frozen=True)
    class TensorInfo:
        name: str; dtype: str ("F32", "F16", "BF16", ...); shape: tuple[int, ...]
        file: str            # file name inside the checkpoint (shard)
        start: int; end: int # absolute byte offsets of the data inside that file

    class Checkpoint:
        @classmethod
        def open(cls, location: str | os.PathLike | FileSource) -> "Checkpoint"
            # a local directory (model.safetensors, or sharded via model.safetensors.index.json,
            # or adapter_model.safetensors), a single .safetensors file, or any FileSource
            # (the Hub source in hub.py implements the same protocol with HTTP range reads).
        def keys(self) -> list[str]
        def info(self, key: str) -> TensorInfo
        def get(self, key: str, dtype=torch.float32) -> torch.Tensor   # reads only that tensor's bytes
        bytes_read: int                                                 # for tests / metrics

    class FileSource(Protocol):
        name: str                                   # for error messages (path or repo@rev)
        def exists(self, filename: str) -> bool
        def size(self, filename: str) -> int
        def read_range(self, filename: str, start: int, end: int) -> bytes
        def read_text(self, filename: str) -> str   # small JSON files
"""
