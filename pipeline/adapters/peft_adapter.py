r"""PEFT adapters on disk (adapter_config.json + adapter_model.safetensors) -> exact dW per matrix.

Supported peft_type: LORA (incl. rsLoRA, DoRA, embedding LoRA, modules_to_save), ADALORA, LOHA,
LOKR, VERA, IA3; the math is in formulas.py. This module reads the config, groups the adapter's
keys ("base_model.model.<module>.<suffix>") by module, maps modules onto the base's keys, checks
every shape against the base, and resolves per-module r / alpha exactly like PEFT:
rank_pattern / alpha_pattern keys are regexes, the first p with re.match(rf"(.*\.)?({p})$", module)
wins (peft.utils.other.get_pattern_key). AdaLoRA's rank_pattern instead holds keep-masks per
"<module>.lora_E"; its ranknum is init_r (PEFT no longer saves it; a saved one wins).
Anything not understood (unknown suffix, LoRA variant options such as arrow/aLoRA/bdlora, CP
factors of convolutions) raises instead of guessing.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import (
    AdapterConfigError,
    AdapterWeightsError,
    BaseMismatchError,
    UnsupportedAdapterError,
)
from ..numeric import frobenius
from ..updates import MatrixUpdate, UpdateInfo, UpdateKind
from . import formulas as F
from .common import (
    Artifact,
    Files,
    Target,
    check_dtype,
    checked_w0,
    ckpt_name,
    dense_update,
    match_base_key,
    nearest_keys,
    read,
    role_of,
)

if TYPE_CHECKING:
    import torch

    from ..io.checkpoint import Checkpoint

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"



@dataclass(frozen=True)
class PeftType:
    """Everything zoospectra knows about one peft_type, in one place.

    kind:      the UpdateKind of its matrices (LoRA modules with a magnitude vector become "dora").
    required:  adapter_config.json fields without which the update is undefined.
    suffixes:  the adapter tensor suffixes ("<module>.<suffix>") of this type.
    ndim:      dimensions of the suffixes that are not 2-D matrices (None: not checked here).
    chains:    (left, right) suffix pairs whose product left @ right the math forms.
    compute:   the PeftAdapter method that turns one module's tensors into a MatrixUpdate.
    """

    kind: UpdateKind
    required: tuple[str, ...]
    suffixes: tuple[str, ...]
    ndim: tuple[tuple[str, int | None], ...] = ()
    chains: tuple[tuple[str, str], ...] = ()
    compute: str = ""

    def dims(self, suffix: str) -> int | None:
        return dict(self.ndim).get(suffix, 2)


PEFT_TYPES: dict[str, PeftType] = {
    "LORA": PeftType(
        "lora", ("r", "lora_alpha"),
        ("lora_A.weight", "lora_B.weight", "lora_B.bias", "lora_magnitude_vector.weight",
         "lora_magnitude_vector", "lora_embedding_A", "lora_embedding_B"),
        ndim=(("lora_B.bias", 1), ("lora_magnitude_vector", 1), ("lora_magnitude_vector.weight", 1)),
        chains=(("lora_B.weight", "lora_A.weight"), ("lora_embedding_B", "lora_embedding_A")),
        compute="_lora"),
    "ADALORA": PeftType(
        "adalora", ("init_r", "lora_alpha"), ("lora_A", "lora_B", "lora_E", "ranknum"),
        ndim=(("ranknum", None),), chains=(("lora_B", "lora_A"),), compute="_adalora"),
    "LOHA": PeftType(
        "loha", ("r", "alpha"), ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
        ndim=(("hada_t1", None), ("hada_t2", None)),
        chains=(("hada_w1_a", "hada_w1_b"), ("hada_w2_a", "hada_w2_b")), compute="_loha"),
    "LOKR": PeftType(
        "lokr", ("r", "alpha"), ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
        ndim=(("lokr_t2", None),), chains=(("lokr_w1_a", "lokr_w1_b"), ("lokr_w2_a", "lokr_w2_b")),
        compute="_lokr"),
    "VERA": PeftType(
        "vera", ("r", "projection_prng_key"), ("vera_lambda_b", "vera_lambda_d"),
        ndim=(("vera_lambda_b", 1), ("vera_lambda_d", 1)), compute="_vera"),
    "IA3": PeftType("ia3", (), ("ia3_l",), compute="_ia3"),
}
# init_lora_weights values whose init subtracts B @ A (or a quantisation residual) from the base:
# the saved factors are then a delta against a modified base (lora/layer.py *_init methods).
BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
# LoRA variants whose merge is not `W0 + scale * B @ A` (or DoRA), or that change the module set.
_REFUSED_OPTIONS = ("alora_invocation_tokens", "arrow_config", "use_bdlora", "velora_config",
                    "monteclora_config", "kasa_config", "use_qalora", "layer_replication",
                    "target_parameters", "trainable_token_indices", "megatron_config")
PREFIX = "base_model.model."
_BOOL_OPTIONS = ("use_rslora", "use_dora", "fan_in_fan_out")


def _is_pos_int(x: object) -> bool:
    """A rank: positive, and storable (models.r is int32; no real adapter comes near 2**31)."""
    return isinstance(x, int) and not isinstance(x, bool) and 0 < x < 2**31


def _is_finite_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def get_pattern_key(patterns: list[str], module: str) -> str | None:
    """PEFT's rank_pattern/alpha_pattern lookup (peft.utils.other.get_pattern_key): first match wins."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


