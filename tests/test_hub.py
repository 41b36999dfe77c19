"""Hub ids where paths go (clpsurgery.formats.hub): resolved offline from a real cache folder.

Every test runs with HF_HUB_OFFLINE=1, HF_HOME and HF_HUB_CACHE in a temporary folder, and sockets
that refuse to connect: nothing here touches the network. The cache is written in huggingface_hub's
own layout (models--org--name/{refs,blobs,snapshots}, snapshot files as relative symlinks into
blobs/, and trees/<commit>.json where the installed version keeps a tree listing), and the library
itself (scan_cache_dir) is asked to recognise it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import huggingface_hub
import huggingface_hub.errors
from huggingface_hub import constants as hub_constants
from huggingface_hub.utils import are_progress_bars_disabled, filter_repo_objects

from clpsurgery.errors import SurgeryError
from clpsurgery.formats import hub
from clpsurgery.formats.checkpoint import CheckpointLayout
from clpsurgery.formats.hub import SUBFOLDER_PATTERNS, TOKENIZER_FILE_NAMES, allow_patterns, resolve_model
from clpsurgery.vocab.vocabulary import TOKENIZER_FILES

TREE_CACHE = importlib.util.find_spec("huggingface_hub._tree_cache") is not None
LFS_SUFFIXES = (".safetensors", ".bin", ".model")


# --- no network, a cache of our own --------------------------------------------------------------------


def _no_network(*args, **kwargs):
    raise AssertionError("a test of clpsurgery.formats.hub tried to use the network")


@pytest.fixture(autouse=True)
def offline_cache(tmp_path, monkeypatch) -> Path:
    """HF_HUB_OFFLINE=1 and an empty cache in tmp_path, for the environment and for the already
    imported huggingface_hub (which reads both when imported); sockets refuse to connect."""
    home = tmp_path / "hf-home"
    cache = home / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(socket.socket, "connect", _no_network)
    monkeypatch.setattr(socket.socket, "connect_ex", _no_network)
    monkeypatch.setattr(socket, "create_connection", _no_network)
    monkeypatch.setattr(socket, "getaddrinfo", _no_network)
    monkeypatch.chdir(tmp_path)  # relative specs are looked up here first
    probe = tmp_path / "symlink-probe"
    try:
        probe.symlink_to("nowhere")
    except OSError:
        pytest.skip("environment: the temporary folder cannot hold symlinks, which the Hub cache is made of")
    probe.unlink()
    return cache


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def add_revision(
    cache: Path,
    repo_id: str,
    files: dict[str, Path | bytes],
    *,
    ref: str | None = "main",
    commit: str | None = None,
    listed_only: dict[str, int] | None = None,
) -> Path:
    """Write one commit of a model repository into the cache as huggingface_hub writes it: each
    file a blob named by its hash (sha256 for LFS files, the git blob sha1 otherwise), a relative
    symlink to it in snapshots/<commit>/, `refs/<ref>` holding the commit hash (no newline) and,
    where the library keeps one, trees/<commit>.json listing the repository's files, including
    `listed_only` ones that the cache does not hold (files of the repo never fetched)."""
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    blobs = storage / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    contents = {name: src.read_bytes() if isinstance(src, Path) else src for name, src in files.items()}
    if commit is None:
        digest = hashlib.sha1(repo_id.encode() + (ref or "").encode())
        for name in sorted(contents):
            digest.update(name.encode() + hashlib.sha256(contents[name]).digest())
        commit = digest.hexdigest()
    snapshot = storage / "snapshots" / commit
    tree: dict[str, dict] = {}
    for name, data in contents.items():
        sha1, sha256 = _git_blob_sha1(data), hashlib.sha256(data).hexdigest()
        lfs = name.endswith(LFS_SUFFIXES)
        blob = blobs / (sha256 if lfs else sha1)
        if not blob.exists():
            blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
        tree[name] = {"size": len(data), "blob_id": sha1, **({"lfs_sha256": sha256, "lfs_size": len(data)} if lfs else {})}
    for name, size in (listed_only or {}).items():
        fake = hashlib.sha256(name.encode()).hexdigest()
        tree[name] = {"size": size, "blob_id": fake[:40], **({"lfs_sha256": fake, "lfs_size": size} if name.endswith(LFS_SUFFIXES) else {})}
    if ref is not None:
        (storage / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)
    if TREE_CACHE:
        from huggingface_hub._tree_cache import TREE_CACHE_FORMAT_VERSION

        (storage / "trees").mkdir(exist_ok=True)
        (storage / "trees" / f"{commit}.json").write_text(json.dumps({"format_version": TREE_CACHE_FORMAT_VERSION, "files": tree}, indent=1))
    return snapshot


def model_files(folder: Path) -> dict[str, Path]:
    """A saved model folder's top-level files, as a repository would hold them."""
    return {p.name: p for p in sorted(folder.iterdir()) if p.is_file()}


