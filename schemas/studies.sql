-- zoospectra: cross-model studies, one table macro per figure (plain DuckDB SQL, no placeholders).
--
-- Loaded after macros.sql; zoospectra.studies plots each one and `zoospectra report` renders them
-- all. Every macro reads only the views (models, matrices, vectors, similarity, pairs), so a
-- scoped session (one base model, some kinds) just narrows those views.
--
--   SELECT * FROM study_intruders_eps(k := 10);                   -- paper Fig. 5
--   SELECT * FROM study_intruders_fraction(eps := 0.5);           -- paper Fig. 11
--   SELECT * FROM study_effective_rank();                         -- paper Fig. 6
--   SELECT * FROM study_similarity(eps := 0.5);                   -- paper Figs 1 and 3
--   SELECT * FROM study_checkpoints(eps := 0.5, k := 10);         -- paper Fig. 7
--   SELECT * FROM study_alpha(eps := 0.5, k := 10);               -- alpha = 2r vs fixed alpha
--   SELECT * FROM study_ab_balance();                             -- LoRA+ A/B norm balance
--   SELECT * FROM study_pairs();                                  -- Hu et al. 7.2, phi(i, j)
--   SELECT * FROM study_null(eps := 0.5, k := 10);                -- observed vs random-direction null
--   SELECT * FROM study_intruder_norms(eps := 0.5, k := 10);      -- intruders' share of the norms
--   SELECT * FROM study_groups(eps := 0.5, k := 10);              -- per artifact, for group comparisons
--   SELECT * FROM study_layer_map(eps := 0.5, k := 10);           -- layer x module maps
--   SELECT * FROM study_components(eps := 0.5, k := 10);          -- by component and layer kind

-- One row per model: what it is (from `models`, else from its `matrices` rows), for grouping.
CREATE OR REPLACE MACRO _study_models() AS TABLE
WITH mx AS (
  SELECT model_uid, any_value(model_id) AS model_id, any_value(kind) AS kind,
         max(rank) AS r, max(alpha) AS alpha
  FROM matrices GROUP BY model_uid
)
SELECT coalesce(md.model_uid, mx.model_uid) AS model_uid,
       coalesce(md.model_id, mx.model_id) AS model_id,
       coalesce(md.kind, mx.kind) AS kind,
       CAST(coalesce(md.r, mx.r) AS INTEGER) AS r,
       CAST(coalesce(md.alpha, mx.alpha) AS DOUBLE) AS alpha,
       coalesce(md.use_rslora, false) AS use_rslora
FROM models AS md FULL OUTER JOIN mx ON md.model_uid = mx.model_uid;

-- Fig. 5: per model, intruders summed over its matrices for eps = 0.1 .. 0.9, with kind and rank.
CREATE OR REPLACE MACRO study_intruders_eps(k := 10) AS TABLE
SELECT sm.kind, sm.r, sm.alpha, c.model_uid, c.model_id, c.eps,
       c.n_intruders, c.n_intruders_v, CAST(k AS INTEGER) AS k
FROM intruder_curve(k := k) AS c
JOIN _study_models() AS sm ON sm.model_uid = c.model_uid
ORDER BY sm.kind, sm.r NULLS FIRST, c.model_id, c.model_uid, c.eps;

-- Fig. 11: k as a fraction of each matrix, k_f = max(1, ceil(fraction * min(m, n))). A fraction
-- is kept for a model only when every one of its matrices stored at least k_f vectors (or all
-- of them): higher fractions need the analysis rerun with --k-store all.
CREATE OR REPLACE MACRO study_intruders_fraction(eps := 0.5,
    fractions := [0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.1, 0.2, 0.5, 1.0]) AS TABLE
