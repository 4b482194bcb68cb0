"""zoospectra: what did fine-tuning do to these weights?

The package tree (pipeline/ installs as `zoospectra`):
  errors, config, updates, numeric   the shared vocabulary: typed errors, AnalysisConfig, MatrixUpdate
  io/        checkpoint (lazy safetensors), refs (what an artifact is and where), resolve (arguments
             and named bases -> pinned refs), hub (Hub transport)
  adapters/  PEFT formats and full fine-tunes -> the exact per-matrix MatrixUpdate
  spectral/  the math: exact (the paper's) and fast (structured) analyses; no I/O, no Ray
  run/       plan (frozen units) -> execute (Ray or in-process) -> unit -> records -> store; crawl
  study/     sql (DuckDB views and macros), studies (named figures), report (offline HTML)
  mitigate   intruder scaling written back as a PEFT adapter
  demo/      the sample zoo builder and `zoospectra demo`
  api        the public Python API and the one driver: analyze(), crawl(), connect()
  cli        the `zoospectra` command, a thin wrapper over api
"""
from ._version import __version__
from .api import analyze, connect, crawl
from .config import AnalysisConfig

__all__ = ["AnalysisConfig", "__version__", "analyze", "connect", "crawl"]