def tiny_side_files() -> dict[str, bytes]:
    return {
        "config.json": json.dumps({"model_type": "llama", "vocab_size": 4, "hidden_size": 2}).encode(),
        "tokenizer.json": b'{"model": {"type": "WordLevel", "vocab": {"a": 0}}}',
    }


def tiny_shards(folder: Path, names: list[str]) -> tuple[dict[str, bytes], dict[str, str]]:
    """Real safetensors shards (one tensor each) and their index, as bytes by file name."""
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, bytes] = {}
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(names):
        tensor = f"model.layers.{i}.weight"
        save_file({tensor: np.full((2, 2), i, dtype=np.float32)}, str(folder / shard), metadata={"format": "pt"})
        files[shard] = (folder / shard).read_bytes()
        weight_map[tensor] = shard
    index = {"metadata": {"total_size": 16 * len(names)}, "weight_map": weight_map}
    files["model.safetensors.index.json"] = json.dumps(index).encode()
    return files, weight_map


# --- what is fetched ---------------------------------------------------------------------------------


def test_allow_patterns_cover_what_init_reads_and_nothing_else():
    assert set(TOKENIZER_FILES) <= set(TOKENIZER_FILE_NAMES), "clpsurgery.vocab reads a tokenizer file the Hub resolution would not fetch"
    repo = [
        "config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
        "model-00001-of-00002.safetensors", *TOKENIZER_FILES, "clpsurgery.json",
        "pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "consolidated.00.pth", "model.gguf",
        "model.onnx", "tf_model.h5", "flax_model.msgpack", "README.md", ".gitattributes",
        "original/model.safetensors", "onnx/model.onnx", "original/tokenizer.model", "training_args.bin",
    ]
    # huggingface_hub's own filter, with the patterns resolve_model passes it.
    fetched = set(filter_repo_objects(repo, allow_patterns=allow_patterns(), ignore_patterns=list(SUBFOLDER_PATTERNS)))
    assert fetched == {
        "config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
        "model-00001-of-00002.safetensors", *TOKENIZER_FILES, "clpsurgery.json",
    }
    assert set(filter_repo_objects(repo, allow_patterns=allow_patterns(weights=False))) == {
        "config.json", "generation_config.json", "model.safetensors.index.json", *TOKENIZER_FILES, "clpsurgery.json",
    }


# --- resolution from the cache -------------------------------------------------------------------------


def test_ids_resolve_to_their_snapshots_offline(offline_cache, llama_source, german_helper):
    main = add_revision(offline_cache, "org/src", model_files(llama_source))
    other_files = {**model_files(llama_source), "generation_config.json": b'{"max_new_tokens": 7}'}
    other = add_revision(offline_cache, "org/src", other_files, ref="other")
    assert main != other

    assert resolve_model("org/src", role="source") == main
    assert resolve_model("org/src@main", role="source") == main
    assert resolve_model("org/src@other", role="source") == other
    assert resolve_model(f"org/src@{other.name}", role="source") == other  # a commit hash needs no ref
    assert json.loads((resolve_model("org/src@other", role="source") / "generation_config.json").read_text()) == {"max_new_tokens": 7}
    # The files are the library's symlinks into blobs/, and read as the checkpoint.
    assert (main / "model.safetensors").is_symlink()
    assert set(CheckpointLayout.open(main).tensors) == set(CheckpointLayout.open(llama_source).tensors)

    # huggingface_hub itself recognises the cache we wrote.
    info = huggingface_hub.scan_cache_dir(offline_cache)
    assert not info.warnings
    (repo,) = info.repos
    assert repo.repo_id == "org/src" and repo.repo_type == "model"
    assert {r.commit_hash for r in repo.revisions} == {main.name, other.name}
    assert {ref for r in repo.revisions for ref in r.refs} == {"main", "other"}