WITH stored AS (
  SELECT model_uid, tensor,
         least(max(j) FILTER (WHERE side = 'U'), max(j) FILTER (WHERE side = 'V')) AS k_stored
  FROM vectors GROUP BY model_uid, tensor
), dims AS (
  SELECT model_uid, tensor, min(least(m, n)) AS min_dim FROM matrices GROUP BY model_uid, tensor
), grid AS (
  SELECT s.model_uid, s.tensor, f.fraction,
         CAST(greatest(1, ceil(f.fraction * d.min_dim)) AS INTEGER) AS k_f,
         (greatest(1, ceil(f.fraction * d.min_dim)) <= s.k_stored OR s.k_stored >= d.min_dim) AS answerable
  FROM stored AS s
  JOIN dims AS d ON d.model_uid = s.model_uid AND d.tensor = s.tensor
  CROSS JOIN (SELECT CAST(unnest(fractions) AS DOUBLE) AS fraction) AS f
), counted AS (
  SELECT g.model_uid, g.tensor, g.fraction, any_value(g.k_f) AS k_f, bool_and(g.answerable) AS answerable,
         count(DISTINCT v.j) FILTER (WHERE v.side = 'U' AND v.max_cos < CAST(eps AS DOUBLE)) AS n_u,
         count(DISTINCT v.j) FILTER (WHERE v.side = 'V' AND v.max_cos < CAST(eps AS DOUBLE)) AS n_v
  FROM grid AS g
  LEFT JOIN vectors AS v ON v.model_uid = g.model_uid AND v.tensor = g.tensor AND v.j <= g.k_f
  GROUP BY g.model_uid, g.tensor, g.fraction
)
SELECT sm.kind, sm.r, c.model_uid, sm.model_id, c.fraction, CAST(eps AS DOUBLE) AS eps,
       CAST(sum(c.n_u) AS INTEGER) AS n_intruders,
       CAST(sum(c.n_v) AS INTEGER) AS n_intruders_v,
       CAST(sum(c.k_f) AS BIGINT) AS n_vectors,
       sum(c.n_u) / sum(c.k_f) AS intruder_share,
       CAST(count(*) AS INTEGER) AS n_matrices
FROM counted AS c
JOIN _study_models() AS sm ON sm.model_uid = c.model_uid
GROUP BY sm.kind, sm.r, c.model_uid, sm.model_id, c.fraction
HAVING bool_and(c.answerable)
ORDER BY sm.kind, sm.r NULLS FIRST, sm.model_id, c.model_uid, c.fraction;

-- Fig. 6: effective rank of dW per model, layer and module (mean over duplicate analyses).
CREATE OR REPLACE MACRO study_effective_rank() AS TABLE
SELECT sm.kind, sm.r, x.model_uid, sm.model_id, x.layer, x.module,
       avg(x.eff_rank) AS eff_rank, avg(x.stable_rank) AS stable_rank,
       avg(x.rel_update) AS rel_update, CAST(count(DISTINCT x.tensor) AS INTEGER) AS n_matrices
FROM matrices AS x
JOIN _study_models() AS sm ON sm.model_uid = x.model_uid
GROUP BY sm.kind, sm.r, x.model_uid, sm.model_id, x.layer, x.module
ORDER BY sm.kind, sm.r NULLS FIRST, sm.model_id, x.model_uid, x.module, x.layer NULLS FIRST;

