"""zoospectra: what did fine-tuning do to these weights?

Module map (pipeline/ installs as the `zoospectra` package):
  errors       typed error hierarchy
  config       AnalysisConfig (what is computed)
  checkpoint   lazy safetensors access: headers first, one tensor's bytes at a time
  adapters     PEFT adapter formats and full fine-tunes -> exact per-matrix MatrixUpdate
  updates      MatrixUpdate, the one object the math consumes
  spectral/    the math: exact (paper) and fast (structured) analyses, no I/O
  records      analysis results -> Arrow tables (schemas/tables.py)
  store        results root: atomic per-unit commits, manifests, skip/resume
  sql          DuckDB views and macros over the Parquet tree (schemas/*.sql)
  plan         frozen work units from headers and configs only
  execute      Ray executor (local Ray on demand, or a cluster)
  zoo          builds real PEFT adapters / fine-tunes on the shipped MiniLM base (demo, tests)
  cli          the `zoospectra` command
"""
__version__ = "0.1.0"