def test_an_explicit_cache_dir(tmp_path):
    cache = tmp_path / "elsewhere"
    snapshot = add_revision(cache, "org/tiny", {**tiny_side_files(), "model.safetensors": tiny_shards(tmp_path / "w", ["model.safetensors"])[0]["model.safetensors"]})
    assert resolve_model("org/tiny", role="source", cache_dir=cache) == snapshot
    with pytest.raises(SurgeryError, match="not in the local Hugging Face cache"):
        resolve_model("org/tiny", role="source")  # not in the default cache


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("org/absent", "download org/absent"),
        ("absent", "download absent"),
        ("org/tiny@nope", "download org/tiny --revision nope"),
        ("org/tiny@0123456789abcdef0123456789abcdef01234567", "revision '0123456789abcdef0123456789abcdef01234567'"),
    ],
)
def test_not_in_the_cache_while_offline_is_one_line(offline_cache, tmp_path, spec, expected):
    add_revision(offline_cache, "org/tiny", {**tiny_side_files(), "model.safetensors": tiny_shards(tmp_path / "w", ["model.safetensors"])[0]["model.safetensors"]})
    with pytest.raises(SurgeryError) as caught:
        resolve_model(spec, role="source")
    error = caught.value
    assert error.place == spec
    assert "not in the local Hugging Face cache" in error.problem and "HF_HUB_OFFLINE" in error.problem
    assert expected in error.problem
    assert "\n" not in str(error) and error.__suppress_context__  # no chained traceback


def test_local_paths_win_and_come_back_unchanged(offline_cache, tmp_path, llama_source):
    add_revision(offline_cache, "org/src", model_files(llama_source))
    (tmp_path / "org" / "src").mkdir(parents=True)  # a local folder named like the Hub id
    assert resolve_model("org/src", role="source") == Path("org/src")
    assert resolve_model(Path("org/src"), role="source") == Path("org/src")
    assert resolve_model(str(llama_source), role="source") == llama_source
    single = llama_source / "model.safetensors"
    assert resolve_model(str(single), role="source") == single
    assert resolve_model("..", role="source") == Path("..")  # an existing folder, not an invalid id
    (tmp_path / "dangling").symlink_to("missing")
    assert resolve_model("dangling", role="source") == Path("dangling")  # the checkpoint reader says what is wrong


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("a/b/c/d", "give the repository id 'a/b'"),
        ("org/name/model.safetensors", "give the repository id 'org/name'"),
        ("org/..", "not a Hub id"),
        ("../missing", "not a Hub id"),
        ("/no/such/folder", "not a Hub id"),
        ("./org/name", "not a Hub id"),
        ("bad--name", "not a Hub id"),
        ("org/name.git", "not a Hub id"),
        ("org/name@", "revision after '@' is empty"),
        ("org/name@ main", "not a branch, tag or commit"),
        ("missing.safetensors", "names a file"),
        ("out/config.json", "names a file"),
    ],
)
def test_invalid_specs_fail_in_one_line(spec, expected):
    with pytest.raises(SurgeryError) as caught:
        resolve_model(spec, role="source")
    assert "does not exist, and is not a Hub id" in caught.value.problem
    assert expected in caught.value.problem
    assert "\n" not in str(caught.value)


# --- weights ------------------------------------------------------------------------------------------