-- Figs 1 and 3: |<u0_i, ut_j>| for the top singular vectors of one matrix, with each fine-tuned
-- vector's max |cos| against ALL base vectors (an intruder column has max_cos < eps). Default:
-- the matrix with the most intruders at the analysis defaults (then the largest update).
CREATE OR REPLACE MACRO study_similarity(model_name := NULL, tensor_name := NULL, eps := 0.5) AS TABLE
WITH pick AS (
  SELECT model_uid, tensor FROM matrices
  WHERE (model_name IS NULL OR model_id = model_name OR model_uid = model_name)
    AND (tensor_name IS NULL OR tensor = tensor_name)
    AND model_uid IN (SELECT model_uid FROM similarity)
  ORDER BY intruders_u DESC, rel_update DESC NULLS LAST, model_id, tensor
  LIMIT 1
), cells AS (
  SELECT s.model_uid, any_value(s.model_id) AS model_id, s.tensor, s.i, s.j, avg(s.value) AS value
  FROM similarity AS s JOIN pick AS p ON p.model_uid = s.model_uid AND p.tensor = s.tensor
  GROUP BY s.model_uid, s.tensor, s.i, s.j
), cols AS (
  SELECT v.model_uid, v.tensor, v.j, avg(v.max_cos) AS max_cos, avg(v.sigma) AS sigma
  FROM vectors AS v JOIN pick AS p ON p.model_uid = v.model_uid AND p.tensor = v.tensor
  WHERE v.side = 'U' GROUP BY v.model_uid, v.tensor, v.j
)
SELECT c.model_uid, c.model_id, c.tensor, c.i, c.j, c.value, v.max_cos AS max_cos_j, v.sigma AS sigma_j,
       v.max_cos < CAST(eps AS DOUBLE) AS intruder_j
FROM cells AS c
LEFT JOIN cols AS v ON v.model_uid = c.model_uid AND v.tensor = c.tensor AND v.j = c.j
ORDER BY c.i, c.j;

-- Fig. 7: checkpoints of one adapter, ordered by training step. A checkpoint is a model whose id
-- ends in "@step<N>" or "@checkpoint-<N>" (zoospectra.studies.checkpoint_refs names local
-- checkpoint-* folders that way); `series` is the id before the suffix.
CREATE OR REPLACE MACRO study_checkpoints(eps := 0.5, k := 10) AS TABLE
WITH steps AS (
  SELECT model_uid, model_id, kind, r,
         regexp_extract(model_id, '^(.*)@(step|checkpoint-)([0-9]+)$', 1) AS series,
         CAST(regexp_extract(model_id, '^(.*)@(step|checkpoint-)([0-9]+)$', 3) AS BIGINT) AS step
  FROM _study_models()
  WHERE regexp_matches(model_id, '^(.*)@(step|checkpoint-)([0-9]+)$')
), intr AS (
  SELECT model_uid, sum(n_intruders) AS n_u, sum(n_intruders_v) AS n_v
  FROM intruders(eps := eps, k := k) GROUP BY model_uid
), mx AS (
  SELECT model_uid, avg(eff_rank) AS eff_rank_mean, avg(rel_update) AS rel_update_mean,
         CAST(count(DISTINCT tensor) AS INTEGER) AS n_matrices
  FROM matrices GROUP BY model_uid
)
SELECT st.series, st.step, st.model_uid, st.model_id, st.kind, st.r,
       CAST(eps AS DOUBLE) AS eps, CAST(k AS INTEGER) AS k,
       CAST(coalesce(intr.n_u, 0) AS INTEGER) AS n_intruders,
       CAST(coalesce(intr.n_v, 0) AS INTEGER) AS n_intruders_v,
       mx.eff_rank_mean, mx.rel_update_mean, mx.n_matrices
FROM steps AS st
JOIN mx ON mx.model_uid = st.model_uid
LEFT JOIN intr ON intr.model_uid = st.model_uid
ORDER BY st.series, st.step, st.model_uid;

-- alpha = 2r versus a fixed alpha: per LoRA model, intruders and update size against the rank.
-- alpha_rule: 'alpha = 2r' when alpha is twice the rank, else 'alpha = <alpha>'; rsLoRA apart.
-- Checkpoints of a training run (ids ending in @step<N>) belong to study_checkpoints instead.
CREATE OR REPLACE MACRO study_alpha(eps := 0.5, k := 10) AS TABLE
SELECT CASE WHEN sm.use_rslora THEN 'rsLoRA alpha = ' || format('{:g}', sm.alpha)
            WHEN sm.alpha = 2 * sm.r THEN 'alpha = 2r'
            ELSE 'alpha = ' || format('{:g}', sm.alpha) END AS alpha_rule,
       sm.r, sm.alpha, s.model_uid, s.model_id,
       s.n_matrices, s.n_intruders, s.n_intruders_v, s.eff_rank_mean, s.rel_update_mean,
       s.eps, s.k
