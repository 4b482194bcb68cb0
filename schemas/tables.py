"""The data contract: explicit Arrow schemas for every results table (docs/data-model.md#tables).

Columns may be added (bump SCHEMA_VERSION's minor part), never silently renamed or retyped.
Every Parquet file carries `zoospectra.schema_version` and `zoospectra.table` in its metadata.
Ranks and indices (`j`, `i`, `idx`, `argmax_i`) are 1-based: j = 1 is the largest singular value.
"""
from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = "1.3"  # 1.1: models.warnings, matrices.warnings, runs.n_solver_fallbacks, mode, base_svd_*
# 1.2: null_vectors (random-direction null draws, written only with null_draws > 0), runs.n_nodes, runs.cluster
# 1.3: models.base_quant, how the base matrices were dequantised (null: float base);
#      matrices.component (unet|transformer|text_encoder|text_encoder_2 of an image-model base, null
#      for one-model checkpoints), matrices.kernel_shape (stored [out, in, kh, kw] of a convolution
#      analysed as the matrix [out, in*kh*kw]; null for 2-D weights)
META_VERSION = b"zoospectra.schema_version"
META_TABLE = b"zoospectra.table"

_str, _i32, _i64, _f64, _bool = pa.string(), pa.int32(), pa.int64(), pa.float64(), pa.bool_()
_ts = pa.timestamp("us", tz="UTC")


def _f(name: str, typ: pa.DataType, nullable: bool = True, doc: str = "") -> pa.Field:
    return pa.field(name, typ, nullable=nullable, metadata={b"doc": doc.encode()} if doc else None)


# Identity of one analysed artifact (adapter, fine-tune) and of the unit that produced a row.
_UNIT = [
    _f("run_id", _str, False, "run that wrote the row"),
    _f("unit_id", _str, False, "unit of work (base tensor + batch of updates)"),
]
_MODEL = [
    _f("model_uid", _str, False, "stable id of (source, model_id, revision)"),
    _f("model_id", _str, False, "Hub repo id or local name"),
]

MODELS = pa.schema(
    [
        _f("run_id", _str, False),
        *_MODEL,
        _f("revision", _str, doc="commit sha (hub) or content hash (local)"),
        _f("kind", _str, False, "lora|dora|adalora|loha|lokr|vera|ia3|full|mixed"),
        _f("source", _str, False, "local|hub"),
        _f("location", _str, doc="local path or hub URL (never a token)"),
        _f("base_uid", _str, False),
        _f("base_id", _str, False),
        _f("base_revision", _str),
        _f("peft_type", _str),
        _f("r", _i32),
        _f("alpha", _f64),
        _f("use_rslora", _bool),
        _f("use_dora", _bool),
        _f("fan_in_fan_out", _bool),
        _f("target_modules", pa.list_(_str)),
        _f("init", _str, doc="init_lora_weights as configured"),
        _f("base_rewritten", _bool,
           doc="init (pissa, olora, corda, ...) rewrote the base: dW is against a modified base"),
        _f("n_targets", _i32, doc="base matrices this artifact updates (planned)"),
        _f("config_json", _str, doc="adapter_config.json as read"),
        _f("created_at", _ts),
        _f("skipped", pa.list_(_str), doc="tensors of the artifact not analysed, each 'key: reason'"),
        _f("warnings", pa.list_(_str), doc="what the planner doubted, e.g. a config naming another base"),
        _f("base_quant", _str, doc="quantised base, as dequantised: 'bnb-nf4 (double quant, blocksize 64, "
                                   "bfloat16)', 'gguf Q4_K; gguf Q6_K'; null for a float base"),
    ]
)