def test_sharded_repo_fetches_the_index_shards_only(offline_cache, tmp_path):
    shards, weight_map = tiny_shards(tmp_path / "w", ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"])
    never_fetched = {"consolidated.safetensors": 10**9, "pytorch_model.bin": 10**9, "original/consolidated.00.pth": 10**9}
    snapshot = add_revision(offline_cache, "org/sharded", {**tiny_side_files(), **shards}, listed_only=never_fetched)
    assert resolve_model("org/sharded", role="source") == snapshot
    assert sorted(p.name for p in snapshot.iterdir()) == sorted([*tiny_side_files(), *shards])
    if TREE_CACHE:
        # This huggingface_hub checks an offline snapshot against the cached listing, after the
        # allow/ignore patterns: asking for everything fails, asking for what init reads does not.
        with pytest.raises(huggingface_hub.errors.IncompleteSnapshotError):
            huggingface_hub.snapshot_download("org/sharded")
        with pytest.raises(huggingface_hub.errors.IncompleteSnapshotError):
            huggingface_hub.snapshot_download("org/sharded", allow_patterns=["*.safetensors"])  # consolidated.safetensors
    else:
        # Older versions return the snapshot folder offline whatever the patterns: nothing is filtered.
        assert Path(huggingface_hub.snapshot_download("org/sharded")) == snapshot


def test_a_sharded_snapshot_reads_as_a_checkpoint(offline_cache, tmp_path):
    shards, weight_map = tiny_shards(tmp_path / "w", ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"])
    snapshot = add_revision(offline_cache, "org/sharded", {**tiny_side_files(), **shards})
    layout = CheckpointLayout.open(resolve_model("org/sharded", role="source"))
    assert layout.is_sharded and set(layout.tensors) == set(weight_map)
    assert {h.path for h in layout.headers} == {snapshot / s for s in set(weight_map.values())}


def test_init_on_a_sharded_hub_source(offline_cache, tmp_path, llama_source, german_helper):
    from safetensors.torch import load_file
    from safetensors.torch import save_file as save_torch

    from clpsurgery.cli import main

    tensors = load_file(str(llama_source / "model.safetensors"))
    groups = {
        "model-00001-of-00002.safetensors": sorted(n for n in tensors if not n.startswith("model.layers.")),
        "model-00002-of-00002.safetensors": sorted(n for n in tensors if n.startswith("model.layers.")),
    }
    files: dict[str, Path | bytes] = {n: p for n, p in model_files(llama_source).items() if n != "model.safetensors"}
    weight_map = {}
    for shard, names in groups.items():
        save_torch({n: tensors[n] for n in names}, str(tmp_path / shard), metadata={"format": "pt"})
        files[shard] = tmp_path / shard
        weight_map.update(dict.fromkeys(names, shard))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    files["model.safetensors.index.json"] = json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}).encode()
    add_revision(offline_cache, "org/sharded-src", files)
    add_revision(offline_cache, "org/helper", model_files(german_helper))
    out = tmp_path / "out"
    try:
        main(["init", "--quiet", "--debug", "org/sharded-src", "org/helper", str(out)])
    except SystemExit as e:  # pragma: no cover - only on failure
        pytest.fail(f"clpsurgery init exited with {e.code}")
    assert json.loads((out / "model.safetensors.index.json").read_text())["weight_map"] == weight_map
    middle = "model-00002-of-00002.safetensors"  # no vocabulary tensor: copied whole, through the symlink
    assert (out / middle).read_bytes() == (tmp_path / middle).read_bytes() and not (out / middle).is_symlink()


