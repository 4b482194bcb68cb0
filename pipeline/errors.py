"""Typed errors, grouped by subsystem.

Every error carries the context needed to act on it (file, repo, revision, tensor) and a
message that says what to do. Errors subclass a built-in where one fits, so callers that
only know `ValueError`/`FileNotFoundError` still catch them.
"""
from __future__ import annotations

import json
import os
import re
from datetime import datetime, timezone
from typing import Literal, Protocol


class ZoospectraError(Exception):
    """Base class. `context` holds structured fields (file, repo, tensor, ...) for error rows."""

    def __init__(self, message: str, **context: object) -> None:
        self.context = {k: v for k, v in context.items() if v is not None}
        where = ", ".join(f"{k}={v}" for k, v in self.context.items())
        super().__init__(f"{message} [{where}]" if where else message)
        self.message = message

    # The CLI's exit status for this error: 2 = invalid input (the default: fix the command,
    # the files or the config), 1 = a runtime failure the input did not cause (see RUNTIME).
    exit_code: int = 2

    @property
    def kind(self) -> str:
        return type(self).__name__


# --- checkpoints and tensors -------------------------------------------------------------
class CheckpointError(ZoospectraError):
    """A checkpoint (base, fine-tune or adapter weights) cannot be read as given."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    pass


class CorruptSafetensorsError(CheckpointError, ValueError):
    """Truncated file, bad header length, invalid JSON, offsets outside the data section."""


class UnsupportedDtypeError(CheckpointError, TypeError):
    """A dtype the math cannot use (quantised, int, fp8, ...)."""


class NonFiniteWeightsError(CheckpointError, ValueError):
    """NaN or Inf in a tensor."""


class UnsafeCheckpointError(CheckpointError, PermissionError):
    """Pickle-only weights, or paths escaping the checkpoint directory."""


class QuantizedBaseError(CheckpointError, ValueError):
    """A quantised base (bitsandbytes NF4/FP4/int8 or GGUF) whose quantisation state is missing,
    damaged or of a type zoospectra cannot dequantise (pipeline/io/quantized.py)."""


class TensorNotFoundError(CheckpointError, KeyError):
    def __str__(self) -> str:  # KeyError would repr() the message
        return Exception.__str__(self)


# --- adapters ----------------------------------------------------------------------------
class AdapterError(ZoospectraError):
    """An adapter's config or weights do not describe a valid update."""


class AdapterConfigError(AdapterError, ValueError):
    """Missing or invalid fields in adapter_config.json."""


class UnsupportedAdapterError(AdapterError, NotImplementedError):
    """A peft_type or option zoospectra does not implement."""


class BaseMismatchError(AdapterError, ValueError):
    """An adapter/fine-tune key or shape does not match the base checkpoint."""


# --- hub ---------------------------------------------------------------------------------
class BaseUnresolvedError(AdapterError, ValueError):
    """An artifact names no base (no --base, nothing in its adapter config or model card), or
    names one that is neither a directory here nor a Hub repo id."""


class HubError(ZoospectraError):
    pass


class HubAccessError(HubError, PermissionError):
    """Gated or private repo without access (401/403)."""


class HubNotFoundError(HubError, FileNotFoundError):
    pass


class HubUnavailableError(HubError, ConnectionError):
    """5xx, 429 or timeouts that outlasted the retries."""

    exit_code = 1


class HubUnreachableError(HubUnavailableError):
    """The endpoint cannot be resolved or connected to at all (no network, wrong HF_ENDPOINT):
    found by one bounded probe before any repo is asked, so no row blames a repo for it."""


# --- configuration, results, execution ---------------------------------------------------
class ConfigError(ZoospectraError, ValueError):
    """Invalid job spec or CLI options."""


class ResultsError(ZoospectraError):
    """The results root cannot be read or written as asked."""


class OutputError(ConfigError):
    """An output path the command may not write: not ours and not empty, a file where a
    directory is needed, inside an input, or not writable (pipeline/outputs.py has the rules)."""


class ResultsNotFoundError(ResultsError, FileNotFoundError):
    """A results root to read does not exist or holds no results."""


class ClusterUnreachableError(ZoospectraError, ConnectionError):
    """A Ray address (or Jobs API) that does not answer within the probe's time limit."""

    exit_code = 1


class JobSubmitError(ZoospectraError, RuntimeError):
    """The Ray Jobs API answered but did not take the job (its own message says why)."""

    exit_code = 1


class JobWaitTimeoutError(ZoospectraError, TimeoutError):
    """`submit --wait` gave up waiting; the job itself keeps running on the cluster."""

    exit_code = 1


# --- analysis (spectral math) ------------------------------------------------------------
class AnalysisError(ZoospectraError, RuntimeError):
    """The math cannot analyse a matrix as given: a decomposition failed to converge, or a
    precomputed base SVD does not belong to the base matrix it was passed with."""

    exit_code = 1


class InvalidNameError(ResultsError, ValueError):
    """A unit id, run id or key is not a safe file name ([A-Za-z0-9._-], no leading dot)."""


class SchemaMismatchError(ResultsError, TypeError):
    """A table handed to the results store does not match its declared schema (schemas/tables.py)."""


class AdapterWeightsError(AdapterError, ValueError):
    """An adapter's tensors do not fit together (factor ranks or dimensions disagree, a factor
    that must be a matrix is not 2-D): the file cannot describe the update its config claims."""


# --- the one `errors` row and the one redactor ---------------------------------------------
Stage = Literal["plan", "load", "analyze", "execute", "write", "hub", "discover"]
MESSAGE_LIMIT = 2000  # a Ray task failure carries the worker's whole traceback
_TOKEN_LIKE = re.compile(r"hf_[A-Za-z0-9]{8,}")
_TOKEN_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


class _Model(Protocol):
    # read-only: ModelRef (a property) and Pinned (frozen dataclass) both satisfy it
    @property
    def uid(self) -> str: ...
    @property
    def model_id(self) -> str: ...


def redact(text: str) -> str:
    """`text` with Hub tokens masked: this process's own (HF_TOKEN) and anything token-like.

    Error rows, model rows and logs quote files and servers written by strangers, and Ray
    tracebacks quote whatever a worker saw; none of it may carry a secret."""
    for var in _TOKEN_VARS:
        secret = os.environ.get(var)
        if secret and len(secret) >= 8:
            text = text.replace(secret, "***")
    return _TOKEN_LIKE.sub("hf_***", text)


def error_row(stage: Stage, err: BaseException, *, model: _Model | None = None,
              model_id: str | None = None, tensor: str | None = None) -> dict:
    """An `errors` row (schemas/tables.py ERRORS) without run_id / unit_id, which the writer adds.

    `model` is a pinned ModelRef; `model_id` names a repo that could not be pinned (hub
    discovery). Message and context are redacted and the message capped at MESSAGE_LIMIT."""
    ctx = {k: str(v) for k, v in (getattr(err, "context", None) or {}).items()}
    message = redact(str(err))
    if len(message) > MESSAGE_LIMIT:
        message = message[:MESSAGE_LIMIT] + " ..."
    return {
        "model_uid": model.uid if model is not None else None,
        "model_id": model.model_id if model is not None else model_id,
        "tensor": tensor or ctx.get("tensor"),
        "stage": stage,
        "error_type": type(err).__name__,
        "message": message,
        "context_json": redact(json.dumps(ctx, sort_keys=True)),
        "at": datetime.now(timezone.utc),
    }
