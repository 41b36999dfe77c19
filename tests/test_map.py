"""Per-token overrides, `--map TARGET=SOURCE` (issue 17): a target row copied from a named source
token, or the mean of a text's pieces under the source tokenizer."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from clpsurgery.cli import main
from clpsurgery.formats.checkpoint import Checkpoint
from clpsurgery.pipeline.manifest import decode_pairs
from clpsurgery.pipeline.tensor_io import as_tensor
from clpsurgery.pipeline.verify import verify_output
from clpsurgery.vocab.vocabulary import load_vocabulary


def rows(folder, name="transformer.wte.weight") -> np.ndarray:
    with Checkpoint.open(folder) as ckpt:
        return as_tensor(ckpt.read_tensor(name)).double().numpy()


@pytest.fixture(scope="module")
def tokens(gpt2_source, german_helper):
    """A new target token (no source row), a shared one, and their ids."""
    from clpsurgery.vocab.vocabulary import match_overlap

    source, target = load_vocabulary(gpt2_source), load_vocabulary(german_helper)
    overlap = match_overlap(source, target, 50257)
    id_to_token = target.id_to_token()
    new = next(id_to_token[i] for i in overlap.missing_ids.tolist() if len(id_to_token[i]) > 4)
    shared = next(id_to_token[t] for t in overlap.target_ids.tolist() if len(id_to_token[t]) > 3)
    return {"new": new, "shared": shared, "target": target, "source": source}


def test_map_copies_a_source_row_and_combines_text(gpt2_source, german_helper, tokens, tmp_path):
    from tokenizers import Tokenizer

    out = tmp_path / "out"
    map_file = tmp_path / "maps.txt"
    map_file.write_text(f"# hand-made rows\n\n{tokens['shared']}=text:Haus und Hof\n", encoding="utf-8")
    main(["init", "--quiet", "--map", f"{tokens['new']}=Ġhouse", "--map-file", str(map_file), str(gpt2_source), str(german_helper), str(out)])
    written, source = rows(out), rows(gpt2_source)
    new_id, shared_id = tokens["target"].token_to_id[tokens["new"]], tokens["target"].token_to_id[tokens["shared"]]
    assert np.array_equal(written[new_id], source[tokens["source"].token_to_id["Ġhouse"]])
    pieces = Tokenizer.from_file(str(gpt2_source / "tokenizer.json")).encode("Haus und Hof", add_special_tokens=False).ids
    assert written[shared_id] == pytest.approx(source[pieces].mean(axis=0), rel=1e-5, abs=1e-6)
    manifest = json.loads((out / "clpsurgery.json").read_text())
    assert manifest["vocabulary"]["pairs_by_kind"]["map"] == 1
    assert {m["target"] for m in manifest["maps"]} == {tokens["new"], tokens["shared"]}
    target_ids, source_ids = decode_pairs(manifest["overlap_pairs"])
    assert dict(zip(target_ids.tolist(), source_ids.tolist()))[new_id] == tokens["source"].token_to_id["Ġhouse"]
    assert shared_id not in target_ids
    assert all(c.ok is not False for c in verify_output(out, gpt2_source))
    again = tmp_path / "again"
    main(["apply", "--quiet", str(out), str(gpt2_source), str(again)])
    assert np.array_equal(rows(again), written)


def test_inspect_against_shows_the_maps(gpt2_source, german_helper, tokens):
    from click.testing import CliRunner

    from clpsurgery.cli import cli

    result = CliRunner().invoke(cli, ["inspect", str(gpt2_source), "--against", str(german_helper), "--map", f"{tokens['new']}=Ġhouse", "--map", f"{tokens['shared']}=text:Haus"])
    assert result.exit_code == 0, result.output
    assert f"map          {tokens['new']!r}" in result.output and "copies source 'Ġhouse'" in result.output
    assert "the mean of 'Haus'" in result.output


@pytest.mark.parametrize(
    ("maps", "phrase"),
    [
        (["nosuchtoken_xyz=Ġhouse"], "is not a token of the target tokenizer"),
        (["{new}=nosuchtoken_xyz"], "is not a token of the source tokenizer"),
        (["{new}"], "is not TARGET=SOURCE"),
        (["{new}=text:"], "names no text"),
    ],
)
def test_bad_maps_are_one_line(gpt2_source, german_helper, tokens, tmp_path, maps, phrase):
    args = [a for m in maps for a in ("--map", m.format(new=tokens["new"]))]
    proc = subprocess.run([sys.executable, "-m", "clpsurgery", "init", "--quiet", *args, str(gpt2_source), str(german_helper), str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert phrase in proc.stderr and "--map" in proc.stderr
    assert not (tmp_path / "out").exists()