def test_a_missing_shard_is_one_line(offline_cache, tmp_path):
    shards, _ = tiny_shards(tmp_path / "w", ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"])
    missing = "model-00002-of-00002.safetensors"
    size = len(shards.pop(missing))
    add_revision(offline_cache, "org/partial", {**tiny_side_files(), **shards}, listed_only={missing: size})
    with pytest.raises(SurgeryError, match="only partly in the local Hugging Face cache") as caught:
        resolve_model("org/partial", role="source")
    assert "download org/partial" in caught.value.problem


def test_single_file_repo_prefers_model_safetensors(offline_cache, tmp_path):
    weights = tiny_shards(tmp_path / "w", ["model.safetensors"])[0]["model.safetensors"]
    snapshot = add_revision(offline_cache, "org/single", {**tiny_side_files(), "model.safetensors": weights}, listed_only={"consolidated.safetensors": 10**9})
    assert resolve_model("org/single", role="source") == snapshot
    assert CheckpointLayout.open(snapshot).headers[0].path.name == "model.safetensors"


def test_pytorch_bin_only_repo_is_refused_by_name(offline_cache, tmp_path):
    files = {**tiny_side_files(), "pytorch_model.bin": b"\x80\x02 a pickle", "training_args.bin": b"\x80\x02 not weights"}
    add_revision(offline_cache, "org/binonly", files)
    with pytest.raises(SurgeryError) as caught:
        resolve_model("org/binonly", role="source")
    assert "source repository has no .safetensors weights, only pytorch_model.bin, which" in caught.value.problem
    assert "does not read" in caught.value.problem
    with pytest.raises(SurgeryError, match="helper repository has no .safetensors"):
        resolve_model("org/binonly", role="helper")
    # A helper-free method reads only the tokenizer: no weights wanted, none checked.
    assert resolve_model("org/binonly", role="helper", weights=False).name == (offline_cache / "models--org--binonly" / "refs" / "main").read_text()


def test_bin_weights_named_from_the_cached_listing(offline_cache):
    add_revision(offline_cache, "org/listed", tiny_side_files(), listed_only={"pytorch_model.bin": 10**9})
    with pytest.raises(SurgeryError) as caught:
        resolve_model("org/listed", role="source")
    if TREE_CACHE:  # the listing knows the .bin the cache never fetched
        assert "only pytorch_model.bin" in caught.value.problem
    else:
        assert "no .safetensors weights in its top folder" in caught.value.problem


# --- progress bars and the library's errors -------------------------------------------------------------


@pytest.mark.parametrize("quiet", [False, True])
def test_quiet_turns_the_progress_bars_off_for_the_call_only(offline_cache, tmp_path, monkeypatch, quiet):
    add_revision(offline_cache, "org/tiny", {**tiny_side_files(), "model.safetensors": tiny_shards(tmp_path / "w", ["model.safetensors"])[0]["model.safetensors"]})
    real = huggingface_hub.snapshot_download
    seen = []

    def spy(*args, **kwargs):
        seen.append((are_progress_bars_disabled(), kwargs.get("allow_patterns")))
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    assert not are_progress_bars_disabled()
    resolve_model("org/tiny", role="source", quiet=quiet)
    assert [disabled for disabled, _ in seen] == [quiet, quiet]
    assert seen[0][1] == list(hub.SIDE_FILES)
    assert seen[1][1] == (["model.safetensors"] if TREE_CACHE else ["*.safetensors"])  # the listing names model.safetensors
    assert not are_progress_bars_disabled()


def _hub_error(name: str, message: str = "from the library") -> Exception:
    """One of huggingface_hub's exceptions, without the HTTP response its constructor wants."""
    cls = getattr(huggingface_hub.errors, name)
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    return error


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (lambda: _hub_error("GatedRepoError"), "is gated"),
        (lambda: _hub_error("RepositoryNotFoundError"), "no Hub model repository org/name"),
        (lambda: _hub_error("RevisionNotFoundError"), "has no revision 'v2'"),
        (lambda: _hub_error("EntryNotFoundError"), "could not be found: from the library"),
        (lambda: _hub_error("HfHubHTTPError", "500 Server Error\nmore lines"), "the Hub refused org/name: 500 Server Error"),
        (lambda: ConnectionError("Connection refused"), "cannot reach the Hub"),
        (lambda: TimeoutError("timed out"), "cannot reach the Hub"),
        (lambda: PermissionError(13, "Permission denied", "/cache/blobs"), "failed (/cache/blobs): Permission denied"),
    ],
)
def test_hub_errors_become_one_line(monkeypatch, raised, expected):
    def failing(*args, **kwargs):
        raise raised()

    monkeypatch.setattr(huggingface_hub, "snapshot_download", failing)
    with pytest.raises(SurgeryError) as caught:
        resolve_model("org/name@v2", role="source")
    assert caught.value.place == "org/name@v2"
    assert expected in caught.value.problem
    assert "\n" not in str(caught.value) and caught.value.__suppress_context__