MATRICES = pa.schema(
    [
        *_UNIT,
        *_MODEL,
        _f("base_uid", _str, False),
        _f("tensor", _str, False, "base checkpoint key, e.g. model.layers.0.self_attn.q_proj.weight"),
        _f("module", _str, doc="module name without layer prefix, e.g. self_attn.q_proj"),
        _f("layer", _i32, doc="transformer block index, null if none"),
        _f("role", _str, False, "linear|embedding|head|other"),
        _f("kind", _str, False, "update kind for this matrix"),
        _f("m", _i32, False),
        _f("n", _i32, False),
        _f("rank", _i32, doc="adapter rank r (LoRA family)"),
        _f("alpha", _f64),
        _f("scale", _f64, doc="scale actually applied to B @ A"),
        _f("norm_w0", _f64, doc="||W0||_F"),
        _f("norm_dw", _f64, doc="||dW||_F"),
        _f("spec_norm_dw", _f64, doc="||dW||_2"),
        _f("stable_rank", _f64, doc="||dW||_F^2 / ||dW||_2^2"),
        _f("rel_update", _f64, doc="||dW||_F / ||W0||_F"),
        _f("eff_rank", _f64, doc="Roy-Vetterli effective rank of dW"),
        _f("norm_a", _f64, doc="||A||_F (raw factor)"),
        _f("norm_b", _f64, doc="||B||_F (raw factor)"),
        _f("ab_ratio", _f64, doc="||B||_F / ||A||_F"),
        _f("intr_k", _i32, False, "k used for the intruder columns below"),
        _f("intr_eps", _f64, False, "eps used for the intruder columns below"),
        _f("intruders_u", _i32, False, "intruders among the top-k left singular vectors of Wt"),
        _f("intruders_v", _i32, False, "same, right singular vectors"),
        _f("amplification", _f64, doc="||dW||_F / ||U^T W0 V^T||_F, top-r of dW (Hu et al. 7.3)"),
        _f("amp_rank", _i32, doc="r used for amplification"),
        _f("base_rewritten", _bool,
           doc="init (pissa, olora, corda, ...) rewrote the base: dW is against a modified base"),
        _f("mode", _str, False, "exact|fast"),
        _f("device", _str, False),
        _f("seconds", _f64, False),
        _f("warnings", pa.list_(_str), doc="caveats of this matrix's numbers (modified base, bias also updated, ...)"),
        _f("component", _str,
           doc="image-model component: unet|transformer|text_encoder|text_encoder_2 (null: one model)"),
        _f("kernel_shape", pa.list_(_i32),
           doc="stored [out, in, kh, kw] of a convolution analysed as [out, in*kh*kw]; null for 2-D weights"),
    ]
)

VECTORS = pa.schema(
    [
        *_UNIT,
        *_MODEL,
        _f("tensor", _str, False),
        _f("side", _str, False, "U (left) or V (right)"),
        _f("j", _i32, False, "1-based rank of the singular vector of Wt"),
        _f("sigma", _f64, False, "s_j(Wt)"),
        _f("max_cos", _f64, False, "max_i |<v_j(Wt), v_i(W0)>| over all base vectors"),
        _f("argmax_i", _i32, False, "1-based index of that base vector"),
        _f("base_sigma", _f64, False, "s_i(W0) at argmax_i"),
    ]
)

NULL_VECTORS = pa.schema(
    [
        *_UNIT,
        *_MODEL,
        _f("tensor", _str, False),
        _f("draw", _i32, False, "1-based null draw (docs/science.md#null)"),
        _f("null_rank", _i32, False, "r: nonzero singular values of dW the draws reuse"),
        _f("side", _str, False, "U (left) or V (right)"),
        _f("j", _i32, False, "1-based rank of the singular vector of Wt_null"),
        _f("sigma", _f64, False, "s_j(Wt_null), Wt_null = W0 + U_r diag(s(dW)) V_r^T"),
        _f("max_cos", _f64, False, "max_i |<v_j(Wt_null), v_i(W0)>| over all base vectors"),
    ]
)

