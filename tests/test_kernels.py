"""The GPU paths, tested on the CPU.

* The Triton combine kernel (kernels/clpsurgery_kernels/combine.py) under Triton's interpreter (TRITON_INTERPRET=1,
  which runs kernels on CPU tensors) against the float64 reference: odd sizes, every supported
  dtype, k = 1 and k above the unrolled block, masked edges on every axis. The interpreter is
  chosen when a kernel is decorated, so the kernel runs in a child process started with the
  variable set (this file run as a script, `--worker`); each case is checked here. On a machine
  with a GPU, `CLPSURGERY_KERNEL_DEVICE=cuda` runs the same cases compiled, on the GPU.
* The exact top-k by chunked matrix product (the GPU search when faiss has no GPU support),
  which is device-agnostic torch code, against FAISS and numpy's exact top-k.
* The dense combine by chunked matrix product, --device resolution, and the manifest's paths.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Small tiles so that the test shapes cover several programs on both axes and a k loop with a
# masked tail: BLOCK_K + 1 = 5 neighbours take two steps of the unrolled k loop.
TILES = {"block_m": 4, "block_h": 32, "block_k": 4}
MAX_UNROLL = 16  # clpsurgery_kernels.combine.MAX_UNROLL, the default BLOCK_K ceiling (not imported: no triton here)
# Where the kernel and the device-agnostic GPU paths run: the CPU (the kernel under Triton's
# interpreter), or `CLPSURGERY_KERNEL_DEVICE=cuda` on a machine with a GPU.
KERNEL_DEVICE = os.environ.get("CLPSURGERY_KERNEL_DEVICE", "cpu")


def kernel_cases() -> list[dict]:
    cases = []
    for dtype in DTYPES:
        for h in (1, 7, 33, 100):
            for m in (1, 5, 17):
                for k in (1, 3, TILES["block_k"] + 1):
                    cases.append({"id": f"{dtype}-h{h}-m{m}-k{k}", "dtype": dtype, "h": h, "m": m, "k": k, "tiles": TILES})
        # Default tiles from the launcher: k above the default unrolled block (two steps of 9).
        cases.append({"id": f"{dtype}-default-k{MAX_UNROLL + 1}", "dtype": dtype, "h": 100, "m": 17, "k": MAX_UNROLL + 1, "tiles": {}})
        # int32 positions, rows with a stride wider than h, row-major grid order, NaN-poisoned output.
        cases.append({"id": f"{dtype}-int32-strided-rowmajor", "dtype": dtype, "h": 33, "m": 17, "k": 6, "tiles": {**TILES, "h_major": False}, "int32": True, "strided": True})
        # k = 50: four unrolled steps of 13, the last two slots masked.
        cases.append({"id": f"{dtype}-default-k50", "dtype": dtype, "h": 100, "m": 9, "k": 50, "tiles": {}})
    # A bf16 source written as fp32 (out_dtype differs from the source's).
    cases.append({"id": "bf16-to-fp32", "dtype": "bf16", "out": "fp32", "h": 33, "m": 5, "k": 3, "tiles": TILES})
    return cases


CASES = kernel_cases()


def past_rounding_bound(out: torch.Tensor, ref: torch.Tensor, terms: torch.Tensor, k: int, steps: float = 0.5) -> torch.Tensor:
    """How far past the bound each element lands (<= 0 passes). The bound: `steps` rounding steps
    of the output dtype (half a step: round to nearest) at the magnitude of the fp32 sum, plus the
    worst fp32 accumulation error over k terms of absolute sum `terms`."""
    info = torch.finfo(out.dtype)
    accumulation = k * 2.0**-24 * terms
    magnitude = (ref.abs() + accumulation).clamp_min(info.tiny)
    spacing = info.eps * torch.exp2(torch.floor(torch.log2(magnitude)))
    return (out.to(torch.float64) - ref).abs() - (steps * spacing + accumulation)


def run_worker(device: str) -> None:
    """Child process (TRITON_INTERPRET=1 on the CPU): run every case, print one JSON line of results."""
    if device == "cpu":
        assert os.environ.get("TRITON_INTERPRET") == "1", "the worker needs TRITON_INTERPRET=1 before triton is imported"
    from clpsurgery_kernels.combine import combine_rows, reference_combine

    results = {}
    for case in CASES:
        g = torch.Generator().manual_seed(zlib.crc32(case["id"].encode()))  # reproducible per case
        dtype = DTYPES[case["dtype"]]
        out_dtype = DTYPES[case.get("out", case["dtype"])]
        n, h, m, k = 23, case["h"], case["m"], case["k"]
        source = torch.randn(n, h + 5 if case.get("strided") else h, generator=g).to(dtype)
        if case.get("strided"):
            source = source[:, 2 : 2 + h]  # row stride h + 5, columns contiguous
        positions = torch.randint(0, n, (m, k), generator=g)
        if case.get("int32"):
            positions = positions.to(torch.int32)
        weights = torch.randn(m, k, generator=g)  # signed: the clp scheme's weights can be
        out = torch.full((m, h), float("nan"), dtype=out_dtype, device=device)  # poisoned: every element must be written
        combine_rows(source.to(device), positions.to(device), weights.to(device), out_dtype, out=out, **case["tiles"])
        out = out.cpu()
        ref = reference_combine(source, positions, weights)
        terms = (weights.double().abs().unsqueeze(2) * source.double().abs()[positions.long()]).sum(dim=1)
        excess = past_rounding_bound(out, ref, terms, k)
        # The CPU path's arithmetic (fp32 products and sums, one round-to-nearest cast), in torch.
        torch_path = (weights.float().unsqueeze(2) * source.float()[positions.long()]).sum(dim=1).to(out_dtype)
        results[case["id"]] = {
            "dtype": str(out.dtype),
            "shape": list(out.shape),
            "finite": bool(torch.isfinite(out).all()),
            "worst_excess": float(excess.max()),
            "max_abs_error": float((out.double() - ref).abs().max()),
            "elements": out.numel(),
            "same_as_torch": int((out == torch_path).sum()),
        }
    print(json.dumps(results))


@pytest.fixture(scope="module")
def kernel_results() -> dict:
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install -e '.[gpu]'); the kernel tests run under its interpreter")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    if KERNEL_DEVICE == "cpu":
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, __file__, "--worker", KERNEL_DEVICE], check=False, capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert done.returncode == 0, f"kernel worker failed:\n{done.stderr[-4000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_kernel_against_float64(kernel_results, case):
    result = kernel_results[case["id"]]
    assert result["dtype"] == str(DTYPES[case.get("out", case["dtype"])])
    assert result["shape"] == [case["m"], case["h"]]
    assert result["finite"], "an output element was left unwritten (NaN poison) or overflowed"
    assert result["worst_excess"] <= 0, f"off by more than half a rounding step (plus fp32 error): {result}"


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_kernel_rounds_as_torch_does(kernel_results, dtype):
    """Rounded to nearest even like torch's cast: bit-identical to the fp32 torch path but for
    the rare element whose fp32 sums, added in another order, straddle a rounding boundary."""
    picked = [kernel_results[c["id"]] for c in CASES if c["dtype"] == dtype and "out" not in c]
    same = sum(r["same_as_torch"] for r in picked) / sum(r["elements"] for r in picked)
    assert same > 0.97, f"only {same:.1%} of {dtype} elements equal torch's; a truncating cast gives about half"


# The search: exact top-k by chunked matrix product, on the CPU here (the same code runs on CUDA).


def unit_rows(rows: int, width: int, seed: int) -> torch.Tensor:
    from clpsurgery.mixing.neighbours import normalise_rows

    g = torch.Generator().manual_seed(seed)
    return normalise_rows(torch.randn(rows, width, generator=g))[0]


@pytest.mark.parametrize("query_rows, overlap_rows", [(None, None), (37, 64), (1, 9)])
def test_chunked_top_k_matches_exact_and_faiss(query_rows, overlap_rows):
    from clpsurgery.mixing.backend import exact_top_k
    from clpsurgery.mixing.neighbours import search_top_k

    overlap, queries = unit_rows(500, 24, 0), unit_rows(300, 24, 1)
    found = exact_top_k(overlap, queries, k=7, device=KERNEL_DEVICE, query_rows=query_rows, overlap_rows=overlap_rows)
    exact = (queries.double() @ overlap.double().T).numpy()
    expected = np.argsort(-exact, axis=1, kind="stable")[:, :7]
    assert np.array_equal(found.positions, expected)
    assert np.allclose(found.similarities, np.take_along_axis(exact, expected, 1), rtol=0, atol=1e-6)
    # The similarities are defined as fp32 products summed in fp64 (neighbours.rescore): exactly.
    products = overlap[torch.from_numpy(expected)] * queries[:, None, :]
    assert np.array_equal(found.similarities, products.double().sum(dim=-1).float().numpy())
    pytest.importorskip("faiss")
    cpu = search_top_k(overlap, queries, k=7)
    assert np.array_equal(found.positions, cpu.positions), "not the CPU FAISS path's neighbours"
    assert np.array_equal(found.similarities, cpu.similarities), "both paths rescore the same way: the same bits"


def test_faiss_search_with_another_index():
    """search_top_k builds the index through make_index when given (faiss-gpu's GpuIndexFlatIP):
    another flat inner-product index gives the same neighbours and similarities."""
    faiss = pytest.importorskip("faiss")
    from clpsurgery.mixing.neighbours import search_top_k

    overlap, queries = unit_rows(400, 16, 8), unit_rows(120, 16, 9)
    built = []

    def make_index(width):
        built.append(width)
        return faiss.index_factory(width, "Flat", faiss.METRIC_INNER_PRODUCT)

    plain = search_top_k(overlap, queries, k=5)
    other = search_top_k(overlap, queries, k=5, chunk_rows=50, make_index=make_index)
    assert built == [16]
    assert np.array_equal(plain.positions, other.positions) and np.array_equal(plain.similarities, other.similarities)


def test_chunked_top_k_ties_go_to_the_lower_position():
    from clpsurgery.mixing.backend import exact_top_k

    overlap = unit_rows(40, 8, 2)
    overlap[31] = overlap[5]  # the same vector twice
    found = exact_top_k(overlap, overlap[5:6].clone(), k=3, overlap_rows=16)
    assert list(found.positions[0, :2]) == [5, 31]


def test_chunked_top_k_edges():
    from clpsurgery.mixing.backend import exact_top_k

    overlap, queries = unit_rows(5, 4, 3), unit_rows(3, 4, 4)
    found = exact_top_k(overlap, queries, k=10)  # k above the overlap: all of it, best first
    assert found.positions.shape == (3, 5)
    assert (np.diff(found.similarities, axis=1) <= 0).all()
    empty = exact_top_k(overlap, queries[:0], k=2)
    assert empty.positions.shape == (0, 2)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_dense_chunked_combine_against_float64(dtype):
    from clpsurgery.mixing.backend import combine_dense_chunked

    g = torch.Generator().manual_seed(5)
    source = torch.randn(50, 33, generator=g).to(dtype)
    weights = torch.randn(17, 50, generator=g)
    out = combine_dense_chunked(source.to(KERNEL_DEVICE), weights.to(KERNEL_DEVICE), dtype, chunk_rows=7).cpu()
    ref = weights.double() @ source.double()
    terms = weights.double().abs() @ source.double().abs()
    assert out.dtype == dtype
    assert past_rounding_bound(out, ref, terms, 50).max() <= 0


# Device choice.


def test_device_resolution_on_this_machine():
    from clpsurgery.mixing.backend import cuda_unavailable_reason, resolve_device
    from clpsurgery.errors import SurgeryError

    assert resolve_device("cpu") == "cpu"
    reason = cuda_unavailable_reason()
    assert resolve_device("auto") == ("cuda" if reason is None else "cpu")
    with pytest.raises(SurgeryError, match="unknown device"):
        resolve_device("tpu")
    if reason is None:
        assert resolve_device("cuda") == "cuda"
    else:
        with pytest.raises(SurgeryError, match="no CUDA device is available") as raised:
            resolve_device("cuda")
        assert "\n" not in str(raised.value)


def test_cpu_engine_records_its_paths():
    from clpsurgery.mixing.backend import ComputeBackend
    from clpsurgery.mixing.neighbours import search_top_k

    overlap, queries = unit_rows(60, 8, 6), unit_rows(10, 8, 7)
    engine = ComputeBackend("cpu", 1 << 28)
    found = engine.search_top_k(overlap, queries, 4)
    rows = torch.randn(60, 9).to(torch.bfloat16)
    engine.combine_top_k(rows, torch.from_numpy(found.positions), torch.rand(10, 4), torch.bfloat16)
    engine.combine_dense(rows, torch.rand(10, 60), torch.bfloat16, 16)
    # FAISS's flat index, or the blocked top-k where its OpenBLAS is held to another kernel (docs/search.md)
    from clpsurgery.mixing.backend import faiss_cpu_reason

    search = "faiss-cpu" if faiss_cpu_reason() is None else "torch-topk-cpu"
    assert {k: v for k, v in engine.describe().items() if k != "notes"} == {"device": "cpu", "search": search, "combine": ["torch-cpu", "torch-cpu-matmul"]}
    pytest.importorskip("faiss")
    faiss_found = search_top_k(overlap, queries, 4)
    assert np.array_equal(found.positions, faiss_found.positions) and np.array_equal(found.similarities, faiss_found.similarities)


def test_init_records_paths_and_refuses_missing_cuda(gpt2_source, german_helper, tmp_path, capsys):
    from clpsurgery.cli import main
    from clpsurgery.mixing.backend import cuda_unavailable_reason

    out = tmp_path / "out"
    main(["init", "--quiet", "--device", "cpu", str(gpt2_source), str(german_helper), str(out)])
    manifest = json.loads((out / "clpsurgery.json").read_text())
    assert manifest["options"]["device"] == "cpu"
    from clpsurgery.mixing.backend import faiss_cpu_reason

    search = "faiss-cpu" if faiss_cpu_reason() is None else "torch-topk-cpu"
    assert {k: v for k, v in manifest["paths"].items() if k != "notes"} == {"device": "cpu", "search": search, "combine": "torch-cpu"}
    if cuda_unavailable_reason() is not None:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exited:
            main(["init", "--quiet", "--device", "cuda", str(gpt2_source), str(german_helper), str(tmp_path / "never")])
        assert exited.value.code == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: --device: cuda was asked for, but no CUDA device is available") and "\n" not in err
        assert not (tmp_path / "never").exists()


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    run_worker(sys.argv[2])
