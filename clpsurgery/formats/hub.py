"""Hugging Face Hub ids where paths go: `org/name` or `org/name@revision` resolved to a folder.

`resolve_model(spec, role=...)` turns what the user typed for SOURCE or HELPER into a local path:

- The filesystem is asked first. A `spec` naming an existing file or folder is returned unchanged,
  even when it also reads as a Hub id: a local folder `org/name` wins over the Hub repository
  `org/name` (write `./org/name` to be explicit; a Hub id never starts with `.`).
- Otherwise `spec` must be a Hub model id, `name` or `org/name`, optionally followed by
  `@revision` (a branch, tag or commit hash), as huggingface_hub's own validator accepts it. The
  repository is resolved with `huggingface_hub.snapshot_download` into the library's cache
  (HF_HUB_CACHE, HF_HOME), with the library's progress bars, and its snapshot folder is returned.
  Only what init reads is fetched, and only from the repository's top folder: config.json,
  generation_config.json, the tokenizer files, model.safetensors.index.json (and clpsurgery.json,
  which `inspect` shows for an output pushed to the Hub) first; then the weights: the shards the
  index names, else model.safetensors (when the repository's listing is known), else every
  top-level *.safetensors. Never *.bin, *.pt, *.pth, *.gguf, *.onnx, *.h5, *.msgpack,
  `original/` or any other subfolder.
- With HF_HUB_OFFLINE=1 nothing touches the network: a repository already in the cache resolves
  from `refs/<revision>` (or the commit hash) to its snapshot folder; one that is not is one line
  saying so and how to fetch it. Offline, huggingface_hub returns the cached snapshot folder as it
  is (files outside the patterns stay there, unread); versions that cache the repository's file
  listing (trees/<commit>.json, huggingface_hub 2.x) also check that every listed file the patterns
  select is present, which is why the patterns name only what init reads.

Every file of a snapshot that clpsurgery may read must be the cache's own: the library's symlink
into the repository's blobs/ folder (or a plain file of the snapshot). A link that points anywhere
else is one line naming the file, before anything is read through it; a snapshot folder typed as a
path is held to the same rule.

A single file inside a repository (`org/name/model.safetensors`) is not supported: a Hub id names
a repository, and SOURCE is then the repository's snapshot folder.

Every other failure is one SurgeryError naming `spec`: not a path and not an id, not in the cache while
offline, repository not found or gated, revision not found, the Hub unreachable, or a repository
that holds no .safetensors weights (PyTorch .bin pickles are named when the listing shows them).

huggingface_hub is imported inside the functions only: `clpsurgery` without a Hub id never loads it.
"""

from __future__ import annotations

import contextlib
import fnmatch
import importlib
import json
import os
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from clpsurgery.errors import SurgeryError
from clpsurgery.formats.checkpoint import INDEX_NAME, SINGLE_NAME, in_hub_cache_blobs
from clpsurgery.formats.output_folder import MANIFEST_NAME

# What init reads from a model folder besides its weights. The tokenizer names are
# clpsurgery.vocab.vocabulary.TOKENIZER_FILES (formats may not import vocab; a test keeps the two
# lists in step).
CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILE_NAMES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
)
# clpsurgery.json: what init did, which `inspect` shows for an output pushed to the Hub.
SIDE_FILES = (*CONFIG_FILES, INDEX_NAME, *TOKENIZER_FILE_NAMES, MANIFEST_NAME)
WEIGHT_PATTERNS = ("*.safetensors",)
# huggingface_hub's patterns are fnmatch patterns whose `*` crosses `/`: this keeps to the top folder.
SUBFOLDER_PATTERNS = ("*/*",)
# Weights clpsurgery does not read, named when a repository has no .safetensors.
OTHER_WEIGHT_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.gguf", "*.h5", "*.msgpack", "*.onnx", "*.npz")
# Trainer state beside the weights: not weights, never named as such.
NOT_WEIGHTS = ("training_args", "optimizer", "scheduler", "rng_state")
# A name that ends like a file is a missing file, never a repository.
FILE_SUFFIXES = (".safetensors", ".json", ".bin", ".pt", ".pth", ".gguf", ".model", ".txt")
NOT_AN_ID = "does not exist, and is not a Hub id (org/name or org/name@revision) either"


def allow_patterns(weights: bool = True) -> list[str]:
    """Every file name pattern a resolution may fetch (the union of its two steps)."""
    return [*SIDE_FILES, *(WEIGHT_PATTERNS if weights else ())]