def test_not_cached_and_hub_unreachable_while_online(monkeypatch):
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)

    def failing(*args, **kwargs):
        try:
            raise ConnectionError("no route to host")
        except ConnectionError as cause:
            raise _hub_error("LocalEntryNotFoundError", "Cannot find an appropriate cached snapshot folder\nmore") from cause

    monkeypatch.setattr(huggingface_hub, "snapshot_download", failing)
    with pytest.raises(SurgeryError, match=r"not in the local Hugging Face cache and the Hub cannot be reached \(ConnectionError\)"):
        resolve_model("org/name", role="helper")


def test_a_bug_is_not_disguised(monkeypatch):
    def failing(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", failing)
    with pytest.raises(KeyError):
        resolve_model("org/name", role="source")


# --- what a snapshot's links point at, what its side files hold -----------------------------------------

OUTSIDE_MARK = b"OUTSIDE-THE-CACHE-7f3a"


def run_cli(args: list[str], capsys) -> tuple[int, list[str]]:
    """`clpsurgery ARGS` in this process: the exit code and the stderr lines."""
    from clpsurgery.cli import main

    capsys.readouterr()
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    return code, capsys.readouterr().err.splitlines()


def files_holding(folder: Path, data: bytes, but: tuple[Path, ...]) -> list[Path]:
    """Files under `folder` (not under `but`) whose bytes contain `data`."""
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and not p.is_symlink() and not any(p.is_relative_to(b) for b in but) and data in p.read_bytes()
    )


def link_outside(snapshot: Path, name: str, target: Path) -> None:
    """Replace (or add) snapshot/name with a symlink to a file outside the cache."""
    link = snapshot / name
    if link.exists() or link.is_symlink():
        link.unlink()
    link.symlink_to(target)


@pytest.mark.parametrize(
    ("role", "name", "content"),
    [
        ("helper", "special_tokens_map.json", b'{"eos_token": "</s>", "note": "%s"}'),
        ("helper", "tokenizer_config.json", b'{"eos_token": "</s>", "note": "%s"}'),
        ("helper", "chat_template.jinja", b"{{ messages }} %s"),
        ("source", "chat_template.jinja", b"{{ messages }} %s"),
        ("source", "generation_config.json", b'{"max_new_tokens": 3, "note": "%s"}'),
        ("source", "model.safetensors", None),
    ],
)
def test_a_snapshot_file_linked_outside_the_cache_is_refused(offline_cache, tmp_path, llama_source, german_helper, capsys, role, name, content):
    """A snapshot file is the library's symlink into the repository's blobs/: one that points
    anywhere else is refused by name before anything is read through it or written."""
    src = add_revision(offline_cache, "org/src", model_files(llama_source))
    helper = add_revision(offline_cache, "org/helper", model_files(german_helper))
    outside = tmp_path / "elsewhere" / name
    outside.parent.mkdir()
    if content is None:  # weights: a real checkpoint, so only the link can be what is wrong
        outside.write_bytes((llama_source / name).read_bytes())
        mark = outside.read_bytes()[8:200]
    else:
        outside.write_bytes(content.replace(b"%s", OUTSIDE_MARK))
        mark = OUTSIDE_MARK
    link_outside(src if role == "source" else helper, name, outside)
    out = tmp_path / "out"
    code, lines = run_cli(["init", "--quiet", "org/src", "org/helper", str(out)], capsys)
    assert code == 1, lines
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert name in lines[0] and "points outside the Hugging Face cache" in lines[0], lines[0]
    assert not out.exists() and not any(p.name.startswith("out") for p in tmp_path.iterdir() if p != out)
    assert files_holding(tmp_path, mark, but=(outside, *([offline_cache] if content is None else []))) == []  # the weights' own blob aside
    with pytest.raises(SurgeryError, match="points outside the Hugging Face cache"):
        resolve_model("org/src" if role == "source" else "org/helper", role=role, weights=name.endswith(".safetensors") or role == "source")