@dataclass
class _Module:
    """The adapter tensors of one targeted module: suffix -> adapter key."""

    path: str
    keys: dict[str, str] = field(default_factory=dict)
    replacement: bool = False  # modules_to_save: full tensors under their own names


class PeftAdapter(Artifact):
    def __init__(self, files: Files, *, model_id: str | None = None) -> None:
        self._dtype: torch.dtype | None = None       # load_update sets the run's precision
        self._vera_ab: tuple[torch.Tensor, torch.Tensor] | None = None   # shared VeRA A, B once read
        self.files = files
        self._location = files.path(WEIGHTS)
        self.config_text = files.read_text(CONFIG)
        self.config = files.read_json(CONFIG)
        self.model_id = model_id or files.name.rstrip("/").split("/")[-1]
        self.peft_type = self._peft_type()
        self._validate_config()
        self.ckpt = files.open_checkpoint(WEIGHTS)
        self.modules, self.shared = self._group_keys()
        self.kind = self._artifact_kind()
        self._skipped: list[tuple[str, str]] = []

    # --- config ---------------------------------------------------------------------------
    def _cfg_error(self, msg: str, **ctx: Any) -> AdapterConfigError:
        return AdapterConfigError(msg, file=self.files.path(CONFIG), **ctx)

    def _peft_type(self) -> str:
        if "peft_type" not in self.config:
            raise self._cfg_error("missing field 'peft_type'; is this a PEFT adapter_config.json?",
                                  field="peft_type")
        ptype = str(self.config["peft_type"]).upper()
        if ptype not in PEFT_TYPES:
            raise UnsupportedAdapterError(
                f"peft_type {ptype!r} is not supported; zoospectra computes exact updates for "
                f"{sorted(PEFT_TYPES)} only", file=self.files.path(CONFIG), peft_type=ptype)
        return ptype

    def _validate_config(self) -> None:
        required = PEFT_TYPES[self.peft_type].required
        for name in required:
            if self.config.get(name) is None:
                raise self._cfg_error(f"missing field {name!r} required for {self.peft_type}", field=name)
        for name in ("r", "init_r"):
            if name in required and not _is_pos_int(self.config[name]):
                raise self._cfg_error(f"{name} must be a positive integer below 2**31, got {self.config[name]!r}",
                                      field=name)
        targets = self.config.get("target_modules")
        if not (targets is None or isinstance(targets, str)
                or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
            raise self._cfg_error(f"target_modules must be a string or a list of strings, got {targets!r}",
                                  field="target_modules")
        for name in ("lora_alpha", "alpha"):  # NaN/Inf/strings would reach the scale silently
            if self.config.get(name) is not None and not _is_finite_number(self.config[name]):
                raise self._cfg_error(f"{name} must be a finite number, got {self.config[name]!r}", field=name)
        for name in _BOOL_OPTIONS:  # bool("false") is True: a string here would flip the math
            if self.config.get(name) is not None and not isinstance(self.config[name], bool):
                raise self._cfg_error(f"{name} must be true or false, got {self.config[name]!r}", field=name)
        self._validate_patterns()
        if self.peft_type in ("LORA", "ADALORA"):
            for name in _REFUSED_OPTIONS:
                if self.config.get(name):
                    raise UnsupportedAdapterError(
                        f"LoRA option {name}={self.config[name]!r} changes how the update is applied; "
                        "zoospectra cannot compute an exact dW for it", file=self.files.path(CONFIG), field=name)

    def _validate_patterns(self) -> None:
        """rank_pattern / alpha_pattern: regex -> positive rank / finite alpha (AdaLoRA's
        rank_pattern instead maps parameter names to keep-masks)."""
        for field_name in ("rank_pattern", "alpha_pattern"):
            pattern = self.config.get(field_name) or {}
            if not isinstance(pattern, dict):
                raise self._cfg_error(f"{field_name} must map module regexes to values, got {pattern!r}",
                                      field=field_name)
            if field_name == "rank_pattern" and self.peft_type == "ADALORA":
                continue
            for key, value in pattern.items():
                try:
                    re.compile(key)
                except re.error as err:
                    raise self._cfg_error(f"{field_name} key {key!r} is not a valid regular expression ({err})",
                                          field=field_name) from None
                ok = _is_pos_int(value) if field_name == "rank_pattern" else _is_finite_number(value)
                if not ok:
                    want = "a positive integer below 2**31" if field_name == "rank_pattern" else "a finite number"
                    raise self._cfg_error(f"{field_name}[{key!r}] must be {want}, got {value!r}", field=field_name)

    @property
    def init(self) -> str:
        for name in ("init_lora_weights", "init_weights", "init_ia3_weights"):
            if name in self.config:
                return str(self.config[name])
        return "True"

    @property
    def base_rewritten(self) -> bool:
        return self.init.lower().startswith(BASE_REWRITING_INITS)

    def describe(self) -> dict:
        c, pt = self.config, self.peft_type
        r = c.get("init_r") if pt == "ADALORA" else (None if pt == "IA3" else c.get("r"))
        alpha = c.get("lora_alpha", c.get("alpha")) if pt not in ("VERA", "IA3") else None
        targets = c.get("target_modules")
        return dict(
            peft_type=pt, r=r, alpha=None if alpha is None else float(alpha),
            use_rslora=bool(c.get("use_rslora", False)), use_dora=bool(c.get("use_dora", False)),
            fan_in_fan_out=bool(c.get("fan_in_fan_out", False)),
            target_modules=None if targets is None else ([targets] if isinstance(targets, str) else list(targets)),
            init=self.init, base_rewritten=self.base_rewritten, config_json=self.config_text,
        )

    # --- keys -----------------------------------------------------------------------------
    def _group_keys(self) -> tuple[dict[str, _Module], dict[str, str]]:
        suffixes = sorted(PEFT_TYPES[self.peft_type].suffixes, key=len, reverse=True)
        mts = self.config.get("modules_to_save") or []
        modules: dict[str, _Module] = {}
        shared: dict[str, str] = {}
        for key in self.ckpt.keys():
            if self.peft_type == "VERA" and key in ("base_model.vera_A", "base_model.vera_B"):
                shared[key.rsplit(".", 1)[1]] = key
                continue
            rest = key[len(PREFIX):] if key.startswith(PREFIX) else key
            suffix = next((s for s in suffixes if rest.endswith("." + s)), None)
            if suffix is not None:
                path = rest[: -len(suffix) - 1]
                modules.setdefault(path, _Module(path)).keys[suffix] = key
                continue
            path, _, leaf = rest.rpartition(".")
            if path and any(path.endswith(t) for t in mts):
                mod = modules.setdefault("mts:" + path, _Module(path, replacement=True))
                mod.keys[leaf] = key
                continue
            raise UnsupportedAdapterError(
                f"tensor {key!r} is not a {self.peft_type} parameter zoospectra knows "
                f"(expected a suffix in {list(PEFT_TYPES[self.peft_type].suffixes)} or a modules_to_save module)",
                file=self._location, tensor=key)
        if not modules:
            raise AdapterConfigError("adapter holds no adapter tensors", file=self._location)
        return modules, shared

    def _artifact_kind(self) -> str:
        kind = PEFT_TYPES[self.peft_type].kind
        if kind == "lora" and (self.config.get("use_dora") or any(
                "lora_magnitude_vector" in k for m in self.modules.values() for k in m.keys)):
            kind = "dora"
        has_mts = any(m.replacement and "weight" in m.keys for m in self.modules.values())
        return "mixed" if has_mts else kind

    # --- planning -------------------------------------------------------------------------
    def targets(self, base: Checkpoint) -> list[Target]:
        base_keys = set(base.keys())
        base_name = ckpt_name(base)
        for key in self.ckpt.keys():  # quantised / integer adapter tensors fail at plan time
            check_dtype(self.ckpt, key, self._location)
        out, self._skipped = [], []
        self._plan: dict[str, tuple[_Module, Target]] = {}
        for mod in sorted(self.modules.values(), key=lambda m: (m.replacement, m.path)):
            target = self._plan_module(mod, base, base_keys, base_name)
            if target is None:
                continue
            if target.tensor in self._plan:
                raise BaseMismatchError(
                    f"two adapter modules map to base tensor {target.tensor!r}: "
                    f"{self._plan[target.tensor][0].path!r} and {mod.path!r}",
                    file=self._location, base=base_name, tensor=target.tensor)
            self._plan[target.tensor] = (mod, target)
            out.append(target)
        return out

    def _shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.ckpt.info(key).shape)

    def _plan_module(self, mod: _Module, base: Checkpoint, base_keys: set[str],
                     base_name: str) -> Target | None:
        if mod.replacement:
            return self._plan_replacement(mod, base, base_keys, base_name)
        first = next(iter(mod.keys.values()))
        base_key = match_base_key(mod.path + ".weight", base_keys, artifact=self._location, base_name=base_name)
        if base_key is None:
            raise BaseMismatchError(
                f"adapter module {mod.path!r} (tensor {first!r}) has no weight in the base checkpoint; "
                f"nearest base keys: {nearest_keys(mod.path + '.weight', base_keys)}. Is this adapter for "
                "another base model?", file=self._location, base=base_name, tensor=first)
        stored = tuple(base.info(base_key).shape)
        if len(stored) != 2:
            raise UnsupportedAdapterError(
                f"base tensor {base_key!r} has shape {stored}; only 2-D weights (Linear, Conv1D, Embedding) "
                "are supported", file=self._location, base=base_name, tensor=first)
        return self._plan_factors(mod, base_key, stored, base_name)

    def _plan_factors(self, mod: _Module, base_key: str, stored: tuple[int, ...], base_name: str) -> Target:
        """(m, n) and the layout from the factor shapes; any disagreement with the base is an error."""
        k, pt = mod.keys, self.peft_type
        self._check_factors(mod)
        fifo = bool(self.config.get("fan_in_fan_out", False))
        kind: UpdateKind = PEFT_TYPES[pt].kind
        role = role_of(base_key)
        if pt == "LORA" and "lora_embedding_A" in k:
            need = {"lora_embedding_A", "lora_embedding_B"}
            self._require(mod, need)
            r, n_emb = self._shape(k["lora_embedding_A"])
            dim = self._shape(k["lora_embedding_B"])[0]
            mn, fifo, role = (n_emb, dim), False, "embedding"
        elif pt in ("LORA", "ADALORA"):
            a, b = ("lora_A.weight", "lora_B.weight") if pt == "LORA" else ("lora_A", "lora_B")
            self._require(mod, {a, b} | ({"lora_E"} if pt == "ADALORA" else set()))
            mn = (self._shape(k[b])[0], self._shape(k[a])[1])
        elif pt == "LOHA":
            self._require(mod, {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"})
            if "hada_t1" in k:
                raise UnsupportedAdapterError("LoHa CP-decomposed (convolution) factors are not supported",
                                              file=self._location, tensor=k["hada_t1"])
            mn, fifo = (self._shape(k["hada_w1_a"])[0], self._shape(k["hada_w1_b"])[1]), False
        elif pt == "LOKR":
            if "lokr_t2" in k:
                raise UnsupportedAdapterError("LoKr CP-decomposed (convolution) factors are not supported",
                                              file=self._location, tensor=k["lokr_t2"])
            w1 = self._factor_shape(mod, "lokr_w1")
            w2 = self._factor_shape(mod, "lokr_w2")
            mn, fifo = (w1[0] * w2[0], w1[1] * w2[1]), False
        elif pt == "VERA":
            self._require(mod, {"vera_lambda_b", "vera_lambda_d"})
            m = self._shape(k["vera_lambda_b"])[0]
            mn = (m, stored[0] if fifo else stored[1])
        else:  # IA3: [1, in] scales inputs (feed-forward), [out, 1] scales outputs
            l_shape = self._shape(k["ia3_l"])
            n_or_m = stored[0] if fifo else stored[1]
            mn = (stored[1] if fifo else stored[0], n_or_m)
            if l_shape not in ((1, mn[1]), (mn[0], 1)):
                raise BaseMismatchError(
                    f"ia3_l {k['ia3_l']!r} has shape {l_shape}, which scales neither the inputs nor the outputs "
                    f"of base tensor {base_key!r} ([out, in] = {mn})",
                    file=self._location, base=base_name, tensor=k["ia3_l"], base_tensor=base_key)
        if kind == "lora" and ("lora_magnitude_vector" in k or "lora_magnitude_vector.weight" in k):
            kind = "dora"
        if kind == "lora" and self.config.get("use_dora"):
            raise AdapterConfigError(f"use_dora is set but module {mod.path!r} has no lora_magnitude_vector",
                                     file=self._location, tensor=next(iter(k.values())))
        expect = (mn[1], mn[0]) if fifo else mn
        if tuple(stored) != tuple(expect):
            raise BaseMismatchError(
                f"adapter module {mod.path!r} implies a base weight of shape {tuple(expect)}"
                f"{' ([in, out], fan_in_fan_out)' if fifo else ''}, but base tensor {base_key!r} has shape "
                f"{tuple(stored)}. Is this adapter for another base model?",
                file=self._location, base=base_name, tensor=next(iter(k.values())), base_tensor=base_key)
        return Target(tensor=base_key, shape=(int(mn[0]), int(mn[1])), role=role, kind=kind,
                      transpose=fifo, source=mod.path)

    def _check_factors(self, mod: _Module) -> None:
        """Factors that cannot be multiplied are refused from headers, before any compute."""
        k, pt = mod.keys, self.peft_type
        spec = PEFT_TYPES[pt]
        for suffix, key in k.items():
            want = spec.dims(suffix)
            if want is not None and len(self._shape(key)) != want:
                raise AdapterWeightsError(f"{key!r} has shape {self._shape(key)}; a {pt} {suffix} must be "
                                          f"{want}-D: the adapter file is malformed", file=self._location, tensor=key)
        for left, right in spec.chains:  # left @ right must be defined
            if left in k and right in k and self._shape(k[left])[1] != self._shape(k[right])[0]:
                raise AdapterWeightsError(
                    f"{k[left]!r} {self._shape(k[left])} and {k[right]!r} {self._shape(k[right])} disagree on "
                    "the rank: their product is undefined; the adapter file is malformed",
                    file=self._location, tensor=k[right])
        if (pt == "ADALORA" and {"lora_A", "lora_E"} <= set(k)
                and self._shape(k["lora_E"])[0] != self._shape(k["lora_A"])[0]):
            raise AdapterWeightsError(f"lora_E {k['lora_E']!r} has {self._shape(k['lora_E'])[0]} rows but lora_A has "
                                      f"rank {self._shape(k['lora_A'])[0]}", file=self._location, tensor=k["lora_E"])

    def _factor_shape(self, mod: _Module, name: str) -> tuple[int, int]:
        k = mod.keys
        if name in k:
            return self._shape(k[name])  # type: ignore[return-value]
        self._require(mod, {f"{name}_a", f"{name}_b"})
        return (self._shape(k[f"{name}_a"])[0], self._shape(k[f"{name}_b"])[1])

    def _require(self, mod: _Module, names: set[str]) -> None:
        missing = sorted(names - set(mod.keys))
        if missing:
            raise AdapterConfigError(
                f"module {mod.path!r} lacks tensors {missing} (has {sorted(mod.keys)}); the adapter file is incomplete",
                file=self._location, tensor=f"{PREFIX}{mod.path}.{missing[0]}")

    def _plan_replacement(self, mod: _Module, base: Checkpoint, base_keys: set[str],
                          base_name: str) -> Target | None:
        for leaf, key in mod.keys.items():
            if leaf != "weight" or len(self._shape(key)) != 2:
                self._skipped.append((key, "modules_to_save: not a 2-D weight"))
        if "weight" not in mod.keys or len(self._shape(mod.keys["weight"])) != 2:
            return None
        key = mod.keys["weight"]
        base_key = match_base_key(mod.path + ".weight", base_keys, artifact=self._location, base_name=base_name)
        if base_key is None:  # a new task head (e.g. "classifier"): no W0 to compare against
            self._skipped.append((key, "modules_to_save: not in the base checkpoint (new head)"))
            return None
        stored, own = tuple(base.info(base_key).shape), self._shape(key)
        if stored != own:
            raise BaseMismatchError(
                f"modules_to_save tensor {key!r} has shape {own} but base tensor {base_key!r} has {stored}",
                file=self._location, base=base_name, tensor=key, base_tensor=base_key)
        return Target(tensor=base_key, shape=(int(own[0]), int(own[1])), role=role_of(base_key),
                      kind="modules_to_save", transpose=False, source=mod.path)

    # --- per-module rank, alpha, scale -------------------------------------------------------
    def rank_alpha(self, path: str) -> tuple[int, float]:
        c = self.config
        r_pat, a_pat = c.get("rank_pattern") or {}, c.get("alpha_pattern") or {}
        r_key, a_key = get_pattern_key(list(r_pat), path), get_pattern_key(list(a_pat), path)
        # _validate_config requires the type's alpha field (lora_alpha, or alpha for LoHa/LoKr)
        alpha_default = c["lora_alpha"] if "lora_alpha" in c else c["alpha"]
        r = r_pat[r_key] if r_key is not None else c["r"]
        alpha = a_pat[a_key] if a_key is not None else alpha_default
        return int(r), float(alpha)

    def _scale(self, path: str, rank_seen: int, tensor: str) -> tuple[int, float, float]:
        r, alpha = self.rank_alpha(path)
        if rank_seen != r:
            raise AdapterConfigError(
                f"module {path!r}: config gives r={r} (r/rank_pattern) but {tensor!r} has rank {rank_seen}; "
                "the scale alpha/r would be wrong", file=self._location, tensor=tensor)
        return r, alpha, F.lora_scale(alpha, r, bool(self.config.get("use_rslora", False)))

    # --- loading ----------------------------------------------------------------------------
    def load_update(self, target_or_tensor: Target | str, base: Checkpoint,
                    w0: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> MatrixUpdate:
        import torch
        mod, target = self._planned(target_or_tensor, base)
        # Every product is formed in `dtype` from the stored factors (float64 runs stay float64:
        # a float32 product would add rounding noise singular values of ~1e-7 s1 to a low-rank dW).
        self._dtype = dtype or torch.float32
        upd = self._compute(mod, target, base, w0)
        warnings = list(upd.warnings)
        if self.base_rewritten:
            upd.base_rewritten = True
            warnings.append(
                f"init_lora_weights={self.init!r} rewrote the base before training: dW is relative to a "
                "modified base, not to this checkpoint (save with path_initial_model_for_weight_conversion "
                "to get a plain LoRA against the original base)")
        if "lora_B.bias" in mod.keys:
            warnings.append("lora_bias: the bias is updated too (not part of this matrix)")
        if "ia3_l" in mod.keys and self._shape(mod.keys["ia3_l"])[1] == 1:
            warnings.append("IA3 on outputs also scales the bias (not part of this matrix)")
        upd.warnings = tuple(warnings)
        return upd

    def _t(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One adapter tensor, upcast to the requested precision (float64 where the formula needs it)."""
        return read(self.ckpt, key, self._location, dtype if dtype is not None else self._dtype)

    def _compute(self, mod: _Module, t: Target, base: Checkpoint, w0: torch.Tensor | None) -> MatrixUpdate:
        import torch
        if mod.replacement:
            new = self._t(mod.keys["weight"], torch.float64)
            return dense_update(t, new - checked_w0(w0, base, t, torch.float64), "modules_to_save", self._dtype)
        return getattr(self, PEFT_TYPES[self.peft_type].compute)(mod, t, base, w0)

    def _loha(self, mod: _Module, t: Target, base: Checkpoint, w0: torch.Tensor | None) -> MatrixUpdate:
        k = mod.keys
        r, alpha, scale = self._scale(mod.path, self._shape(k["hada_w1_a"])[1], k["hada_w1_a"])
        w1a, w1b, w2a, w2b = (self._t(k[n]) for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
        return dense_update(t, F.loha_dense(w1a, w1b, w2a, w2b, scale), "loha", self._dtype,
                            rank=r, alpha=alpha, scale=scale)

    def _ia3(self, mod: _Module, t: Target, base: Checkpoint, w0: torch.Tensor | None) -> MatrixUpdate:
        import torch
        w0_64 = checked_w0(w0, base, t, torch.float64)
        return dense_update(t, F.ia3_dense(w0_64, self._t(mod.keys["ia3_l"], torch.float64)), "ia3", self._dtype)

    def _lora(self, mod: _Module, t: Target, base: Checkpoint, w0: torch.Tensor | None) -> MatrixUpdate:
        import torch
        k = mod.keys
        embedding = "lora_embedding_A" in k
        a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
        a_raw, b_raw = self._t(k[a_key]), self._t(k[b_key])
        r, alpha, scale = self._scale(mod.path, a_raw.shape[0], k[a_key])
        B, A = (F.embedding_lora_factors if embedding else F.lora_factors)(a_raw, b_raw, scale)
        info: UpdateInfo = {"rank": r, "alpha": alpha, "scale": scale,
                            "norm_a": frobenius(a_raw), "norm_b": frobenius(b_raw)}
        if t.kind != "dora":
            return MatrixUpdate(tensor=t.tensor, kind="lora", shape=t.shape, B=B, A=A, role=t.role, **info)
        # planning found one of the two (embedding DoRA stores the vector as a .weight)
        mag_key = k["lora_magnitude_vector"] if "lora_magnitude_vector" in k else k["lora_magnitude_vector.weight"]
        mag = self._t(mag_key, torch.float64)
        if mag.numel() != (t.shape[1] if embedding else t.shape[0]):
            raise BaseMismatchError(f"lora_magnitude_vector {mag_key!r} has {mag.numel()} entries for a "
                                    f"{t.shape} weight", file=self._location, tensor=mag_key, base_tensor=t.tensor)
        dw = F.dora_dense(checked_w0(w0, base, t, torch.float64), B, A, mag, per_column=embedding)
        return dense_update(t, dw, "dora", self._dtype, **info)

    def _adalora(self, mod: _Module, t: Target, base: Checkpoint, w0: torch.Tensor | None) -> MatrixUpdate:
        import torch
        k, c = mod.keys, self.config
        a, b, e = self._t(k["lora_A"]), self._t(k["lora_B"]), self._t(k["lora_E"])  # [r, n], [m, r], [r, 1]
        rank, init_r, alpha = a.shape[0], int(c["init_r"]), float(c["lora_alpha"])
        pruned = self._adalora_pattern_rank(mod.path)
        if pruned is not None and pruned != rank:
            raise AdapterConfigError(f"rank_pattern keeps {pruned} ranks of {mod.path!r} but lora_A has {rank}",
                                     file=self._location, tensor=k["lora_A"])
        if pruned is None and rank != init_r:
            raise AdapterConfigError(f"lora_A has rank {rank} but init_r={init_r} and no rank_pattern entry",
                                     file=self._location, tensor=k["lora_A"])
        # PEFT: scaling = alpha if alpha > 0 else r at (re)creation; ranknum keeps init_r across resizing.
        scale = alpha if alpha > 0 else float(rank if pruned is not None else init_r)
        ranknum = float(self._t(k["ranknum"]).item()) if "ranknum" in k else float(init_r)
        B, A, eff = F.adalora_factors(a, b, e, scale, ranknum)
        info: UpdateInfo = {"rank": rank, "alpha": alpha, "scale": eff, "norm_a": frobenius(a), "norm_b": frobenius(b)}
        if rank == 0:  # every singular value pruned: PEFT keeps an empty module
            return dense_update(t, torch.zeros(t.shape), "adalora", self._dtype, **info)
        # A carries the singular values E (A * E); scale = alpha / (ranknum + 1e-5)
        return MatrixUpdate(tensor=t.tensor, kind="adalora", shape=t.shape, B=B, A=A, role=t.role, **info)

    def _adalora_pattern_rank(self, path: str) -> int | None:
        """AdaLoRA's rank_pattern maps parameter names ("...query.lora_E") to boolean keep-masks."""
        for name, mask in (self.config.get("rank_pattern") or {}).items():
            prefix = name.rsplit(".", 1)[0] if not name.endswith(".default") else name.rsplit(".", 2)[0]
            if prefix == path or prefix.endswith("." + path) or path.endswith("." + prefix):
                return int(sum(bool(x) for x in mask))
        return None

    def _lokr(self, mod: _Module, t: Target, base: Checkpoint, w0: torch.Tensor | None) -> MatrixUpdate:
        k = mod.keys
        r, alpha = self.rank_alpha(mod.path)
        for name in ("lokr_w1_a", "lokr_w2_a"):
            if name in k:
                self._scale(mod.path, self._shape(k[name])[1], k[name])  # decomposed factors must have rank r
        w1 = self._t(k["lokr_w1"]) if "lokr_w1" in k else self._t(k["lokr_w1_a"]) @ self._t(k["lokr_w1_b"])
        w2 = self._t(k["lokr_w2"]) if "lokr_w2" in k else self._t(k["lokr_w2_a"]) @ self._t(k["lokr_w2_b"])
        scale = alpha / r
        return dense_update(t, F.lokr_dense(w1, w2, scale, t.shape), "lokr", self._dtype,
                            rank=r, alpha=alpha, scale=scale)

    def _vera(self, mod: _Module, t: Target, base: Checkpoint, w0: torch.Tensor | None) -> MatrixUpdate:
        k, r = mod.keys, int(self.config["r"])
        lam_b, lam_d = self._t(k["vera_lambda_b"]), self._t(k["vera_lambda_d"])   # [m], [r]
        if lam_d.numel() != r:
            raise AdapterConfigError(f"vera_lambda_d has {lam_d.numel()} entries but r={r}",
                                     file=self._location, tensor=k["vera_lambda_d"])
        vera_a, vera_b = self._vera_projections()                                 # [r, N], [M, r]
        m, n = t.shape
        if vera_a.shape[1] < n or vera_b.shape[0] < m:
            raise BaseMismatchError(f"shared VeRA projections {tuple(vera_b.shape)}/{tuple(vera_a.shape)} are "
                                    f"smaller than module {mod.path!r} ({m} x {n})",
                                    file=self._location, tensor=k["vera_lambda_b"], base_tensor=t.tensor)
        B, A = F.vera_factors(lam_b, lam_d, vera_a.to(lam_b.dtype), vera_b.to(lam_b.dtype), m, n)
        # norm_a / norm_b are of lambda_d * A and lambda_b * B (VeRA's A and B are frozen and shared)
        return MatrixUpdate(tensor=t.tensor, kind="vera", shape=t.shape, B=B, A=A, role=t.role, rank=r,
                            scale=1.0, norm_a=frobenius(A), norm_b=frobenius(B))

    def _vera_projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._vera_ab is not None:
            return self._vera_ab
        if "vera_A" in self.shared and "vera_B" in self.shared:
            ab = (self._t(self.shared["vera_A"]), self._t(self.shared["vera_B"]))
        elif self.config.get("save_projection", True):
            raise AdapterConfigError("save_projection is true but base_model.vera_A / vera_B are missing",
                                     file=self._location, tensor="base_model.vera_A")
        else:  # regenerated like PEFT: shapes span every targeted module
            shapes = [t.shape for _, t in self._plan.values()]
            ab = F.vera_projections(int(self.config["r"]), max(s[0] for s in shapes), max(s[1] for s in shapes),
                                    int(self.config["projection_prng_key"]))
        self._vera_ab = ab
        return ab
