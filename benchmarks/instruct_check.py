"""An instruct model through `init` (issue 17): SmolLM2-135M-Instruct, the quality benchmark's source,
converted to the benchmark's German tokenizer with the default options, then checked with the model
library: its chat template renders, tokenises inside the vocabulary, the end-of-turn token is eos
in every config, and greedy generation stops there when the model emits it. Zero-shot (no training
in the target language), the converted model may not emit it within the limit: the script
records the source's own answer beside it, which does.

    python benchmarks/quality/run.py --train-steps 0 --variants softmax:5   # builds the source and helper
    python benchmarks/instruct_check.py

The source and helper are the quality benchmark's cached stages (benchmarks/quality/work/). The
result, with provenance, goes to benchmarks/results/instruct_check/current.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from measure import provenance, write_result  # noqa: E402

WORK = HERE / "quality" / "work"
MESSAGES = [{"role": "user", "content": "Wie heißt die Hauptstadt von Deutschland?"}]


def stage(prefix: str, **params) -> Path:
    """The newest finished stage folder of the quality benchmark with these params."""
    found = []
    for folder in WORK.glob(prefix + "-*"):
        done = folder / "done.json"
        if done.is_file():
            info = json.loads(done.read_text())
            if all(info.get("params", {}).get(k) == v for k, v in params.items()):
                found.append((done.stat().st_mtime, folder))
    if not found:
        raise SystemExit(f"no finished {prefix} stage with {params} under {WORK}: run the quality benchmark first")
    return max(found)[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--helper-minutes", type=float, default=20.0, help="which cached helper: its time cap")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    prov = provenance()
    import torch
    import transformers

    source = stage("source")
    helper = stage("helper", time_cap=args.helper_minutes, corpus=stage("corpus-de").name)
    with tempfile.TemporaryDirectory(dir=WORK) as tmp:
        out = Path(tmp) / "out"
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "clpsurgery", "init", "--quiet", str(source), str(helper), str(out)], check=True)
        seconds = time.perf_counter() - started
        manifest = json.loads((out / "clpsurgery.json").read_text())
        config = json.loads((out / "config.json").read_text())
        generation = json.loads((out / "generation_config.json").read_text())
        tok = transformers.AutoTokenizer.from_pretrained(str(out))
        text = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
        ids = tok.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
        end = tok.convert_tokens_to_ids("<|im_end|>")
        model = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
        with torch.no_grad():
            generated = model.generate(torch.tensor([ids]), max_new_tokens=200, do_sample=False)[0, len(ids):].tolist()
        source_tok = transformers.AutoTokenizer.from_pretrained(str(source))
        source_ids = source_tok.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
        source_model = transformers.AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32).eval()
        with torch.no_grad():
            source_generated = source_model.generate(torch.tensor([source_ids]), max_new_tokens=200, do_sample=False)[0, len(source_ids):].tolist()
        checks = {
            "kept_source_specials": manifest["kept_source_specials"],
            "template_renders": text,
            "ids_inside_vocabulary": all(0 <= i < config["vocab_size"] for i in ids),
            "template_ids": ids,
            "source_template_ids_count": len(source_tok.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]),
            "eos": {"config": config.get("eos_token_id"), "generation_config": generation.get("eos_token_id"), "tokenizer": tok.eos_token_id, "end_of_turn": end},
            "eos_agree": config.get("eos_token_id") == generation.get("eos_token_id") == tok.eos_token_id == end,
            "generated_tokens": len(generated),
            "generation_stopped_at_end_of_turn": bool(generated) and generated[-1] == end,
            "generated_text": tok.decode(generated),
            # the same conversation to the source itself: how an instruct model ends its turn
            "source_generated_tokens": len(source_generated),
            "source_stopped_at_end_of_turn": bool(source_generated) and source_generated[-1] == source_tok.convert_tokens_to_ids("<|im_end|>"),
            "source_generated_text": source_tok.decode(source_generated),
            "init_seconds": seconds,
        }
    for key, value in checks.items():
        print(f"{key}: {value}")
    written = write_result("instruct_check", {"source": source.name, "helper": helper.name, "messages": MESSAGES, "checks": checks}, prov=prov, json_out=args.json_out)
    print(f"wrote {written}")
    return 0 if checks["ids_inside_vocabulary"] and checks["eos_agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
