"""Opening checkpoints (file, folder, shards) and reading rows through the memory maps."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from clpsurgery.formats.checkpoint import INDEX_NAME, Checkpoint
from conftest import as_bytes, assert_same, random_tensor

from clpsurgery.formats.writer import write_file
from clpsurgery.pipeline.tensor_io import as_tensor, planned_from_tensor


def sample(seed: int = 0) -> dict[str, torch.Tensor]:
    return {
        "embed.weight": random_tensor("BF16", (17, 6), seed),
        "lm_head.weight": random_tensor("F32", (17, 6), seed + 1),
        "layers.0.q8": random_tensor("F8_E4M3", (9, 5), seed + 2),
        "layers.0.k8": random_tensor("F8_E5M2", (9, 5), seed + 3),
        "layers.0.norm": random_tensor("F16", (6,), seed + 4),
        "layers.0.ids": random_tensor("U16", (4, 3, 2), seed + 5),
        "step": random_tensor("I64", (), seed + 6),
        "empty": random_tensor("F32", (0, 6), seed + 7),
    }


def check_all(ckpt: Checkpoint, tensors: dict[str, torch.Tensor]) -> None:
    assert set(ckpt.tensors) == set(tensors)
    assert ckpt.parameter_count == sum(t.numel() for t in tensors.values())
    for name, t in tensors.items():
        assert name in ckpt
        assert ckpt.info(name).shape == tuple(t.shape)
        assert_same(as_tensor(ckpt.read_tensor(name)), t)
        if t.dim():
            rows = t.shape[0]
            for a, b in [(0, rows), (0, 0), (rows, rows), (rows // 3, rows - rows // 4), (max(rows - 1, 0), rows)]:
                assert_same(as_tensor(ckpt.read_rows(name, a, b)), t[a:b])
                assert bytes(ckpt.raw_bytes(name, a, b)) == as_bytes(t[a:b])


def test_open_single_file(tmp_path):
    tensors = sample()
    path = tmp_path / "weights.safetensors"
    write_file(path, [planned_from_tensor(n, t) for n, t in tensors.items()])
    with Checkpoint.open(path) as ckpt:
        assert not ckpt.is_sharded
        assert ckpt.total_bytes == path.stat().st_size
        assert [h.path for h in ckpt.headers] == [path]
        check_all(ckpt, tensors)


def test_open_file_written_by_safetensors(tmp_path):
    tensors = sample(3)
    path = tmp_path / "ref.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    with Checkpoint.open(str(path)) as ckpt:
        check_all(ckpt, tensors)


def test_open_folder_with_model_safetensors(tmp_path):
    tensors = sample(1)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    # a stray second file does not matter when model.safetensors is there
    save_file({"other": torch.ones(2)}, str(tmp_path / "optimizer.safetensors"))
    with Checkpoint.open(tmp_path) as ckpt:
        assert [h.path.name for h in ckpt.headers] == ["model.safetensors"]
        check_all(ckpt, tensors)


def test_open_folder_with_single_other_named_file(tmp_path):
    tensors = sample(2)
    save_file(tensors, str(tmp_path / "pytorch_model.safetensors"))
    (tmp_path / "config.json").write_text("{}")
    with Checkpoint.open(tmp_path) as ckpt:
        check_all(ckpt, tensors)


def write_shards(folder, tensors: dict[str, torch.Tensor], groups: list[list[str]]) -> dict[str, str]:
    weight_map = {}
    total = 0
    for i, group in enumerate(groups, start=1):
        shard = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: tensors[n] for n in group}, str(folder / shard), metadata={"format": "pt"})
        for n in group:
            weight_map[n] = shard
            total += tensors[n].numel() * tensors[n].element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2))
    return weight_map


GROUPS = [
    ["embed.weight", "step"],
    ["layers.0.q8", "layers.0.k8", "layers.0.norm", "empty"],
    ["layers.0.ids", "lm_head.weight"],
]


def test_open_sharded_folder(tmp_path):
    tensors = sample(4)
    weight_map = write_shards(tmp_path, tensors, GROUPS)
    with Checkpoint.open(tmp_path) as ckpt:
        assert ckpt.is_sharded
        assert len(ckpt.headers) == 3
        assert ckpt.index_path == tmp_path / INDEX_NAME
        for name, shard in weight_map.items():
            assert ckpt.tensors[name].path == tmp_path / shard
        assert ckpt.total_bytes == sum((tmp_path / s).stat().st_size for s in set(weight_map.values()))
        check_all(ckpt, tensors)


def test_open_index_file_directly(tmp_path):
    tensors = sample(5)
    write_shards(tmp_path, tensors, GROUPS)
    with Checkpoint.open(tmp_path / INDEX_NAME) as ckpt:
        assert ckpt.is_sharded
        check_all(ckpt, tensors)


@pytest.mark.parametrize("dtype_name", ["BF16", "F8_E4M3", "F8_E5M2"])
def test_gather_rows_unsorted_repeated(tmp_path, dtype_name):
    original = random_tensor(dtype_name, (23, 7), 11)
    vector = random_tensor(dtype_name, (23,), 12)
    cube = random_tensor(dtype_name, (23, 2, 3), 13)
    path = tmp_path / "g.safetensors"
    save_file({"m": original, "v": vector, "c": cube}, str(path))
    index_sets = [
        [5, 0, 22, 5, 5, 3, 21, 0],
        [22, 21, 20, 1, 0],
        [7],
        [],
        list(range(23))[::-1] * 2,
        np.array([3, 3, 1], dtype=np.int32),
    ]
    with Checkpoint.open(path) as ckpt:
        for idx in index_sets:
            sel = torch.as_tensor(np.asarray(idx, dtype=np.int64))
            for name, t in [("m", original), ("v", vector), ("c", cube)]:
                stored = ckpt.gather_rows(name, idx)
                assert_same(as_tensor(stored), t[sel])
                assert stored.finite_rows().shape == (len(idx),)  # none included: a target with no new token
        with pytest.raises(IndexError):
            as_tensor(ckpt.gather_rows("m", [0, 23]))
        with pytest.raises(IndexError):
            as_tensor(ckpt.gather_rows("m", [-1]))
        with pytest.raises(IndexError):
            as_tensor(ckpt.read_rows("m", 5, 24))
        with pytest.raises(IndexError):
            as_tensor(ckpt.read_rows("m", 6, 5))


def test_prefetch_rows_one_call_per_run_of_rows(tmp_path):
    """prefetch_rows asks the kernel for each run of adjacent rows once (unsorted, repeated ids
    merged), checks bounds as gather_rows does, and changes nothing it reads."""
    path = tmp_path / "p.safetensors"
    original = random_tensor("BF16", (40, 9), 3)
    save_file({"m": original}, str(path))
    before = path.read_bytes()
    with Checkpoint.open(path) as ckpt:
        expected = 3 if hasattr(os, "posix_fadvise") else 0
        assert ckpt.prefetch_rows("m", [8, 7, 0, 1, 2, 7, 39]) == expected  # [0, 3), [7, 9), [39, 40)
        assert ckpt.prefetch_rows("m", []) == 0
        with pytest.raises(IndexError):
            ckpt.prefetch_rows("m", [40])
        assert_same(as_tensor(ckpt.gather_rows("m", [39, 0])), original[[39, 0]])
    assert path.read_bytes() == before


def test_gather_rows_across_shards(tmp_path):
    tensors = sample(6)
    write_shards(tmp_path, tensors, GROUPS)
    idx = [16, 0, 3, 3, 16, 8]
    with Checkpoint.open(tmp_path) as ckpt:
        for name in ["embed.weight", "lm_head.weight"]:
            assert_same(as_tensor(ckpt.gather_rows(name, idx)), tensors[name][torch.tensor(idx)])
        idx8 = [8, 1, 1, 0]
        for name in ["layers.0.q8", "layers.0.k8", "layers.0.ids"]:
            t = tensors[name]
            idx_ok = [i % t.shape[0] for i in idx8]
            assert_same(as_tensor(ckpt.gather_rows(name, idx_ok)), t[torch.tensor(idx_ok)])


def test_read_results_outlive_close(tmp_path):
    t = random_tensor("F32", (8, 4), 9)
    path = tmp_path / "c.safetensors"
    save_file({"t": t}, str(path))
    ckpt = Checkpoint.open(path)
    rows = as_tensor(ckpt.read_rows("t", 2, 6))
    gathered = as_tensor(ckpt.gather_rows("t", [7, 0]))
    ckpt.close()
    assert_same(rows, t[2:6])
    assert_same(gathered, t[torch.tensor([7, 0])])
    # a closed checkpoint can be read again (maps reopen on demand)
    assert_same(as_tensor(ckpt.read_tensor("t")), t)
    ckpt.close()


def test_source_unchanged_by_reads(tmp_path):
    tensors = sample(8)
    write_shards(tmp_path, tensors, GROUPS)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with Checkpoint.open(tmp_path) as ckpt:
        for name in ckpt.tensors:
            as_tensor(ckpt.read_tensor(name))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize("dtype_name", ["F64", "F32", "F16", "BF16", "F8_E5M2", "F8_E4M3", "I32", "U8"])
def test_finite_rows_from_the_bits_agree_with_torch(tmp_path, dtype_name):
    """StoredRows.finite_rows reads NaN and Inf from the stored bits, no framework: the same verdict
    as torch.isfinite on every bit pattern of random rows."""
    t = random_tensor(dtype_name, (257, 3), 7)  # arbitrary bits: NaNs, Infs and finite values
    if t.is_floating_point():  # and surely some of each
        t[5, 1] = float("nan")
        t[9, 0] = float("-inf") if dtype_name != "F8_E4M3" else float("nan")  # E4M3 has no Inf
        t[11] = 0.5
    path = tmp_path / "t.safetensors"
    write_file(path, [planned_from_tensor("t", t)])
    with Checkpoint.open(path) as ckpt:
        stored = ckpt.read_tensor("t")
    expected = torch.isfinite(t.to(torch.float64)).all(dim=1).numpy()  # every stored dtype widens exactly
    assert (stored.finite_rows() == expected).all()
    if t.is_floating_point():
        assert 0 < expected.sum() < len(expected)  # both kinds of row were tested


def test_verify_needs_no_torch(gpt2_source, german_helper, tmp_path):
    """verify compares stored bytes and reads finiteness from the bits: it runs without torch."""
    import subprocess
    import sys

    from clpsurgery.cli import main

    out = tmp_path / "out"
    main(["init", "--quiet", str(gpt2_source), str(german_helper), str(out)])
    code = (
        "import sys; from clpsurgery.pipeline.verify import verify_output; "
        f"checks = verify_output({str(out)!r}, {str(gpt2_source)!r}); "
        "assert all(c.ok for c in checks), [c.line() for c in checks]; print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
