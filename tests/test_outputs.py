"""Output ownership (zoospectra.outputs) and the zoo cache: nothing the tool did not write is
ever removed. The CLI-level cases are in test_cli_misuse.py; these cover the library paths."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from zoospectra.demo.run import claim_cache
from zoospectra.demo.zoo import BUILDING, DONE, build_zoo, lora
from zoospectra.errors import OutputError
from zoospectra.outputs import MARKER, claim_output, claim_results_root, replace_output


def test_claim_output_marks_new_and_empty_directories(tmp_path: Path) -> None:
    new, empty = tmp_path / "a" / "new", tmp_path / "empty"
    empty.mkdir()
    for d in (new, empty):
        assert claim_output(d, "report") == d.resolve()
        assert json.loads((d / MARKER).read_text())["command"] == "report"
    (empty / "index.html").write_text("x")
    assert claim_output(empty, "report") == empty.resolve()      # its own previous output
    with pytest.raises(OutputError, match="output of zoospectra report"):
        claim_output(empty, "mitigate", force=True)


def test_replace_output_keeps_the_marker_and_refuses_foreign_directories(tmp_path: Path) -> None:
    out = claim_output(tmp_path / "o", "report")
    (out / "sub").mkdir()
    (out / "sub" / "f").write_text("x")
    (out / "g").write_text("y")
    replace_output(out, "report")
    assert [p.name for p in out.iterdir()] == [MARKER]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep").write_text("k")
    with pytest.raises(OutputError, match="not a zoospectra report output"):
        replace_output(foreign, "report")
    assert (foreign / "keep").read_text() == "k"


def test_results_root_rules(tmp_path: Path) -> None:
    claim_results_root(str(tmp_path / "new"))                    # new: fine, nothing created
    assert not (tmp_path / "new").exists()
    (tmp_path / "root" / "runs").mkdir(parents=True)
    (tmp_path / "root" / "runs" / "x.json").write_text("{}")
    claim_results_root(str(tmp_path / "root"))                   # an existing results root
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("...")
    with pytest.raises(OutputError, match="not a zoospectra results root"):
        claim_results_root(str(tmp_path / "mine"))
    claim_results_root("s3://bucket/results")                    # remote roots are not checked here


def test_the_zoo_builder_never_removes_a_folder_it_did_not_build(tmp_path: Path) -> None:
    spec = lora("tiny", 2, 4, targets=("query",))
    user = tmp_path / "tiny"                                      # the user's folder, same name
    user.mkdir()
    (user / "data.csv").write_text("1,2,3")
    with pytest.raises(OutputError, match="was not built by zoospectra's zoo builder"):
        build_zoo(tmp_path, [spec], steps=1)
    assert (user / "data.csv").read_text() == "1,2,3"
    # a build killed half way (its BUILDING marker, no DONE) is the builder's own: redone
    (user / "data.csv").unlink()
    (user / BUILDING).write_text("")
    (user / "adapter_model.safetensors").write_bytes(b"half")
    (path,) = build_zoo(tmp_path, [spec], steps=1)
    assert (path / DONE).is_file() and not (path / BUILDING).exists()
    assert (path / "adapter_model.safetensors").stat().st_size > 4


def test_demo_cache_adopts_a_pre_marker_cache_but_not_a_user_folder(tmp_path: Path) -> None:
    legacy = tmp_path / "legacy"
    (legacy / "lora_r8").mkdir(parents=True)
    (legacy / "lora_r8" / DONE).write_text("fp")
    (legacy / "_bases" / "tiny_gpt2").mkdir(parents=True)
    (legacy / "_bases" / "tiny_gpt2" / DONE).write_text("tiny_gpt2")
    assert claim_cache(str(legacy)) == legacy.resolve()
    assert json.loads((legacy / MARKER).read_text())["command"] == "demo-cache"
    mixed = tmp_path / "mixed"
    (mixed / "lora_r8").mkdir(parents=True)
    (mixed / "lora_r8" / DONE).write_text("fp")
    (mixed / "photos").mkdir()
    (mixed / "photos" / "cat.jpg").write_bytes(b"cat")
    with pytest.raises(OutputError, match="not written by zoospectra demo-cache"):
        claim_cache(str(mixed))
    assert not (mixed / MARKER).exists() and (mixed / "photos" / "cat.jpg").read_bytes() == b"cat"