def parse_hub_id(spec: str) -> tuple[str, str | None]:
    """`name`, `org/name` or either with `@revision`, as (repo_id, revision or None).

    Raises SurgeryError when `spec` is not a valid Hub model id, in our words: the library's own
    text speaks of arguments the user never passed."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    def refuse(reason: str | None = None) -> SurgeryError:
        return SurgeryError(spec or "''", NOT_AN_ID + (f": {reason}" if reason else ""))

    if not spec or not spec.strip():
        raise refuse("it is empty")
    repo_id, at, revision = spec.partition("@")
    if at and (not revision or revision != revision.strip() or any(c.isspace() for c in revision)):
        raise refuse(f"the revision after '@' is {'empty' if not revision.strip() else 'not a branch, tag or commit'}")
    parts = repo_id.split("/")
    if len(parts) > 2:
        head = "/".join(parts[:2])
        try:
            validate_repo_id(head)
        except HFValidationError:
            pass
        else:
            raise refuse(f"a file or folder inside a Hub repository cannot be named; give the repository id {head!r}")
    if repo_id.endswith(FILE_SUFFIXES):
        raise refuse(f"it names a file ({PurePosixPath(repo_id).name}), and a Hub id names a repository")
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise refuse("clpsurgery does not expand '~', write the home folder out" if spec.startswith("~") else None) from None
    return repo_id, revision or None


def resolve_model(
    spec: str | os.PathLike[str],
    *,
    role: str,
    quiet: bool = False,
    weights: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """A local path for SOURCE, HELPER or another checkpoint argument (see the module docstring).

    `role` ("source", "helper", ...) only words the errors. `quiet` turns the Hub's progress bars
    off for this call (and back on after it). `weights=False` fetches the configs and tokenizer
    files only (a helper for a helper-free method). `cache_dir` defaults to huggingface_hub's own
    (HF_HUB_CACHE, else HF_HOME/hub, read when huggingface_hub is imported)."""
    text = os.fspath(spec)
    local = Path(text)
    if text and (local.exists() or local.is_symlink()):
        folder = local if local.is_dir() else local.parent
        if is_snapshot_folder(folder):  # the cache typed as a path is still the cache
            check_snapshot_files(folder, weights=weights)
        return local  # the filesystem first: a local folder named like org/name wins
    repo_id, revision = parse_hub_id(text)
    folder = _snapshot(text, repo_id, revision, role=role, quiet=quiet, weights=weights, cache_dir=cache_dir)
    return folder


# --- fetching ------------------------------------------------------------------------------------


def _snapshot(spec: str, repo_id: str, revision: str | None, *, role: str, quiet: bool, weights: bool, cache_dir) -> Path:
    from huggingface_hub import snapshot_download

    cache = None if cache_dir is None else os.fspath(cache_dir)
    with _progress_bars(quiet):
        with _hub_errors(spec, repo_id, revision, found=False):
            # First the small files: the index says which shards init will read.
            folder = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, allow_patterns=list(SIDE_FILES)))
        check_snapshot_files(folder, weights=False)  # before the index is read, or any weights fetched
        if not weights:
            return folder
        commit = folder.name  # the snapshot folder is named by its commit: both steps read the same one
        patterns = _weight_patterns(folder, repo_id, commit, cache)
        with _hub_errors(spec, repo_id, revision, found=True):
            folder = Path(snapshot_download(repo_id, revision=commit, cache_dir=cache, allow_patterns=patterns, ignore_patterns=list(SUBFOLDER_PATTERNS)))
    check_snapshot_files(folder, weights=True)
    _check_weights(spec, folder, repo_id, revision, commit, cache, role)
    return folder


def is_snapshot_folder(folder: Path) -> bool:
    """A models--org--name/snapshots/<commit>/ folder of the Hugging Face cache."""
    resolved = folder.resolve()
    return resolved.is_dir() and resolved.parent.name == "snapshots" and (resolved.parent.parent / "blobs").is_dir()


def check_snapshot_files(folder: Path, *, weights: bool) -> None:
    """Every file of a snapshot that clpsurgery may read (what `allow_patterns` names) is the
    cache's own: the library's symlink into the repository's blobs/, or a plain file of the
    snapshot (where the file system has no symlinks, the library leaves the file there). A link
    anywhere else would be followed, and its target's bytes copied into the output."""
    patterns = allow_patterns(weights)
    for path in sorted(folder.iterdir()):
        if not path.is_symlink() or not any(fnmatch.fnmatchcase(path.name, p) for p in patterns):
            continue
        if not in_hub_cache_blobs(folder, path.name):
            repository = folder.resolve().parent.parent
            raise SurgeryError(
                path,
                f"points outside the Hugging Face cache (a link to {os.readlink(path)}, not into {repository.name}/blobs/); "
                f"clpsurgery reads a snapshot's files from there only: remove the link and fetch the repository again, or pass a folder of your own",
            )


