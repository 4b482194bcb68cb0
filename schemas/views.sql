-- zoospectra: DuckDB views over a results root (plain DuckDB SQL).
--
-- zoospectra.sql substitutes {root} (the root path or URI, quote-escaped) and, for a table with no
-- files yet, swaps its block for an empty view typed from schemas/tables.py. Each block starts
-- with a `-- view: <name>` line; keep one CREATE statement per block.
--
-- Reading the results WITHOUT zoospectra, in any DuckDB (RESULTS = the results root):
--   SELECT * FROM read_parquet('RESULTS/units/*/matrices.parquet',   union_by_name = true);
--   SELECT * FROM read_parquet('RESULTS/units/*/vectors.parquet',    union_by_name = true);
--   SELECT * FROM read_parquet('RESULTS/units/*/spectra.parquet',    union_by_name = true);
--   SELECT * FROM read_parquet('RESULTS/units/*/similarity.parquet', union_by_name = true);
--   SELECT * FROM read_parquet('RESULTS/units/*/pairs.parquet',      union_by_name = true);
--   SELECT * FROM read_parquet('RESULTS/units/*/null_vectors.parquet', union_by_name = true);
--   SELECT * FROM read_parquet('RESULTS/models/*.parquet',           union_by_name = true);
--   SELECT * FROM read_parquet('RESULTS/runs/*.parquet',             union_by_name = true);
--   SELECT * FROM read_parquet('RESULTS/errors/*/*.parquet',         union_by_name = true);
--   SELECT * FROM read_parquet('RESULTS/catalog/*.parquet',          union_by_name = true);
-- RESULTS/_staging/ holds in-flight writes: never read it.
--
-- The plain unit globs above give exactly the rows of the views below when `zoospectra verify
-- RESULTS` exits 0: every folder in RESULTS/units/ is then a committed unit whose files match
-- their recorded sizes and checksums. On a damaged root (a truncated or changed file, a deleted
-- marker, a copied unit folder, a stray folder such as units/.tmp-partial) the globs can fail or
-- double count, while the views skip the damage; a rerun of analyze/crawl moves it to
-- RESULTS/quarantine/ (never read by the views) and recomputes it, after which the globs and the
-- views agree again. On object stores (s3://, gs://, ...) files of a unit appear one by one and
-- `_SUCCESS` is written last: there keep only committed units with
--   ... read_parquet('RESULTS/units/*/matrices.parquet', union_by_name = true, filename = true)
--   WHERE parse_dirpath(filename) IN (SELECT parse_dirpath(file) FROM glob('RESULTS/units/*/_SUCCESS'))
-- union_by_name = true lets files of older schema versions (fewer columns) be read together.
--
-- After `zoospectra compact RESULTS`, committed units' rows live in RESULTS/compacted/<gen>/
-- (<table>.parquet, or bases/<key>/<table>.parquet); a generation counts once its _SUCCESS exists,
-- and a unit folder still in units/ whose unit a generation holds is a leftover: read one or
-- the other, never both (the views below do). `units.path` is the unit folder or the generation.
--
-- The unit views read an explicit list of files, {files:<table>}, that zoospectra computes when it
-- connects: the files of the compacted generations, and of the units that pass the cheap checks of pipeline/run/integrity.py (marker present and
-- matching _done.json, unit id == folder name, recorded files present with recorded sizes) and that
-- the last `verify` did not find damaged. No file is hashed at query time. The list is a snapshot:
-- units committed after connect() appear on the next connect(). {union_by_name} is false when every
-- listed unit has the current schema version (its files then have one schema: binding a view over
-- 1,000 files took 0.9 s instead of 27 s, bench/verify_bench.py), true otherwise.

-- view: units
CREATE OR REPLACE VIEW units AS
SELECT unit_id, path FROM (VALUES {units}) AS u(unit_id, path);

-- view: matrices
CREATE OR REPLACE VIEW matrices AS
SELECT * FROM read_parquet({files:matrices}, union_by_name = {union_by_name});

-- view: vectors
CREATE OR REPLACE VIEW vectors AS
SELECT * FROM read_parquet({files:vectors}, union_by_name = {union_by_name});

-- view: spectra
CREATE OR REPLACE VIEW spectra AS
SELECT * FROM read_parquet({files:spectra}, union_by_name = {union_by_name});

-- view: similarity
CREATE OR REPLACE VIEW similarity AS
SELECT * FROM read_parquet({files:similarity}, union_by_name = {union_by_name});

-- view: pairs
CREATE OR REPLACE VIEW pairs AS
SELECT * FROM read_parquet({files:pairs}, union_by_name = {union_by_name});

-- view: null_vectors
CREATE OR REPLACE VIEW null_vectors AS
SELECT * FROM read_parquet({files:null_vectors}, union_by_name = {union_by_name});

-- view: models
CREATE OR REPLACE VIEW models AS
SELECT * FROM read_parquet('{root}/models/*.parquet', union_by_name = true);

-- view: runs
CREATE OR REPLACE VIEW runs AS
SELECT * FROM read_parquet('{root}/runs/*.parquet', union_by_name = true);

-- view: errors
CREATE OR REPLACE VIEW errors AS
SELECT * FROM read_parquet('{root}/errors/*/*.parquet', union_by_name = true);

-- view: catalog
CREATE OR REPLACE VIEW catalog AS
SELECT * FROM read_parquet('{root}/catalog/*.parquet', union_by_name = true);

-- view: open_errors
-- Errors not resolved since: an error about (model, tensor) closes once that pair is in
-- `matrices` (a later run analysed it, in whatever unit); one about a model only, once the model
-- has any matrix; one about neither (a whole unit), once its unit is committed. Plan-stage
-- errors of unknown models (unit_id 'plan') stay open until fixed at the source.
CREATE OR REPLACE VIEW open_errors AS
SELECT e.* FROM errors AS e
WHERE CASE
  WHEN e.model_uid IS NOT NULL AND e.tensor IS NOT NULL THEN NOT EXISTS (
    SELECT 1 FROM matrices AS m WHERE m.model_uid = e.model_uid AND m.tensor = e.tensor)
  WHEN e.model_uid IS NOT NULL THEN NOT EXISTS (
    SELECT 1 FROM matrices AS m WHERE m.model_uid = e.model_uid)
  ELSE NOT EXISTS (SELECT 1 FROM units AS u WHERE u.unit_id = e.unit_id)
END;
