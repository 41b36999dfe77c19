"""vocab.token_map: `--map` lines read and checked against real vocabularies (the GPT-2 source and
the German BPE target), errors as one SurgeryError naming the line, and the overlap the maps make."""

from __future__ import annotations

import numpy as np
import pytest

from clpsurgery.errors import SurgeryError
from clpsurgery.vocab.pieces import text_pieces
from clpsurgery.vocab.token_map import TokenMap, mapped_overlap, read_map_lines, resolve_maps
from clpsurgery.vocab.vocabulary import MATCH_KINDS, load_vocabulary, match_overlap

SOURCE_ROWS = 50257
MAP = MATCH_KINDS.index("map")


@pytest.fixture(scope="module")
def vocabs(gpt2_tokenizer_folder, german_tokenizer_folder):
    """(source, target, overlap, a new target token, a shared target token)."""
    source, target = load_vocabulary(gpt2_tokenizer_folder), load_vocabulary(german_tokenizer_folder)
    overlap = match_overlap(source, target, SOURCE_ROWS)
    tokens = target.id_to_token()
    new = next(tokens[i] for i in overlap.missing_ids.tolist() if len(tokens[i]) > 4)
    shared = next(tokens[t] for t in overlap.target_ids.tolist() if len(tokens[t]) > 3 and tokens[t].isalpha())
    return source, target, overlap, new, shared


def encode_with(source):
    return lambda texts: text_pieces(source, texts)


# --- read_map_lines ------------------------------------------------------------------------------


def test_lines_from_the_file_first_then_map_in_order(tmp_path):
    path = tmp_path / "maps.txt"
    path.write_text("# hand-made rows\n\nĠHaus=Ġhouse\n   # indented comment\nĠHof=text:Haus und Hof=Garten\n", encoding="utf-8")
    lines = read_map_lines(("a=b", "ĠHaus=text:x"), str(path))
    assert lines == [
        (f"{path}:3", "ĠHaus", "Ġhouse"),
        (f"{path}:5", "ĠHof", "text:Haus und Hof=Garten"),  # split at the first '='
        ("--map", "a", "b"),
        ("--map", "ĠHaus", "text:x"),
    ]
    assert read_map_lines((), None) == []


@pytest.mark.parametrize("line", ["nosep", "=Ġhouse", "ĠHaus=", "="])
def test_a_line_that_is_not_target_equals_source(tmp_path, line):
    with pytest.raises(SurgeryError) as e:
        read_map_lines((line,), None)
    assert (e.value.place, e.value.problem) == ("--map", f"{line!r} is not TARGET=SOURCE (a source token, or text:SOME TEXT)")
    path = tmp_path / "maps.txt"
    path.write_text(f"# first\nĠa=Ġb\n\n{line}\n", encoding="utf-8")
    with pytest.raises(SurgeryError) as e:
        read_map_lines((), str(path))
    assert e.value.place == f"{path}:4" and str(e.value) == f"{path}:4: {line!r} is not TARGET=SOURCE (a source token, or text:SOME TEXT)"


def test_an_unreadable_map_file(tmp_path):
    with pytest.raises(SurgeryError) as e:
        read_map_lines((), str(tmp_path / "absent.txt"))
    assert str(e.value) == f"{tmp_path / 'absent.txt'}: cannot read the map file (FileNotFoundError)"
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("grün=green\n".encode("latin-1"))
    with pytest.raises(SurgeryError) as e:
        read_map_lines((), str(latin))
    assert str(e.value) == f"{latin}: cannot read the map file (UnicodeDecodeError)"


# --- resolve_maps --------------------------------------------------------------------------------


def test_copy_and_text_maps_resolved_against_the_tokenizers(vocabs, gpt2_tokenizer, german_tokenizer):
    source, target, _, new, shared = vocabs
    lines = [("--map", new, "Ġhouse"), ("--map", shared, "text:Haus und Hof")]
    maps = resolve_maps(lines, source, target, SOURCE_ROWS, encode_with(source))
    by_target = {m.target: m for m in maps}
    assert by_target[new] == TokenMap(new, german_tokenizer.token_to_id(new), source="Ġhouse", source_id=gpt2_tokenizer.token_to_id("Ġhouse"))
    pieces = tuple(gpt2_tokenizer.encode("Haus und Hof", add_special_tokens=False).ids)
    assert len(pieces) > 1
    assert by_target[shared] == TokenMap(shared, german_tokenizer.token_to_id(shared), text="Haus und Hof", pieces=pieces)
    assert [m.target_id for m in maps] == sorted(m.target_id for m in maps)
    assert by_target[new].as_dict() == {"target": new, "target_id": by_target[new].target_id, "source": "Ġhouse", "source_id": gpt2_tokenizer.token_to_id("Ġhouse")}
    assert by_target[shared].as_dict() == {"target": shared, "target_id": by_target[shared].target_id, "text": "Haus und Hof", "pieces": list(pieces)}