def test_a_snapshot_given_as_a_path_is_held_to_the_same_links(offline_cache, tmp_path, llama_source, german_helper, capsys):
    """The cache's snapshot folder typed as a path is still the cache: the same check."""
    add_revision(offline_cache, "org/src", model_files(llama_source))
    helper = add_revision(offline_cache, "org/helper", model_files(german_helper))
    outside = tmp_path / "special_tokens_map.json"
    outside.write_bytes(b'{"eos_token": "%s"}' % OUTSIDE_MARK)
    link_outside(helper, "special_tokens_map.json", outside)
    out = tmp_path / "out"
    code, lines = run_cli(["init", "--quiet", "org/src", str(helper), str(out)], capsys)
    assert code == 1 and len(lines) == 1, lines
    assert "special_tokens_map.json" in lines[0] and "points outside the Hugging Face cache" in lines[0], lines[0]
    assert not out.exists() and files_holding(tmp_path, OUTSIDE_MARK, but=(outside,)) == []


def test_links_between_the_cache_files_are_fine(offline_cache, llama_source):
    """The library's own layout passes the check: absolute links into blobs/, and plain files
    (what it writes where the file system has no symlinks)."""
    snapshot = add_revision(offline_cache, "org/src", model_files(llama_source))
    config = snapshot / "config.json"
    blob = config.resolve()
    config.unlink()
    config.symlink_to(blob)  # absolute, still into blobs/
    tokenizer = snapshot / "tokenizer.json"
    data = tokenizer.read_bytes()
    tokenizer.unlink()
    tokenizer.write_bytes(data)  # a plain file of the snapshot
    assert resolve_model("org/src", role="source") == snapshot


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("special_tokens_map.json", b'{"eos_token": "</s>", '),
        ("special_tokens_map.json", b'["</s>"]'),
        ("tokenizer_config.json", b"eos_token: </s>\n"),
        ("added_tokens.json", b"not json"),
    ],
)
def test_a_snapshot_side_file_that_is_not_json_is_refused(offline_cache, tmp_path, llama_source, german_helper, capsys, name, data):
    add_revision(offline_cache, "org/src", model_files(llama_source))
    add_revision(offline_cache, "org/helper", {**model_files(german_helper), name: data})
    out = tmp_path / "out"
    code, lines = run_cli(["init", "--quiet", "org/src", "org/helper", str(out)], capsys)
    assert code == 1, lines
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert name in lines[0] and ("not valid JSON" in lines[0] or "not a JSON object" in lines[0]), lines[0]
    assert not out.exists() and not list(tmp_path.glob("out*"))


INVALID_MISSING = ["/nope/model", "./missing", "a/b/c", "~/nothing", "../up/and/away", "org/name/", "with space/x"]


@pytest.mark.parametrize("spec", INVALID_MISSING)
def test_a_missing_path_that_is_no_hub_id_says_so_in_our_words(spec):
    with pytest.raises(SurgeryError) as caught:
        resolve_model(spec, role="source")
    line = str(caught.value)
    assert caught.value.place == spec and line.startswith(f"{spec}: does not exist"), line
    assert "Hub id" in line and "org/name" in line, line
    assert "repo_type" not in line and "Repo id must" not in line and "namespace/repo_name" not in line, line
    assert "\n" not in line