def _index_shards(folder: Path) -> list[str] | None:
    """The shard names model.safetensors.index.json maps tensors to, or None without a usable index
    (a broken index is reported by the checkpoint reader, which names the flaw)."""
    try:
        weight_map = json.loads((folder / INDEX_NAME).read_text(encoding="utf-8")).get("weight_map")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(weight_map, dict) or not weight_map:
        return None
    shards = sorted({s for s in weight_map.values() if isinstance(s, str)})
    if not shards or any("/" in s or "\\" in s or not s.endswith(".safetensors") for s in shards):
        return None
    return shards


def _weight_patterns(folder: Path, repo_id: str, commit: str, cache: str | None) -> list[str]:
    """The weights init reads, as the checkpoint reader picks them: the index's shards, else
    model.safetensors, else the one top-level .safetensors."""
    shards = _index_shards(folder)
    if shards is not None:
        return shards
    listing = _cached_listing(repo_id, commit, cache)
    if listing is not None and SINGLE_NAME in listing:
        return [SINGLE_NAME]  # not also consolidated.safetensors and the like
    return list(WEIGHT_PATTERNS)


def _cached_listing(repo_id: str, commit: str, cache: str | None) -> set[str] | None:
    """The repository's files at `commit` as huggingface_hub cached them (versions that keep a tree
    cache, written by every online snapshot_download), without the network; None when unknown."""
    import huggingface_hub

    getter = getattr(huggingface_hub, "get_cached_repo_tree", None)
    if getter is None:
        return None
    try:
        return {f.path for f in getter(repo_id, revision=commit, cache_dir=cache)}
    except Exception:  # no tree cached for this commit (or an older cache): unknown
        return None


def _remote_listing(repo_id: str, commit: str) -> set[str] | None:
    """The repository's files from the Hub: only when online, only on the error path."""
    if _offline():
        return None
    try:
        from huggingface_hub import list_repo_files

        return set(list_repo_files(repo_id, revision=commit))
    except Exception:  # unreachable or refused: unknown
        return None


def _check_weights(spec: str, folder: Path, repo_id: str, revision: str | None, commit: str, cache: str | None, role: str) -> None:
    """What the checkpoint reader will need is here: every shard the index names, else some .safetensors."""
    shards = _index_shards(folder)
    if shards is not None:
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise SurgeryError(
                spec,
                f"is only partly in the local Hugging Face cache ({len(missing)} of {len(shards)} shards missing, "
                f"e.g. {missing[0]}) and was not fetched{' (HF_HUB_OFFLINE=1)' if _offline() else ''}; "
                f"fetch it with `{_download_command(repo_id, revision)}`",
            )
        return
    if any(p.is_file() for p in folder.glob("*.safetensors")):
        return
    names = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    listing = _cached_listing(repo_id, commit, cache)
    if listing is None:
        listing = _remote_listing(repo_id, commit)
    names |= listing or set()
    others = sorted(
        n for n in names
        if "/" not in n and not n.startswith(NOT_WEIGHTS) and any(fnmatch.fnmatchcase(n, p) for p in OTHER_WEIGHT_PATTERNS)
    )
    at = f" at revision {revision}" if revision else ""
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise SurgeryError(
            spec,
            f"the {role} repository{at} has no .safetensors weights, only {shown}, which clpsurgery does not read "
            f"(it never unpickles PyTorch .bin files); convert them to safetensors first (save_pretrained(..., safe_serialization=True))",
        )
    only_cache = listing is None and _offline()
    raise SurgeryError(
        spec,
        f"the {role} repository{at} has no .safetensors weights in its top folder"
        + (" (as far as the local cache shows: HF_HUB_OFFLINE=1)" if only_cache else ""),
    )


# --- progress bars and errors ----------------------------------------------------------------------


