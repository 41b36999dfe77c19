"""A 7B model on a small machine: wall time and peak RSS of `clpsurgery init` against `cp -r`.

Writes synthetic 7B-shaped checkpoints straight to disk (random finite bf16, no model object),
sharded at 5 GB as the hub does, each with a small helper that has a real target vocabulary,
then, in one run and on the same disk:

  cp      `cp -r SOURCE COPY && sync`: the physical floor
  init    `clpsurgery init SOURCE HELPER OUT --quiet` with the default options (or --init-options)
  dense   the same with `--top-k all` (the paper's dense form)
  baseline  the same init from another checkout (--baseline DIR): before and after in one run

Each is a child process whose peak RSS is its own VmHWM, polled; before each, the source is
evicted from the page cache (--source-cache cold, the default), so that each reads it from disk.
All repeats of cp run first, then those of init, then the dense ones.
Shapes:

  bloom-7b1   vocab 250,880 x 4,096, 30 layers, tied (source tokenizer: the real GPT-2 one, its
              50,257 ids padded to BLOOM's 250,880 rows)
  llama-2-7b  vocab 32,000 x 4,096, 32 layers, untied head (source tokenizer: a real 32,000-token
              English byte-level BPE trained on wordfreq's English list)

The helper is a 2-layer GPT-2-architecture model, hidden 768, fp32, with a 32,000-token German
byte-level BPE trained on wordfreq's German list.

    python benchmarks/seven_b.py --shapes bloom-7b1,llama-2-7b --repeats 1

The results, with their provenance (commit, machine, date, command), go to
benchmarks/results/seven_b/current.json; the previous current.json moves to archive/.
--json-out PATH writes them to PATH instead (a trial run that should not replace them).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import machine_info, provenance, run_polled, write_result  # noqa: E402

from clpsurgery.pipeline.demo import gpt2_config, gpt2_tensors, write_model_folder  # noqa: E402
from clpsurgery.formats.safetensors_header import TensorSpec, encode_header  # noqa: E402
from clpsurgery.vocab.vocab_assets import GPT2_EOS, gpt2_tokenizer, save_tokenizer_folder, train_wordfreq_bpe  # noqa: E402
from clpsurgery.formats.writer import write_index  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SHARD_BYTES = 5 * 10**9
CHUNK_BYTES = 64 * 1024 * 1024


def bloom_tensors(vocab: int = 250_880, hidden: int = 4096, layers: int = 30) -> list[TensorSpec]:
    """BLOOM-7b1's tensors, in the order the hub's shards hold them."""
    specs = [
        TensorSpec("transformer.word_embeddings.weight", "BF16", (vocab, hidden)),
        TensorSpec("transformer.word_embeddings_layernorm.weight", "BF16", (hidden,)),
        TensorSpec("transformer.word_embeddings_layernorm.bias", "BF16", (hidden,)),
    ]
    for i in range(layers):
        p = f"transformer.h.{i}."
        specs += [
            TensorSpec(p + "input_layernorm.weight", "BF16", (hidden,)),
            TensorSpec(p + "input_layernorm.bias", "BF16", (hidden,)),
            TensorSpec(p + "self_attention.query_key_value.weight", "BF16", (3 * hidden, hidden)),
            TensorSpec(p + "self_attention.query_key_value.bias", "BF16", (3 * hidden,)),
            TensorSpec(p + "self_attention.dense.weight", "BF16", (hidden, hidden)),
            TensorSpec(p + "self_attention.dense.bias", "BF16", (hidden,)),
            TensorSpec(p + "post_attention_layernorm.weight", "BF16", (hidden,)),
            TensorSpec(p + "post_attention_layernorm.bias", "BF16", (hidden,)),
            TensorSpec(p + "mlp.dense_h_to_4h.weight", "BF16", (4 * hidden, hidden)),
            TensorSpec(p + "mlp.dense_h_to_4h.bias", "BF16", (4 * hidden,)),
            TensorSpec(p + "mlp.dense_4h_to_h.weight", "BF16", (hidden, 4 * hidden)),
            TensorSpec(p + "mlp.dense_4h_to_h.bias", "BF16", (hidden,)),
        ]
    specs += [TensorSpec("transformer.ln_f.weight", "BF16", (hidden,)), TensorSpec("transformer.ln_f.bias", "BF16", (hidden,))]
    return specs


def llama_tensors(vocab: int = 32_000, hidden: int = 4096, layers: int = 32, intermediate: int = 11_008) -> list[TensorSpec]:
    """LLaMA-2-7B's tensors, in the order the hub's shards hold them (head last)."""
    specs = [TensorSpec("model.embed_tokens.weight", "BF16", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        specs += [TensorSpec(p + f"self_attn.{x}_proj.weight", "BF16", (hidden, hidden)) for x in "qkvo"]
        specs += [
            TensorSpec(p + "mlp.gate_proj.weight", "BF16", (intermediate, hidden)),
            TensorSpec(p + "mlp.up_proj.weight", "BF16", (intermediate, hidden)),
            TensorSpec(p + "mlp.down_proj.weight", "BF16", (hidden, intermediate)),
            TensorSpec(p + "input_layernorm.weight", "BF16", (hidden,)),
            TensorSpec(p + "post_attention_layernorm.weight", "BF16", (hidden,)),
        ]
    specs += [TensorSpec("model.norm.weight", "BF16", (hidden,)), TensorSpec("lm_head.weight", "BF16", (vocab, hidden))]
    return specs


def shard(specs: list[TensorSpec], limit: int = SHARD_BYTES) -> list[list[TensorSpec]]:
    """Greedy shards of at most `limit` bytes, in order (as save_pretrained's max_shard_size does)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def write_random_shard(path: Path, specs: list[TensorSpec], rng: np.random.Generator) -> None:
    """A shard of random finite bf16 values (exponent bit 14 cleared: |x| < 2), streamed."""
    header, offsets = encode_header(specs, {"format": "pt"})
    base = (rng.integers(0, 2**16, CHUNK_BYTES // 2, dtype=np.uint16) & np.uint16(0xBFFF))
    with open(path, "wb") as f:
        f.write(header)
        total = max(end for _, end in offsets.values())
        written, salt = 0, 0
        while written < total:
            n = min(CHUNK_BYTES, total - written)
            chunk = base ^ np.uint16(salt & 0x3FFF & 0xBFFF)  # vary the data, keep it finite
            f.write(chunk.view(np.uint8)[:n].tobytes())
            written += n
            salt += 1


def build_source(folder: Path, shape: str, seed: int) -> dict:
    """A sharded source folder of the given shape with config.json and a real tokenizer."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    if shape == "bloom-7b1":
        specs = bloom_tensors()
        tokenizer = gpt2_tokenizer()
        config = {
            "architectures": ["BloomForCausalLM"], "model_type": "bloom", "vocab_size": 250_880,
            "hidden_size": 4096, "n_layer": 30, "n_head": 32, "bos_token_id": 50256, "eos_token_id": 50256,
            "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        }
        save_tokenizer_folder(tokenizer, folder, bos=GPT2_EOS, eos=GPT2_EOS)
    elif shape == "llama-2-7b":
        specs = llama_tensors()
        tokenizer = train_wordfreq_bpe("en", vocab_size=32_000, n_words=120_000)
        config = {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32_000,
            "hidden_size": 4096, "intermediate_size": 11_008, "num_hidden_layers": 32,
            "num_attention_heads": 32, "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
        }
        save_tokenizer_folder(tokenizer, folder, bos="<s>", eos="</s>", unk="<unk>", pad="<pad>")
    else:
        raise SystemExit(f"unknown shape {shape}")
    shards = shard(specs)
    weight_map = {}
    for i, members in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_random_shard(folder / name, members, rng)
        weight_map.update({s.name: name for s in members})
    write_index(folder, weight_map, sum(s.nbytes for s in specs))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return {"shards": len(shards), "bytes": sum(p.stat().st_size for p in folder.iterdir()), "tokenizer_tokens": tokenizer.get_vocab_size()}


def build_helper(folder: Path) -> dict:
    tokenizer = train_wordfreq_bpe("de", vocab_size=32_000, n_words=120_000)
    config = gpt2_config(tokenizer.get_vocab_size(), n_embd=768, n_layer=2, n_head=12, bos=0, eos=1)
    config["torch_dtype"] = "float32"
    import torch

    write_model_folder(folder, config, gpt2_tensors(config, torch.float32, seed=7))
    save_tokenizer_folder(tokenizer, folder, bos="<s>", eos="</s>", unk="<unk>", pad="<pad>")
    return {"tokenizer_tokens": tokenizer.get_vocab_size(), "hidden": 768}


def evict(folder: Path) -> None:
    """Drop a folder's files from the page cache (after `sync`, so that every page is clean):
    `cp` and `init` each start with the source on disk, not in memory. Without this the second
    of the two finds what the first read still cached (13-14 GB of source in 24 GB of RAM)."""
    subprocess.run(["sync"], check=True)
    for path in folder.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run_cp(source: Path, target: Path) -> dict:
    result = run_polled(["cp", "-r", "--", str(source), str(target)])
    result["seconds"] += _sync_seconds()
    shutil.rmtree(target, ignore_errors=True)
    return result


def _sync_seconds() -> float:
    """`sync`, timed: both the floor and init are measured until their data is on disk."""
    started = time.perf_counter()
    subprocess.run(["sync"], check=True)
    return time.perf_counter() - started


def run_init(source: Path, helper: Path, out: Path, extra: list[str], command: str = "init", checkout: Path | None = None) -> dict:
    """`clpsurgery COMMAND` as a child process (the code of `checkout`, another clone of the
    repository, where given: the same source and helper timed on another commit)."""
    argv = [sys.executable, "-m", "clpsurgery", command, str(source), str(helper), str(out), "--quiet", *extra]
    env = None if checkout is None else {**os.environ, "PYTHONPATH": f"{checkout}:{checkout / 'kernels'}"}
    result = run_polled(argv, env=env)
    result["seconds"] += _sync_seconds()
    if result["returncode"] != 0:
        raise RuntimeError(f"init failed: {result['stderr_tail']}")
    manifest = json.loads((out / "clpsurgery.json").read_text())
    result["stage_seconds"] = manifest["seconds"]
    result["vocabulary"] = manifest["vocabulary"]
    result["weights"] = manifest["weights"]
    result["bytes"] = manifest["bytes"]
    if manifest.get("extension"):  # extend: how many tokens were appended, and the padding rows they took
        result["extension"] = {k: v for k, v in manifest["extension"].items() if k != "notes"}
    shutil.rmtree(out, ignore_errors=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="bloom-7b1,llama-2-7b")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=REPO / "benchmarks" / "tmp-seven-b")
    parser.add_argument("--skip-dense", action="store_true")
    parser.add_argument("--command", choices=("init", "extend"), default="init", help="what the init runs run: init, or extend (keep the source vocabulary, append the helper's tokens)")
    parser.add_argument("--init-options", default="", help="extra init flags for the init runs, e.g. '--method omp --top-k 8'")
    parser.add_argument("--json-out", type=Path,
                        help="write the results here instead of benchmarks/results/seven_b/current.json (a trial run)")
    parser.add_argument("--baseline", type=Path, help="another checkout of the repository (e.g. `git worktree add /tmp/before COMMIT`): its init runs too, after ours, on the same source, as `baseline`")
    parser.add_argument("--baseline-first", action="store_true", help="run the baseline's inits before ours (to see what the order costs)")
    parser.add_argument("--label", help="a word naming this result in the archive (default: warm with --source-cache as-is)")
    parser.add_argument("--source-cache", choices=("cold", "as-is"), default="cold",
                        help="cold: evict the source from the page cache before each cp and init (default); as-is: leave it")
    args = parser.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=args.workdir))
    report = {"benchmark": "seven_b", "date": dt.date.today().isoformat(), "command": " ".join(sys.argv),
              "machine": machine_info(work), "shapes": {}}
    prov = provenance(machine=report["machine"])
    if args.baseline is not None:
        report["baseline"] = {"checkout": str(args.baseline), "commit": subprocess.run(
            ["git", "-C", str(args.baseline), "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()}
    try:
        helper = work / "helper-de"
        report["helper"] = build_helper(helper)
        for shape in args.shapes.split(","):
            source = work / shape
            print(f"writing {shape} ...", flush=True)
            facts = build_source(source, shape, seed=1)
            runs: dict[str, list[dict]] = {"cp": [], "init": []}
            if args.baseline is not None:
                runs["baseline"] = []
            if not args.skip_dense:
                runs["dense"] = []
            cold = (lambda: evict(source)) if args.source_cache == "cold" else (lambda: None)
            # Every cp first, then every init: on the development VM a cp that follows an init
            # (whose copies use O_DIRECT) ran 1.7x slower than one that follows a cp (39.7-40.2 s
            # against 18.8-25.1), so interleaving would flatter init. An init that follows an init
            # pays whatever that effect is itself.
            for _ in range(args.repeats):
                cold()
                runs["cp"].append(run_cp(source, work / "copy"))
                print(f"  cp -r    {runs['cp'][-1]['seconds']:7.1f} s  peak {runs['cp'][-1]['peak_rss_kib'] / 1024:7.0f} MiB", flush=True)

            def ours() -> None:
                for _ in range(args.repeats):
                    cold()
                    runs["init"].append(run_init(source, helper, work / "out", args.init_options.split(), args.command))
                    r = runs["init"][-1]
                    print(f"  init     {r['seconds']:7.1f} s  peak {r['peak_rss_kib'] / 1024:7.0f} MiB  {r['stage_seconds']}", flush=True)

            def baseline() -> None:
                for _ in range(args.repeats if args.baseline is not None else 0):
                    cold()
                    runs["baseline"].append(run_init(source, helper, work / "out", args.init_options.split(), args.command, args.baseline))
                    r = runs["baseline"][-1]
                    print(f"  baseline {r['seconds']:7.1f} s  peak {r['peak_rss_kib'] / 1024:7.0f} MiB  {r['stage_seconds']}", flush=True)

            for series in ((baseline, ours) if args.baseline_first else (ours, baseline)):
                series()
            for _ in range(0 if args.skip_dense else args.repeats):
                cold()
                runs["dense"].append(run_init(source, helper, work / "out", ["--top-k", "all"]))
                r = runs["dense"][-1]
                print(f"  top-k all{r['seconds']:7.1f} s  peak {r['peak_rss_kib'] / 1024:7.0f} MiB  {r['stage_seconds']}", flush=True)
            floor = statistics.median(r["seconds"] for r in runs["cp"])
            summary = {
                op: {
                    "median_seconds": statistics.median(r["seconds"] for r in rs),
                    "ratio_to_cp": statistics.median(r["seconds"] for r in rs) / floor,
                    "peak_rss_mib": max(r["peak_rss_kib"] for r in rs) / 1024,
                }
                for op, rs in runs.items()
            }
            report["shapes"][shape] = {"source": facts, "summary": summary, "runs": runs}
            for op, s in summary.items():
                print(f"  {shape:11s} {op:6s} {s['median_seconds']:7.1f} s  x{s['ratio_to_cp']:.2f} cp  peak {s['peak_rss_mib']:.0f} MiB", flush=True)
            shutil.rmtree(source)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    label = args.label or ("warm" if args.source_cache == "as-is" else None)
    print(f"wrote {write_result('seven_b', report, label=label, prov=prov, json_out=args.json_out)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
