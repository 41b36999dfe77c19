"""The Python API (`clpsurgery.init`, `extend`, `apply`, `inspect`, `verify`) is what the command
line runs: the same options value, the same bytes written."""

from __future__ import annotations

import json

import pytest

import clpsurgery
from clpsurgery.cli import main
from clpsurgery.errors import SurgeryError

from conftest import same_output_files as same_files


def test_init_extend_and_apply_write_what_the_cli_writes(llama_source, german_helper, tmp_path):
    options = clpsurgery.TransferOptions(top_k=3, blend=0.5)
    result = clpsurgery.init(llama_source, german_helper, tmp_path / "api-init", options)
    main(["init", "--quiet", "--top-k", "3", "--blend", "0.5", str(llama_source), str(german_helper), str(tmp_path / "cli-init")])
    assert same_files(tmp_path / "api-init", tmp_path / "cli-init")
    assert result.weight_stats.rows > 0 and "search" in result.stage_seconds

    clpsurgery.extend(llama_source, german_helper, tmp_path / "api-extend", options, max_new_tokens=40)
    main(["extend", "--quiet", "--top-k", "3", "--blend", "0.5", "--max-new-tokens", "40", str(llama_source), str(german_helper), str(tmp_path / "cli-extend")])
    assert same_files(tmp_path / "api-extend", tmp_path / "cli-extend")

    clpsurgery.apply(tmp_path / "api-init", llama_source, tmp_path / "api-apply")
    assert same_files(tmp_path / "api-apply", tmp_path / "cli-init")
    manifest = json.loads((tmp_path / "api-apply" / "clpsurgery.json").read_text())
    assert manifest["command"][:2] == ["clpsurgery", "apply"]


def test_inspect_and_verify(llama_source, german_helper, tmp_path):
    out = tmp_path / "out"
    clpsurgery.init(llama_source, german_helper, out)
    report = clpsurgery.inspect(out)
    assert report["clpsurgery"]["options"]["method"] == clpsurgery.TransferOptions().method
    plan_report = clpsurgery.inspect(llama_source, german_helper, clpsurgery.TransferOptions(top_k=2))
    assert plan_report["would_write"]["neighbours_per_token"] >= 2 and plan_report["options"]["top_k"] == 2
    checks = clpsurgery.verify(out, llama_source)
    assert checks and all(c.ok is not False for c in checks)


def test_errors_are_one_surgery_error_and_write_nothing(llama_source, german_helper, tmp_path):
    with pytest.raises(SurgeryError) as error:
        clpsurgery.init(llama_source, tmp_path / "no-helper", tmp_path / "out")
    assert "no-helper" in str(error.value)
    assert not (tmp_path / "out").exists()