@contextlib.contextmanager
def _progress_bars(quiet: bool) -> Iterator[None]:
    """The library's progress bars, off for this call only when `quiet` (left as they were after)."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    if not quiet or are_progress_bars_disabled():
        yield
        return
    disable_progress_bars()
    try:
        yield
    finally:
        enable_progress_bars()


def _offline() -> bool:
    from huggingface_hub import constants

    is_offline = getattr(constants, "is_offline_mode", None)
    return bool(is_offline() if callable(is_offline) else getattr(constants, "HF_HUB_OFFLINE", False))


def _hub_tool() -> str:
    import huggingface_hub

    return "huggingface-cli" if huggingface_hub.__version__.startswith("0.") else "hf"  # 1.0 replaced huggingface-cli with hf


def _download_command(repo_id: str, revision: str | None) -> str:
    return f"{_hub_tool()} download {repo_id}" + (f" --revision {revision}" if revision else "")


def _login_command() -> str:
    return "huggingface-cli login" if _hub_tool() == "huggingface-cli" else "hf auth login"


def _hub_error_class(name: str) -> type[BaseException] | None:
    for module_name in ("huggingface_hub.errors", "huggingface_hub.utils"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        found = getattr(module, name, None)
        if isinstance(found, type) and issubclass(found, BaseException):
            return found
    return None


def _is(error: BaseException, name: str) -> bool:
    cls = _hub_error_class(name)
    return cls is not None and isinstance(error, cls)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _is_network_error(error: BaseException) -> bool:
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    return any(type(c).__module__.split(".")[0] in ("requests", "httpx", "httpx2", "httpcore", "urllib3") for c in (error, error.__cause__, error.__context__) if c is not None)


@contextlib.contextmanager
def _hub_errors(spec: str, repo_id: str, revision: str | None, found: bool) -> Iterator[None]:
    """huggingface_hub's exceptions as one SurgeryError line each, naming the id. `found`: the
    snapshot is known (its side files resolved), so a file missing from the cache makes it partial."""
    try:
        yield
    except SurgeryError:
        raise
    except Exception as e:
        mapped = _as_surgery_error(e, spec, repo_id, revision, found)
        if mapped is e:
            raise
        raise mapped from None


def _as_surgery_error(e: Exception, spec: str, repo_id: str, revision: str | None, found: bool = False) -> Exception:
    fetch = f"`{_download_command(repo_id, revision)}`"
    rev = f"revision {revision!r} of " if revision else ""
    if found and (_is(e, "LocalEntryNotFoundError") or _is(e, "OfflineModeIsEnabled")):
        offline = " (HF_HUB_OFFLINE=1)" if _offline() else " and the Hub was not reached"
        return SurgeryError(spec, f"{rev}{repo_id} is only partly in the local Hugging Face cache: some of its weights are missing{offline}; fetch it with {fetch}")
    if _is(e, "GatedRepoError"):
        return SurgeryError(spec, f"the Hub repository {repo_id} is gated: accept its conditions on its page, then log in (`{_login_command()}` or HF_TOKEN)")
    if _is(e, "RepositoryNotFoundError"):
        return SurgeryError(spec, f"no such file or folder, and no Hub model repository {repo_id} (or it is private: log in with `{_login_command()}` or set HF_TOKEN)")
    if _is(e, "RevisionNotFoundError"):
        return SurgeryError(spec, f"the Hub repository {repo_id} has no revision {revision or 'main'!r} (a branch, tag or commit hash)")
    if _is(e, "IncompleteSnapshotError"):
        offline = " (HF_HUB_OFFLINE=1)" if _offline() else " and the Hub was not reached"
        return SurgeryError(spec, f"{rev}{repo_id} is only partly in the local Hugging Face cache{offline}; fetch it with {fetch}")
    if _is(e, "LocalEntryNotFoundError") or _is(e, "OfflineModeIsEnabled"):
        if _offline():
            return SurgeryError(
                spec,
                f"no such file or folder, and {rev}Hub model {repo_id} is not in the local Hugging Face cache "
                f"while HF_HUB_OFFLINE=1; fetch it with {fetch}, or unset HF_HUB_OFFLINE",
            )
        cause = e.__cause__ or e.__context__
        why = f" ({type(cause).__name__})" if cause is not None else ""
        return SurgeryError(spec, f"no such file or folder, and {rev}Hub model {repo_id} is not in the local Hugging Face cache and the Hub cannot be reached{why}; check the connection, or fetch it with {fetch}")
    if _is(e, "EntryNotFoundError"):
        return SurgeryError(spec, f"a file of the Hub repository {repo_id} could not be found: {_first_line(e)}")
    if _is(e, "HfHubHTTPError"):
        status = getattr(getattr(e, "response", None), "status_code", None)
        return SurgeryError(spec, f"the Hub refused {repo_id}{f' (HTTP {status})' if status else ''}: {_first_line(e)}")
    if _is(e, "HFValidationError"):
        return SurgeryError(spec, NOT_AN_ID)  # the library's text names arguments the user never passed
    if _is_network_error(e):
        return SurgeryError(spec, f"cannot reach the Hub for {repo_id} ({type(e).__name__}: {_first_line(e)}); check the connection, or fetch it with {fetch}")
    if isinstance(e, OSError):
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        return SurgeryError(spec, f"fetching {repo_id} into the Hugging Face cache failed{where}: {e.strerror or _first_line(e)}")
    return e  # not the Hub's: a bug, shown as such
