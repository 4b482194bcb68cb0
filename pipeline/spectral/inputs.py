"""Validate and place the math's inputs: device, dtype, W0 and each update's dW."""
from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from ..errors import BaseMismatchError, ConfigError, NonFiniteWeightsError, UnsupportedDtypeError
from ..numeric import all_finite
from ..updates import MatrixUpdate

_DEVICE = re.compile(r"cpu|cuda(:\d+)?")
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def resolve_device(device: str | torch.device) -> torch.device:
    """"cpu" or "cuda[:n]"; a CUDA device must exist here."""
    name = str(device)
    if not _DEVICE.fullmatch(name):
        raise ConfigError(f"device must be 'cpu' or 'cuda[:n]', got {name!r}", option="device")
    dev = torch.device(name)
    if dev.type == "cuda":
        # float32 means IEEE float32 here: TF32 matmuls (10-bit mantissa) would move cosines by
        # ~1e-3, far outside the tolerances the engines are tested to.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} asked for but torch sees no CUDA device; use 'cpu'",
                              option="device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r} does not exist ({torch.cuda.device_count()} GPUs)",
                              option="device")
    return dev


def svd(x: torch.Tensor, full_matrices: bool = False):
    """torch.linalg.svd, with cuSOLVER's QR-based gesvd on CUDA (the default heuristics may pick
    the Jacobi or approximate drivers, less accurate in float32)."""
    if x.is_cuda:
        return torch.linalg.svd(x, full_matrices=full_matrices, driver="gesvd")
    return torch.linalg.svd(x, full_matrices=full_matrices)


def svdvals(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(x, driver="gesvd") if x.is_cuda else torch.linalg.svdvals(x)


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


def place(x: torch.Tensor, what: str, tensor: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """x upcast (fp16/bf16 -> dtype, never half) and moved; refuse non-float and non-finite data."""
    if not (x.is_floating_point()):
        raise UnsupportedDtypeError(
            f"{what} has dtype {x.dtype}; only floating-point weights can be analysed "
            "(dequantise quantised checkpoints first)", tensor=tensor)
    x = x.detach().to(device=device, dtype=dtype)
    if not all_finite(x):
        raise NonFiniteWeightsError(f"{what} contains NaN or Inf; check the checkpoint", tensor=tensor)
    return x


def batch_tensor(updates: Sequence[MatrixUpdate], shape: tuple[int, int]) -> str:
    """The one base key every update of a batch must share, checked against W0's shape."""
    keys = {u.tensor for u in updates}
    if len(keys) > 1:
        raise BaseMismatchError(
            f"a batch must update one base matrix, got {sorted(keys)}; plan one unit per tensor")
    for u in updates:
        if tuple(u.shape) != shape:
            raise BaseMismatchError(
                f"update shape {tuple(u.shape)} does not match the base matrix {shape}",
                tensor=u.tensor)
    return keys.pop() if keys else ""


def delta(update: MatrixUpdate, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """dW [m, n] on `device` in `dtype`; factors are moved first so a GPU does the product."""
    if update.dense is not None:
        dw = place(update.dense, "dense update", update.tensor, device, dtype)
    else:
        fb, fa = update.factors()
        b = place(fb, "factor B", update.tensor, device, dtype)  # [m, r], scale folded in
        a = place(fa, "factor A", update.tensor, device, dtype)  # [r, n]
        if b.shape[1] != a.shape[0]:
            raise BaseMismatchError(f"factor shapes B {tuple(b.shape)} and A {tuple(a.shape)} "
                                    "do not chain", tensor=update.tensor)
        dw = b @ a
    if tuple(dw.shape) != tuple(update.shape):
        raise BaseMismatchError(f"dW has shape {tuple(dw.shape)}, expected {tuple(update.shape)} "
                                "(fan_in_fan_out not undone?)", tensor=update.tensor)
    return dw