SPECTRA = pa.schema(
    [
        *_UNIT,
        *_MODEL,
        _f("tensor", _str, False),
        _f("which", _str, False, "w0|wt|dw (w0 rows carry the base's uid/id)"),
        _f("idx", _i32, False, "1-based"),
        _f("sigma", _f64, False),
    ]
)

SIMILARITY = pa.schema(
    [
        *_UNIT,
        *_MODEL,
        _f("tensor", _str, False),
        _f("i", _i32, False, "1-based base singular vector"),
        _f("j", _i32, False, "1-based fine-tuned singular vector"),
        _f("value", _f64, False, "|<u0_i, ut_j>|"),
    ]
)

PAIRS = pa.schema(
    [
        *_UNIT,
        _f("tensor", _str, False),
        _f("model_uid_a", _str, False),
        _f("model_id_a", _str, False),
        _f("model_uid_b", _str, False),
        _f("model_id_b", _str, False),
        _f("i", _i32, False),
        _f("j", _i32, False),
        _f("phi", _f64, False, "||U_a[:, :i]^T U_b[:, :j]||_F^2 / min(i, j), U of dW"),
    ]
)

RUNS = pa.schema(
    [
        _f("run_id", _str, False),
        _f("started_at", _ts),
        _f("finished_at", _ts),
        _f("status", _str, False, "running|finished|failed"),
        _f("n_units", _i32),
        _f("n_done", _i32),
        _f("n_skipped", _i32),
        _f("n_failed", _i32),
        _f("config_json", _str),
        _f("command", _str),
        _f("version", _str),
        _f("host", _str),
        _f("n_solver_fallbacks", _i32, doc="fast engine: solves that fell back to a dense SVD"),
        _f("mode", _str, doc="exact|fast (also in config_json)"),
        _f("base_svd_computed", _i32, doc="base matrices decomposed by this run (stored for reuse)"),
        _f("base_svd_reused", _i32, doc="base matrices whose stored decomposition this run reused"),
        _f("n_nodes", _i32, doc="Ray nodes that ran this run's units (1 for --local)"),
        _f("cluster", _str, doc="where it ran: a local Ray it started, a cluster address, or in-process"),
    ]
)

ERRORS = pa.schema(
    [
        *_UNIT,
        _f("model_uid", _str),
        _f("model_id", _str),
        _f("tensor", _str),
        _f("stage", _str, False, "plan|load|analyze|execute|write|hub|discover (zoospectra.errors.Stage)"),
        _f("error_type", _str, False),
        _f("message", _str, False),
        _f("context_json", _str),
        _f("at", _ts),
    ]
)

CATALOG = pa.schema(
    [
        _f("repo_id", _str, False),
        _f("sha", _str, False),
        _f("kind", _str, False, "adapter|full"),
        _f("base_model", _str, False),
        _f("last_modified", _ts),
        _f("gated", _str),
        _f("private", _bool),
        _f("discovered_at", _ts),
        _f("run_id", _str, False),
    ]
)

TABLES: dict[str, pa.Schema] = {
    "models": MODELS,
    "matrices": MATRICES,
    "vectors": VECTORS,
    "null_vectors": NULL_VECTORS,
    "spectra": SPECTRA,
    "similarity": SIMILARITY,
    "pairs": PAIRS,
    "runs": RUNS,
    "errors": ERRORS,
    "catalog": CATALOG,
}


def schema_for(table: str) -> pa.Schema:
    """The schema with its version metadata attached."""
    return TABLES[table].with_metadata({META_VERSION: SCHEMA_VERSION.encode(), META_TABLE: table.encode()})


def to_table(table: str, rows: list[dict]) -> pa.Table:
    """Rows (dicts) to an Arrow table of exactly the declared schema; missing nullable columns are null."""
    schema = schema_for(table)
    cols = {f.name: [r.get(f.name) for r in rows] for f in schema}
    return pa.Table.from_pydict(cols, schema=schema)