FROM model_summary(eps := eps, k := k) AS s
JOIN _study_models() AS sm ON sm.model_uid = s.model_uid
WHERE sm.kind = 'lora' AND sm.r IS NOT NULL AND sm.alpha IS NOT NULL AND s.n_matrices > 0
  AND NOT regexp_matches(s.model_id, '@(step|checkpoint-)[0-9]+$')
ORDER BY alpha_rule, sm.r, s.model_id, s.model_uid;

-- LoRA+ (Hayou et al. 2024): ||A||_F and ||B||_F of the raw factors of every LoRA-family matrix.
CREATE OR REPLACE MACRO study_ab_balance() AS TABLE
SELECT sm.kind, x.rank AS r, x.model_uid, sm.model_id, x.tensor, x.layer, x.module,
       avg(x.norm_a) AS norm_a, avg(x.norm_b) AS norm_b, avg(x.ab_ratio) AS ab_ratio
FROM matrices AS x
JOIN _study_models() AS sm ON sm.model_uid = x.model_uid
WHERE x.norm_a IS NOT NULL AND x.norm_b IS NOT NULL
GROUP BY sm.kind, x.rank, x.model_uid, sm.model_id, x.tensor, x.layer, x.module
ORDER BY sm.model_id, x.model_uid, x.tensor;

-- Hu et al. 2021 sec. 7.2: phi(i, j) between the updates of two adapters, averaged over the base
-- matrices both update. Pairs are stored once (a, b); model_a / model_b filter by id or uid.
CREATE OR REPLACE MACRO study_pairs(model_a := NULL, model_b := NULL) AS TABLE
WITH cells AS (
  SELECT model_uid_a, model_uid_b, tensor, i, j, avg(phi) AS phi
  FROM pairs
  WHERE (model_a IS NULL OR model_a IN (model_id_a, model_uid_a, model_id_b, model_uid_b))
    AND (model_b IS NULL OR model_b IN (model_id_a, model_uid_a, model_id_b, model_uid_b))
  GROUP BY model_uid_a, model_uid_b, tensor, i, j
)
SELECT ma.model_id AS model_id_a, mb.model_id AS model_id_b, c.model_uid_a, c.model_uid_b,
       ma.kind AS kind_a, mb.kind AS kind_b, ma.r AS r_a, mb.r AS r_b,
       c.i, c.j, avg(c.phi) AS phi, CAST(count(*) AS INTEGER) AS n_matrices
FROM cells AS c
JOIN _study_models() AS ma ON ma.model_uid = c.model_uid_a
JOIN _study_models() AS mb ON mb.model_uid = c.model_uid_b
GROUP BY ALL
ORDER BY model_id_a, model_id_b, c.model_uid_a, c.model_uid_b, c.i, c.j;