@pytest.mark.parametrize(
    "args",
    [
        ["init", "--quiet", "{spec}", "org/helper", "out"],
        ["init", "--quiet", "org/src", "{spec}", "out"],
        ["inspect", "--quiet", "{spec}"],
        ["inspect", "--quiet", "org/src", "--against", "{spec}"],
        ["verify", "--quiet", "out", "--source", "{spec}"],
        ["apply", "--quiet", "transfer", "{spec}", "out"],
    ],
    ids=["SOURCE", "HELPER", "inspect PATH", "--against", "verify --source", "apply SIBLING"],
)
def test_every_role_words_a_missing_path_the_same(offline_cache, llama_source, german_helper, capsys, args):
    add_revision(offline_cache, "org/src", model_files(llama_source))
    add_revision(offline_cache, "org/helper", model_files(german_helper))
    for spec in ("/nope/model", "~/nothing"):
        code, lines = run_cli([a.replace("{spec}", spec) for a in args], capsys)
        assert code == 1 and len(lines) == 1, lines
        assert lines[0].startswith(f"error: {spec}: does not exist"), lines[0]
        assert "repo_type" not in lines[0] and "Repo id must" not in lines[0], lines[0]


# --- end to end -----------------------------------------------------------------------------------------


def test_init_on_hub_ids_from_the_cache(offline_cache, tmp_path, llama_source, german_helper):
    """`clpsurgery init org/src org/helper OUT`, offline: both ids resolve to their snapshot
    folders in the cache, and init reads through them; `inspect --against` and `verify --source`
    take the ids too."""
    from clpsurgery.cli import main

    src = add_revision(offline_cache, "org/src", model_files(llama_source))
    helper = add_revision(offline_cache, "org/helper", model_files(german_helper))
    source_path = resolve_model("org/src", role="source", quiet=True)
    helper_path = resolve_model("org/helper", role="helper", quiet=True)
    assert (source_path, helper_path) == (src, helper)
    out = tmp_path / "out"
    try:
        main(["init", "--quiet", "org/src", "org/helper@main", str(out)])
    except SystemExit as e:  # pragma: no cover - only on failure
        pytest.fail(f"clpsurgery init exited with {e.code}")
    manifest = json.loads((out / "clpsurgery.json").read_text())
    from click.testing import CliRunner

    from clpsurgery.cli import cli

    report = CliRunner().invoke(cli, ["inspect", "--json", "--quiet", "org/src", "--against", "org/helper"])
    assert report.exit_code == 0, report.output
    assert json.loads(report.output)["source"] == str(src)
    checked = CliRunner().invoke(cli, ["verify", "--quiet", str(out), "--source", "org/src"])
    assert checked.exit_code == 0 and "FAIL" not in checked.output, checked.output
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors").is_symlink()
    assert (out / "tokenizer.json").read_bytes() == (german_helper / "tokenizer.json").read_bytes()
    layout = CheckpointLayout.open(out)
    target_rows = CheckpointLayout.open(german_helper).info("transformer.wte.weight").shape[0]
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert layout.info(name).shape == (target_rows, 32)
    assert (manifest["inputs"]["source"]["path"], manifest["inputs"]["helper"]["path"]) == (str(src), str(helper))
    assert manifest["vocabulary"]["target_size"] == target_rows
    # The cache is untouched: init read through the symlinks and wrote nothing there.
    assert all(p.is_symlink() for p in src.iterdir())


def test_a_fresh_process_reads_the_environment_only(offline_cache, tmp_path):
    """HF_HUB_OFFLINE and HF_HUB_CACHE as a user sets them, read when huggingface_hub is imported;
    the resolution imports neither torch nor click."""
    snapshot = add_revision(offline_cache, "org/tiny", {**tiny_side_files(), "model.safetensors": tiny_shards(tmp_path / "w", ["model.safetensors"])[0]["model.safetensors"]})
    code = (
        "import socket, sys\n"
        "def refuse(*a, **k): raise AssertionError('network')\n"
        "socket.socket.connect = socket.socket.connect_ex = socket.create_connection = socket.getaddrinfo = refuse\n"
        "from clpsurgery.formats.hub import resolve_model\n"
        "print(resolve_model('org/tiny', role='source'))\n"
        "print(sorted(m for m in ('torch', 'click', 'faiss', 'triton') if m in sys.modules))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"), HF_HUB_CACHE=str(offline_cache))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [str(snapshot), "[]"]
