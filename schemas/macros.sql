-- zoospectra: table macros over the views of views.sql (plain DuckDB SQL, no placeholders).
--
-- Intruder counts are SQL over `vectors` (top K_store singular vectors of Wt per side, with
-- max |cos| against every base vector; docs/science.md#vectors). A count for k is only exact when
-- k <= K_store, or when all min(m, n) vectors were stored (--k-store all). The macros check this
-- per matrix and raise an error naming the tensor instead of silently undercounting.
-- Counts use count(DISTINCT j): a (model, tensor) analysed twice (same numbers) counts once.
--
--   SELECT * FROM intruders();                    -- paper defaults eps = 0.5, k = 10
--   SELECT * FROM intruders(eps := 0.3, k := 5);
--   SELECT * FROM intruder_curve(k := 10);        -- Fig. 5: eps = 0.1 .. 0.9
--   SELECT * FROM intruder_fraction_curve(eps := 0.5, fractions := [0.1, 0.5, 1.0]);  -- Fig. 11
--   SELECT * FROM effective_rank_summary();       -- Fig. 6
--   SELECT * FROM model_summary(eps := 0.5, k := 10);
--   SELECT * FROM intruders_vs_null(eps := 0.5, k := 10);   -- observed vs null (--null-draws)
--   SELECT * FROM model_vs_null(eps := 0.5, k := 10);
--   SELECT * FROM intruder_norms(eps := 0.5, k := 10);      -- each intruder's share of the norms

-- min(m, n) per (model, tensor): when that many vectors are stored, every k is answerable.
CREATE OR REPLACE MACRO _matrix_dims() AS TABLE
SELECT model_uid, tensor, min(least(m, n)) AS min_dim FROM matrices GROUP BY model_uid, tensor;

-- Per (model, tensor): vectors stored per side (k_stored) and min(m, n) (null without a matrices row).
CREATE OR REPLACE MACRO _stored() AS TABLE
SELECT s.model_uid, s.model_id, s.tensor, s.k_stored, d.min_dim
FROM (SELECT model_uid, model_id, tensor,
             least(max(j) FILTER (WHERE side = 'U'), max(j) FILTER (WHERE side = 'V')) AS k_stored
      FROM vectors GROUP BY model_uid, model_id, tensor) AS s
LEFT JOIN _matrix_dims() AS d ON d.model_uid = s.model_uid AND d.tensor = s.tensor;

-- true when the top k vectors are all stored, else an error that says what to do.
CREATE OR REPLACE MACRO _k_ok(k, k_stored, min_dim, model_id, tensor) AS
CASE
  WHEN k <= k_stored THEN true
  WHEN min_dim IS NULL THEN error(format(
    'no matrices row for tensor {} of {}: cannot tell whether all of its singular vectors are stored',
    tensor, model_id))
  WHEN k_stored >= min_dim THEN true
  ELSE error(format(
    'k = {} exceeds the {} singular vectors stored for tensor {} of {}; rerun the analysis with a larger --k-store (or --k-store all)',
    k, k_stored, tensor, model_id))
END;

-- true for a usable eps in (0, 1] and k >= 1, else an error naming the argument. eps > 1 would
-- count every vector as an intruder (|cos| <= 1), k < 1 would count none. Joined as a one-row
-- CTE, so the check runs even when there are no rows to count.
CREATE OR REPLACE MACRO _check_eps(eps) AS
CASE WHEN eps IS NOT NULL AND eps > 0 AND eps <= 1 THEN true
     ELSE error(format('eps = {} must lie in (0, 1] (a threshold on max |cos|)', eps)) END;
CREATE OR REPLACE MACRO _check_k(k) AS
CASE WHEN k IS NOT NULL AND k >= 1 THEN true
     ELSE error(format('k = {} must be an integer >= 1 (the top k singular vectors)', k)) END;

-- One row per (model, matrix): intruders among the top k vectors at threshold eps, for U (the
-- paper's number) and V. Matrices without intruders are included with 0.
CREATE OR REPLACE MACRO intruders(eps := 0.5, k := 10) AS TABLE
WITH args_ok AS (SELECT _check_eps(eps) AND _check_k(k) AS ok),
counted AS (
  SELECT model_uid, model_id, tensor,
         count(DISTINCT j) FILTER (WHERE side = 'U' AND j <= k AND max_cos < CAST(eps AS DOUBLE)) AS n_u,
         count(DISTINCT j) FILTER (WHERE side = 'V' AND j <= k AND max_cos < CAST(eps AS DOUBLE)) AS n_v,
         least(max(j) FILTER (WHERE side = 'U'), max(j) FILTER (WHERE side = 'V')) AS k_stored
  FROM vectors GROUP BY model_uid, model_id, tensor
)
SELECT c.model_uid, c.model_id, c.tensor,
       CAST(c.n_u AS INTEGER) AS n_intruders, CAST(c.n_v AS INTEGER) AS n_intruders_v
FROM counted AS c
CROSS JOIN args_ok
LEFT JOIN _matrix_dims() AS d ON d.model_uid = c.model_uid AND d.tensor = c.tensor
WHERE args_ok.ok AND _k_ok(k, c.k_stored, d.min_dim, c.model_id, c.tensor)
ORDER BY c.model_id, c.model_uid, c.tensor;

-- Paper Fig. 5: per model, intruders summed over its matrices for eps = 0.1, 0.2, ..., 0.9.
CREATE OR REPLACE MACRO intruder_curve(k := 10) AS TABLE
WITH args_ok AS (SELECT _check_k(k) AS ok),
counted AS (
  SELECT v.model_uid, v.tensor, e.eps,
         count(DISTINCT v.j) FILTER (WHERE v.side = 'U' AND v.max_cos < e.eps) AS n_u,
         count(DISTINCT v.j) FILTER (WHERE v.side = 'V' AND v.max_cos < e.eps) AS n_v
  FROM (SELECT model_uid, tensor, side, j, max_cos FROM vectors WHERE j <= k) AS v
  CROSS JOIN (SELECT i / 10 AS eps FROM range(1, 10) AS t(i)) AS e
  GROUP BY v.model_uid, v.tensor, e.eps
)
SELECT s.model_uid, s.model_id, c.eps,
       CAST(sum(c.n_u) AS INTEGER) AS n_intruders, CAST(sum(c.n_v) AS INTEGER) AS n_intruders_v
FROM _stored() AS s
JOIN counted AS c ON c.model_uid = s.model_uid AND c.tensor = s.tensor
CROSS JOIN args_ok
WHERE args_ok.ok AND _k_ok(k, s.k_stored, s.min_dim, s.model_id, s.tensor)
GROUP BY s.model_uid, s.model_id, c.eps
ORDER BY s.model_id, s.model_uid, c.eps;

-- Paper Fig. 11: k as a fraction of each matrix, k_f = max(1, ceil(fraction * min(m, n))).
-- Per model and fraction: intruders summed over matrices, the vectors tested (sum of k_f) and
-- their ratio. Fractions above K_store / min(m, n) need --k-store all.
CREATE OR REPLACE MACRO intruder_fraction_curve(eps := 0.5, fractions := [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]) AS TABLE
WITH args_ok AS (SELECT _check_eps(eps) AS ok),
grid AS (
  SELECT s.model_uid, s.model_id, s.tensor, s.k_stored, s.min_dim, f.fraction,
         CAST(greatest(1, ceil(f.fraction * s.min_dim)) AS INTEGER) AS k_f
  FROM _stored() AS s
  CROSS JOIN (SELECT CAST(unnest(fractions) AS DOUBLE) AS fraction) AS f
), counted AS (
  SELECT g.model_uid, g.tensor, g.fraction,
         count(DISTINCT v.j) FILTER (WHERE v.side = 'U' AND v.max_cos < CAST(eps AS DOUBLE)) AS n_u,
         count(DISTINCT v.j) FILTER (WHERE v.side = 'V' AND v.max_cos < CAST(eps AS DOUBLE)) AS n_v
  FROM grid AS g
  JOIN vectors AS v ON v.model_uid = g.model_uid AND v.tensor = g.tensor AND v.j <= g.k_f
  GROUP BY g.model_uid, g.tensor, g.fraction
)
SELECT g.model_uid, g.model_id, g.fraction, CAST(eps AS DOUBLE) AS eps,
       CAST(sum(c.n_u) AS INTEGER) AS n_intruders,
       CAST(sum(c.n_v) AS INTEGER) AS n_intruders_v,
       CAST(sum(g.k_f) AS BIGINT) AS n_vectors,
       sum(c.n_u) / sum(g.k_f) AS intruder_share
FROM grid AS g
JOIN counted AS c ON c.model_uid = g.model_uid AND c.tensor = g.tensor AND c.fraction = g.fraction
CROSS JOIN args_ok
WHERE args_ok.ok AND _k_ok(g.k_f, g.k_stored, g.min_dim, g.model_id, g.tensor)
GROUP BY g.model_uid, g.model_id, g.fraction
ORDER BY g.model_id, g.model_uid, g.fraction;

-- Paper Fig. 6: effective rank of dW per model (level 'model', module null) and per module
-- (level 'module'), with the mean relative update ||dW||_F / ||W0||_F.
CREATE OR REPLACE MACRO effective_rank_summary() AS TABLE
SELECT model_uid, model_id,
       CASE WHEN grouping(module) = 1 THEN 'model' ELSE 'module' END AS level,
       module,
       CAST(count(*) AS INTEGER) AS n_matrices,
       avg(eff_rank) AS eff_rank_mean,
       min(eff_rank) AS eff_rank_min,
       max(eff_rank) AS eff_rank_max,
       avg(rel_update) AS rel_update_mean
FROM matrices
GROUP BY GROUPING SETS ((model_uid, model_id), (model_uid, model_id, module))
ORDER BY model_id, model_uid, level, module;

-- One row per model (from `models` and/or `matrices`): what it is and what fine-tuning did.
-- n_intruders is null for a model with no analysed matrix (not 0: nothing was measured).
CREATE OR REPLACE MACRO model_summary(eps := 0.5, k := 10) AS TABLE
WITH mx AS (
  SELECT model_uid, any_value(model_id) AS model_id, any_value(kind) AS kind,
         CAST(count(DISTINCT tensor) AS INTEGER) AS n_matrices,
         avg(eff_rank) AS eff_rank_mean, avg(rel_update) AS rel_update_mean
  FROM matrices GROUP BY model_uid
), intr AS (
  SELECT model_uid, CAST(sum(n_intruders) AS INTEGER) AS n_intruders,
         CAST(sum(n_intruders_v) AS INTEGER) AS n_intruders_v
  FROM intruders(eps := eps, k := k) GROUP BY model_uid
), ids AS (
  SELECT model_uid FROM models UNION SELECT model_uid FROM mx
)
SELECT ids.model_uid,
       coalesce(md.model_id, mx.model_id) AS model_id,
       coalesce(md.kind, mx.kind) AS kind,
       md.r, md.alpha, md.base_rewritten,
       coalesce(mx.n_matrices, 0) AS n_matrices,
       CAST(eps AS DOUBLE) AS eps, CAST(k AS INTEGER) AS k,
       intr.n_intruders, intr.n_intruders_v,
       mx.eff_rank_mean, mx.rel_update_mean
FROM ids
LEFT JOIN models AS md ON md.model_uid = ids.model_uid
LEFT JOIN mx ON mx.model_uid = ids.model_uid
LEFT JOIN intr ON intr.model_uid = ids.model_uid
ORDER BY model_id, ids.model_uid;

-- Null baseline (docs/science.md#null): the observed intruder count of each (model, matrix)
-- against B random-direction draws of the same spectrum (table null_vectors, written when the
-- analysis ran with --null-draws B). Per matrix: observed n_intruders (U side, as intruders()),
-- the null's mean, standard deviation and central 95% (2.5% / 97.5% quantiles of the B draw
-- counts), and the Monte Carlo tail probability p_tail = (1 + #{draws >= observed}) / (1 + B),
-- whose floor is 1 / (1 + B). Matrices without null draws are left out.
CREATE OR REPLACE MACRO _null_counts(eps, k) AS TABLE
WITH args_ok AS (SELECT _check_eps(eps) AND _check_k(k) AS ok),
counted AS (
  SELECT model_uid, tensor, draw,
         count(DISTINCT j) FILTER (WHERE side = 'U' AND j <= k AND max_cos < CAST(eps AS DOUBLE)) AS n_u,
         count(DISTINCT j) FILTER (WHERE side = 'V' AND j <= k AND max_cos < CAST(eps AS DOUBLE)) AS n_v,
         least(max(j) FILTER (WHERE side = 'U'), max(j) FILTER (WHERE side = 'V')) AS k_stored,
         any_value(model_id) AS model_id
  FROM null_vectors GROUP BY model_uid, tensor, draw
)
SELECT c.model_uid, c.tensor, c.draw, CAST(c.n_u AS INTEGER) AS n_u, CAST(c.n_v AS INTEGER) AS n_v
FROM counted AS c
CROSS JOIN args_ok
LEFT JOIN _matrix_dims() AS d ON d.model_uid = c.model_uid AND d.tensor = c.tensor
WHERE args_ok.ok AND _k_ok(k, c.k_stored, d.min_dim, c.model_id, c.tensor);

CREATE OR REPLACE MACRO intruders_vs_null(eps := 0.5, k := 10) AS TABLE
SELECT o.model_uid, o.model_id, o.tensor, CAST(eps AS DOUBLE) AS eps, CAST(k AS INTEGER) AS k,
       o.n_intruders, CAST(count(*) AS INTEGER) AS n_draws,
       avg(c.n_u) AS null_mean, coalesce(stddev_samp(c.n_u), 0.0) AS null_sd,
       CAST(quantile_disc(c.n_u, 0.025) AS INTEGER) AS null_lo,
       CAST(quantile_disc(c.n_u, 0.975) AS INTEGER) AS null_hi,
       (1 + count(*) FILTER (WHERE c.n_u >= o.n_intruders)) / (1 + count(*)) AS p_tail
FROM intruders(eps := eps, k := k) AS o
JOIN _null_counts(eps, k) AS c ON c.model_uid = o.model_uid AND c.tensor = o.tensor
GROUP BY o.model_uid, o.model_id, o.tensor, o.n_intruders
ORDER BY o.model_id, o.model_uid, o.tensor;

-- The same per model: observed intruders summed over its matrices with null draws, against
-- the B sums of draw b over those matrices (draws are independent across matrices; only draw
-- indices every such matrix has are used).
CREATE OR REPLACE MACRO model_vs_null(eps := 0.5, k := 10) AS TABLE
WITH per AS (
  SELECT model_uid, any_value(model_id) AS model_id, CAST(sum(n_intruders) AS INTEGER) AS n_intruders,
         CAST(count(*) AS INTEGER) AS n_matrices, min(n_draws) AS n_draws
  FROM intruders_vs_null(eps := eps, k := k) GROUP BY model_uid
), sums AS (
  SELECT c.model_uid, c.draw, sum(c.n_u) AS n_u
  FROM _null_counts(eps, k) AS c JOIN per AS p ON p.model_uid = c.model_uid
  WHERE c.draw <= p.n_draws GROUP BY c.model_uid, c.draw
)
SELECT p.model_uid, p.model_id, CAST(eps AS DOUBLE) AS eps, CAST(k AS INTEGER) AS k,
       p.n_matrices, p.n_intruders, p.n_draws,
       avg(s.n_u) AS null_mean, coalesce(stddev_samp(s.n_u), 0.0) AS null_sd,
       CAST(quantile_disc(s.n_u, 0.025) AS INTEGER) AS null_lo,
       CAST(quantile_disc(s.n_u, 0.975) AS INTEGER) AS null_hi,
       (1 + count(*) FILTER (WHERE s.n_u >= p.n_intruders)) / (1 + p.n_draws) AS p_tail
FROM per AS p JOIN sums AS s ON s.model_uid = p.model_uid
GROUP BY p.model_uid, p.model_id, p.n_matrices, p.n_intruders, p.n_draws
ORDER BY p.model_id, p.model_uid;

-- Norm-aware measures (docs/science.md#intruder-norms): each of the top k singular vectors of
-- Wt, both sides, with the share of the norms its singular value carries:
--   share_dw = s_j(Wt)^2 / ||dW||_F^2   (null when dW = 0)
--   share_w0 = s_j(Wt)^2 / ||W0||_F^2   (null when W0 = 0)
-- and whether it is an intruder at eps. A study weights intruders by size with these.
CREATE OR REPLACE MACRO intruder_norms(eps := 0.5, k := 10) AS TABLE
WITH args_ok AS (SELECT _check_eps(eps) AND _check_k(k) AS ok),
mx AS (
  SELECT model_uid, tensor, any_value(layer) AS layer, any_value(module) AS module,
         max(norm_dw) AS norm_dw, max(norm_w0) AS norm_w0
  FROM matrices GROUP BY model_uid, tensor
), v AS (
  SELECT model_uid, any_value(model_id) AS model_id, tensor, side, j,
         avg(sigma) AS sigma, avg(max_cos) AS max_cos
  FROM vectors WHERE j <= k GROUP BY model_uid, tensor, side, j
)
SELECT v.model_uid, v.model_id, v.tensor, mx.layer, mx.module, v.side, CAST(v.j AS INTEGER) AS j,
       v.sigma, v.max_cos, v.max_cos < CAST(eps AS DOUBLE) AS intruder,
       CASE WHEN mx.norm_dw > 0 THEN v.sigma * v.sigma / (mx.norm_dw * mx.norm_dw) END AS share_dw,
       CASE WHEN mx.norm_w0 > 0 THEN v.sigma * v.sigma / (mx.norm_w0 * mx.norm_w0) END AS share_w0,
       CAST(eps AS DOUBLE) AS eps, CAST(k AS INTEGER) AS k
FROM v
JOIN mx ON mx.model_uid = v.model_uid AND mx.tensor = v.tensor
CROSS JOIN args_ok
LEFT JOIN _stored() AS s ON s.model_uid = v.model_uid AND s.tensor = v.tensor
WHERE args_ok.ok AND _k_ok(k, s.k_stored, s.min_dim, v.model_id, v.tensor)
ORDER BY v.model_id, v.model_uid, v.tensor, v.side, v.j;