-- Null baseline (docs/science.md#null): per model, observed intruders against the random-
-- direction null of the same spectra (model_vs_null), with kind and rank. Needs --null-draws.
CREATE OR REPLACE MACRO study_null(eps := 0.5, k := 10) AS TABLE
SELECT sm.kind, sm.r, n.model_uid, n.model_id, n.eps, n.k, n.n_matrices, n.n_intruders,
       n.n_draws, n.null_mean, n.null_sd, n.null_lo, n.null_hi, n.p_tail
FROM model_vs_null(eps := eps, k := k) AS n
JOIN _study_models() AS sm ON sm.model_uid = n.model_uid
ORDER BY sm.kind, sm.r NULLS FIRST, n.model_id, n.model_uid;

-- Norm-aware measures: every top-k vector of every matrix (U side) with its share of ||dW||_F^2
-- and ||W0||_F^2 (intruder_norms) and whether it is an intruder.
CREATE OR REPLACE MACRO study_intruder_norms(eps := 0.5, k := 10) AS TABLE
SELECT sm.kind, sm.r, x.model_uid, x.model_id, x.tensor, x.layer, x.module, x.j, x.sigma,
       x.max_cos, x.intruder, x.share_dw, x.share_w0, x.eps, x.k
FROM intruder_norms(eps := eps, k := k) AS x
JOIN _study_models() AS sm ON sm.model_uid = x.model_uid
WHERE x.side = 'U'
ORDER BY sm.kind, sm.r NULLS FIRST, x.model_id, x.model_uid, x.tensor, x.j;

-- One row per artifact (checkpoints of a training run apart) with the numbers the group
-- comparisons use: intruders per matrix, the intruders' share of ||W0||_F^2 (sum over U-side
-- intruders of s_j^2 over the sum of ||W0||_F^2 of the model's matrices) and the mean effective
-- rank; zoospectra.studies adds bootstrap intervals and effect sizes per grouping in Python.
CREATE OR REPLACE MACRO study_groups(eps := 0.5, k := 10) AS TABLE
WITH intr AS (
  SELECT model_uid, sum(n_intruders) AS n_u, count(*) AS n_mat
  FROM intruders(eps := eps, k := k) GROUP BY model_uid
), energy AS (
  SELECT model_uid, coalesce(sum(sigma * sigma) FILTER (WHERE intruder AND side = 'U'), 0.0) AS e_intr
  FROM intruder_norms(eps := eps, k := k) GROUP BY model_uid
), mx AS (
  SELECT model_uid, sum(n2) AS e_w0, avg(er) AS eff_rank_mean
  FROM (SELECT model_uid, tensor, max(norm_w0) * max(norm_w0) AS n2, avg(eff_rank) AS er
        FROM matrices GROUP BY model_uid, tensor) GROUP BY model_uid
)
SELECT sm.kind, sm.r, sm.alpha,
       CASE WHEN sm.kind <> 'lora' OR sm.r IS NULL OR sm.alpha IS NULL THEN NULL
            WHEN sm.use_rslora THEN 'rsLoRA alpha = ' || format('{:g}', sm.alpha)
            WHEN sm.alpha = 2 * sm.r THEN 'alpha = 2r'
            ELSE 'alpha = ' || format('{:g}', sm.alpha) END AS alpha_rule,
       sm.model_uid, sm.model_id, CAST(intr.n_mat AS INTEGER) AS n_matrices,
       CAST(intr.n_u AS INTEGER) AS n_intruders, intr.n_u / intr.n_mat AS intruders_per_matrix,
       CASE WHEN mx.e_w0 > 0 THEN energy.e_intr / mx.e_w0 END AS intruder_share_w0,
       mx.eff_rank_mean, CAST(eps AS DOUBLE) AS eps, CAST(k AS INTEGER) AS k
FROM intr
JOIN _study_models() AS sm ON sm.model_uid = intr.model_uid
JOIN energy ON energy.model_uid = intr.model_uid
JOIN mx ON mx.model_uid = intr.model_uid
WHERE NOT regexp_matches(sm.model_id, '@(step|checkpoint-)[0-9]+$')
ORDER BY sm.kind, sm.r NULLS FIRST, sm.model_id, sm.model_uid;

-- Layer maps: per model, layer and module (matrices with a block index), intruders (U side,
-- summed over duplicate tensors of a cell) and the effective rank of dW. zoospectra.studies adds
-- per-kind rows (mean over the kind's artifacts, with bootstrap intervals) in Python.
CREATE OR REPLACE MACRO study_layer_map(eps := 0.5, k := 10) AS TABLE
WITH x AS (
  SELECT model_uid, tensor, any_value(layer) AS layer, any_value(module) AS module,
         avg(eff_rank) AS eff_rank
  FROM matrices WHERE layer IS NOT NULL GROUP BY model_uid, tensor
)
SELECT sm.kind, sm.r, x.model_uid, sm.model_id, x.layer, x.module,
       CAST(sum(i.n_intruders) AS INTEGER) AS n_intruders, avg(x.eff_rank) AS eff_rank,
       CAST(eps AS DOUBLE) AS eps, CAST(k AS INTEGER) AS k
FROM x
JOIN intruders(eps := eps, k := k) AS i ON i.model_uid = x.model_uid AND i.tensor = x.tensor
JOIN _study_models() AS sm ON sm.model_uid = x.model_uid
WHERE NOT regexp_matches(sm.model_id, '@(step|checkpoint-)[0-9]+$')
GROUP BY sm.kind, sm.r, x.model_uid, sm.model_id, x.layer, x.module
ORDER BY sm.kind, sm.model_id, x.model_uid, x.module, x.layer;

-- What kind of layer a matrix is, from its key and stored shape: 'convolution' (a Conv2d kernel,
-- kernel_shape set), 'feed-forward' (ff / mlp blocks, fc1/fc2, gate/up/down_proj, BERT's
-- intermediate and output dense), 'attention' (attn / attention paths, q/k/v/out projections,
-- including a transformer block's proj_in/proj_out), else 'other' (time embeddings, heads, ...).
CREATE OR REPLACE MACRO layer_kind(tensor, kernel_shape) AS
CASE WHEN kernel_shape IS NOT NULL THEN 'convolution'
     WHEN regexp_matches(tensor, '(^|\.)(ff|mlp|ffn|feed_forward|ff_context)\.')
          OR regexp_matches(tensor, '(^|\.)(fc1|fc2|c_fc|gate_proj|up_proj|down_proj|proj_mlp|w1|w2|w3)\.weight$')
          OR regexp_matches(tensor, '(^|\.)intermediate\.dense\.') THEN 'feed-forward'
     WHEN regexp_matches(tensor, 'attn|attention')
          OR regexp_matches(tensor, '(^|\.)(to_q|to_k|to_v|to_out|q_proj|k_proj|v_proj|o_proj|out_proj|query|key|value|qkv)(\.|$)')
          THEN 'attention'
     WHEN regexp_matches(tensor, '(^|\.)output\.dense\.') THEN 'feed-forward'
     ELSE 'other' END;

-- Per model, component (unet, transformer, text_encoder, text_encoder_2; 'model' for one-model
-- checkpoints) and layer kind: matrices, intruders (U side) per matrix, mean effective rank and
-- mean relative update. Needs schema >= 1.3 rows (matrices.component, kernel_shape).
CREATE OR REPLACE MACRO study_components(eps := 0.5, k := 10) AS TABLE
WITH x AS (
  SELECT model_uid, tensor, any_value(component) AS component, any_value(kernel_shape) AS kernel_shape,
         avg(eff_rank) AS eff_rank, avg(rel_update) AS rel_update
  FROM matrices GROUP BY model_uid, tensor
)
SELECT sm.kind, sm.r, x.model_uid, sm.model_id, coalesce(x.component, 'model') AS component,
       layer_kind(x.tensor, x.kernel_shape) AS layer_kind,
       CAST(count(*) AS INTEGER) AS n_matrices, CAST(sum(i.n_intruders) AS INTEGER) AS n_intruders,
       sum(i.n_intruders) / count(*) AS intruders_per_matrix,
       avg(x.eff_rank) AS eff_rank_mean, avg(x.rel_update) AS rel_update_mean,
       CAST(eps AS DOUBLE) AS eps, CAST(k AS INTEGER) AS k
FROM x
JOIN intruders(eps := eps, k := k) AS i ON i.model_uid = x.model_uid AND i.tensor = x.tensor
JOIN _study_models() AS sm ON sm.model_uid = x.model_uid
GROUP BY sm.kind, sm.r, x.model_uid, sm.model_id, coalesce(x.component, 'model'),
         layer_kind(x.tensor, x.kernel_shape)
ORDER BY sm.kind, sm.model_id, x.model_uid, component, layer_kind;
