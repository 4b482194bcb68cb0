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
--   SELECT * FROM read_parquet('RESULTS/models/*.parquet',           union_by_name = true);
--   SELECT * FROM read_parquet('RESULTS/runs/*.parquet',             union_by_name = true);
--   SELECT * FROM read_parquet('RESULTS/errors/*/*.parquet',         union_by_name = true);
--   SELECT * FROM read_parquet('RESULTS/catalog/*.parquet',          union_by_name = true);
-- RESULTS/_staging/ holds in-flight writes: never read it.
--
-- On a local disk a unit directory (units/<unit_id>/) appears by one atomic rename, so the globs
-- above only ever see whole units. On object stores (s3://, gs://, ...) files of a unit appear one
-- by one and `_SUCCESS` is written last: keep only committed units, as the views below do, with
--   ... read_parquet('RESULTS/units/*/matrices.parquet', union_by_name = true, filename = true)
--   WHERE parse_dirpath(filename) IN (SELECT parse_dirpath(file) FROM glob('RESULTS/units/*/_SUCCESS'))
-- union_by_name = true lets files of older schema versions (fewer columns) be read together.

-- view: units
CREATE OR REPLACE VIEW units AS
SELECT parse_filename(parse_dirpath(file)) AS unit_id, parse_dirpath(file) AS path
FROM glob('{root}/units/*/_SUCCESS');

-- view: matrices
CREATE OR REPLACE VIEW matrices AS
SELECT * EXCLUDE (filename)
FROM read_parquet('{root}/units/*/matrices.parquet', union_by_name = true, filename = true)
WHERE parse_dirpath(filename) IN (SELECT path FROM units);

-- view: vectors
CREATE OR REPLACE VIEW vectors AS
SELECT * EXCLUDE (filename)
FROM read_parquet('{root}/units/*/vectors.parquet', union_by_name = true, filename = true)
WHERE parse_dirpath(filename) IN (SELECT path FROM units);

-- view: spectra
CREATE OR REPLACE VIEW spectra AS
SELECT * EXCLUDE (filename)
FROM read_parquet('{root}/units/*/spectra.parquet', union_by_name = true, filename = true)
WHERE parse_dirpath(filename) IN (SELECT path FROM units);

-- view: similarity
CREATE OR REPLACE VIEW similarity AS
SELECT * EXCLUDE (filename)
FROM read_parquet('{root}/units/*/similarity.parquet', union_by_name = true, filename = true)
WHERE parse_dirpath(filename) IN (SELECT path FROM units);

-- view: pairs
CREATE OR REPLACE VIEW pairs AS
SELECT * EXCLUDE (filename)
FROM read_parquet('{root}/units/*/pairs.parquet', union_by_name = true, filename = true)
WHERE parse_dirpath(filename) IN (SELECT path FROM units);

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