def test_a_later_map_of_the_same_target_wins(vocabs, gpt2_tokenizer):
    source, target, _, new, _ = vocabs
    copy_then_text = resolve_maps([("--map", new, "Ġhouse"), ("--map", new, "text:Haus")], source, target, SOURCE_ROWS, encode_with(source))
    assert [(m.source_id, m.text) for m in copy_then_text] == [(None, "Haus")]
    text_then_copy = resolve_maps([("--map", new, "text:Haus"), ("--map", new, "Ġhouse")], source, target, SOURCE_ROWS, encode_with(source))
    assert [(m.source_id, m.text) for m in text_then_copy] == [(gpt2_tokenizer.token_to_id("Ġhouse"), None)]
    two_copies = resolve_maps([("--map", new, "Ġhouse"), ("--map", new, "Ġgarden")], source, target, SOURCE_ROWS, encode_with(source))
    assert [m.source for m in two_copies] == ["Ġgarden"]


def test_copy_maps_never_encode(vocabs):
    """The source tokenizer is only loaded when some map has text: here `encode` is not even callable."""
    source, target, _, new, shared = vocabs
    maps = resolve_maps([("--map", new, "Ġhouse"), ("--map", shared, "Ġthe")], source, target, SOURCE_ROWS, None)
    assert {m.target: m.source for m in maps} == {new: "Ġhouse", shared: "Ġthe"}


def test_pieces_past_the_source_rows_are_dropped(vocabs, gpt2_tokenizer):
    source, target, _, new, _ = vocabs
    ids = gpt2_tokenizer.encode("Haus und Hof", add_special_tokens=False).ids
    rows = sorted(ids)[len(ids) // 2] + 1  # some pieces within the rows, some past them
    (m,) = resolve_maps([("--map", new, "text:Haus und Hof")], source, target, rows, encode_with(source))
    assert m.pieces == tuple(i for i in ids if i < rows) and len(m.pieces) < len(ids)


@pytest.mark.parametrize(
    ("line", "rows", "problem"),
    [
        (("f.txt:3", "nosuchtoken_xyz", "Ġhouse"), SOURCE_ROWS, "'nosuchtoken_xyz' is not a token of the target tokenizer"),
        (("--map", "{new}", "nosuchtoken_xyz"), SOURCE_ROWS, "'nosuchtoken_xyz' is not a token of the source tokenizer (write text:nosuchtoken_xyz to combine its pieces)"),
        (("--map", "{new}", "text:"), SOURCE_ROWS, "'text:' names no text"),
        (("f.txt:7", "{new}", "Ġhouse"), 1000, "source token 'Ġhouse' has id 2156, past the source embedding's 1000 rows"),
        (("--map", "{new}", "text:Haus"), 10, "the source tokenizer gives no piece for 'Haus'"),
    ],
)
def test_each_bad_map_is_one_error_naming_its_line(vocabs, line, rows, problem):
    source, target, _, new, _ = vocabs
    where, target_token, spec = line
    with pytest.raises(SurgeryError) as e:
        resolve_maps([("--map", new, "!"), (where, target_token.format(new=new), spec)], source, target, rows, encode_with(source))
    assert (e.value.place, e.value.problem) == (where, problem)


# --- mapped_overlap ------------------------------------------------------------------------------


def test_no_maps_leave_the_overlap_as_it_is(vocabs):
    overlap = vocabs[2]
    assert mapped_overlap(overlap, ()) is overlap


def test_a_copy_map_is_a_pair_and_a_text_map_takes_its_target_out(vocabs, gpt2_tokenizer):
    source, target, overlap, new, shared = vocabs
    house, other_shared = gpt2_tokenizer.token_to_id("Ġhouse"), target.token_to_id[shared]
    tokens = target.id_to_token()
    text_target = next(tokens[t] for t in overlap.target_ids.tolist() if tokens[t] != shared and len(tokens[t]) > 3 and tokens[t].isalpha())
    lines = [("--map", new, "Ġhouse"), ("--map", shared, "Ġhouse"), ("--map", text_target, "text:Haus")]
    maps = resolve_maps(lines, source, target, SOURCE_ROWS, encode_with(source))
    out = mapped_overlap(overlap, maps)

    before = dict(zip(overlap.target_ids.tolist(), zip(overlap.source_ids.tolist(), overlap.kinds.tolist())))
    after = dict(zip(out.target_ids.tolist(), zip(out.source_ids.tolist(), out.kinds.tolist())))
    new_id, text_id = target.token_to_id[new], target.token_to_id[text_target]
    expected = dict(before)
    expected[new_id] = (house, MAP)  # a new token: a pair now
    expected[other_shared] = (house, MAP)  # a shared token: its pair replaced
    del expected[text_id]  # combined from pieces: missing now
    assert after == expected
    assert out.target_ids.tolist() == sorted(expected)
    assert out.missing_ids.tolist() == sorted(set(overlap.missing_ids.tolist()) - {new_id} | {text_id})
    assert out.count + len(out.missing_ids) == out.target_size == overlap.target_size
    assert out.counts()["map"] == 2 and out.counts()["string"] == overlap.counts()["string"] - 2
    assert out.match == overlap.match
