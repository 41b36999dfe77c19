"""The `clpsurgery` command: init, extend, apply, inspect, verify and demo; score and refine.

Bad input ends with one line on stderr, `error: PLACE: PROBLEM`, and exit code 1; a wrong
option (a value no input could make right) the same line and exit code 2; `--debug` shows the
traceback instead.
"""

from __future__ import annotations

import functools
import json
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from clpsurgery.errors import OptionError, SurgeryError
from clpsurgery.pipeline.options import OptionSpec, TransferOptions

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class TopK(click.ParamType):
    """A positive integer, or `all` for the dense form over the whole overlap."""

    name = "K|all"

    def convert(self, value, param, ctx):  # type: ignore[override]
        if value is None or isinstance(value, int):
            return value
        if str(value).lower() == "all":
            return None
        try:
            k = int(value)
        except ValueError:
            self.fail(f"{value!r} is neither a positive integer nor 'all'", param, ctx)
        if k < 1:
            self.fail(f"{k} is not a positive integer", param, ctx)
        return k


class ByteSize(click.ParamType):
    """A size such as 512MiB, 2GiB or 1000000."""

    name = "SIZE"
    UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30, "k": 2**10, "m": 2**20, "g": 2**30}
    EXAMPLES = "256MiB or 2GiB"
    FLOOR, BELOW_FLOOR = 1 << 20, "is below 1 MiB"  # a memory budget under 1 MiB is a typo

    def convert(self, value, param, ctx):  # type: ignore[override]
        if isinstance(value, int):
            return value
        text = str(value).strip().lower().replace(" ", "")
        number = text.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = text[len(number):]
        try:
            size = int(float(number) * self.UNITS[unit])
        except (ValueError, KeyError):
            self.fail(f"{value!r} is not a size like {self.EXAMPLES}", param, ctx)
        if size < self.FLOOR:
            self.fail(f"{value!r} {self.BELOW_FLOOR}", param, ctx)
        return size


DEVICE_CHOICE = click.Choice(TransferOptions.specs()["device"].choices)


class MethodChoice(click.ParamType):
    """A registered method of initialisation (mixing/registry.py), looked up when the command
    line is read, so that a method registered after import is a choice too."""

    name = "method"

    def get_metavar(self, param, ctx=None):  # type: ignore[override]
        from clpsurgery.mixing.registry import method_names

        return "[" + "|".join(method_names()) + "]"

    def convert(self, value, param, ctx):  # type: ignore[override]
        from clpsurgery.mixing.registry import find_method, method_names

        if value is None or find_method(value) is not None:
            return value
        self.fail(f"{value!r} is not one of {', '.join(map(repr, method_names()))}.", param, ctx)


def common_options(command: Callable) -> Callable:
    """Options every command spells the same way."""

    @click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
    @click.option("--debug", is_flag=True, help="Show the traceback of an error.")
    @functools.wraps(command)
    def wrapper(*args, quiet: bool, debug: bool, **kwargs):
        return command(*args, quiet=quiet, **kwargs)

    return wrapper


def _click_type(spec: OptionSpec) -> click.ParamType | type:
    return {
        "text": click.STRING,
        "float": click.FLOAT,
        "top_k": TopK(),
        "size": ByteSize(),
        "positive_int": click.IntRange(min=1),
        "choice": click.Choice(spec.choices),
        "method": MethodChoice(),
    }[spec.kind]


def transfer_options(command: Callable) -> Callable:
    """Every TransferOptions field as a click option, collected into `options=TransferOptions(...)`,
    plus the source's side files: one definition for every command that plans a transfer."""
    names = TransferOptions.specs()
    defaults = TransferOptions()

    @click.option("--source-tokenizer", type=click.Path(), help="The source's tokenizer.json (default: beside SOURCE).")
    @click.option("--source-config", type=click.Path(), help="The source's config.json (default: beside SOURCE).")
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        options = TransferOptions(**{name: kwargs.pop(name) for name in names})
        return command(*args, options=options, **kwargs)

    for name, spec in reversed(names.items()):
        if spec.kind == "flag":
            wrapper = click.option(spec.flag, name, is_flag=True, default=False, help=spec.help)(wrapper)
            continue
        if spec.kind == "multiple":
            wrapper = click.option(spec.flag, name, multiple=True, help=spec.help)(wrapper)
            continue
        default = spec.shown_default or getattr(defaults, name)  # a shown default is parsed by the option's type
        wrapper = click.option(spec.flag, name, type=_click_type(spec), default=default, show_default=default is not None, help=spec.help)(wrapper)
    return wrapper


def progress_factory(quiet: bool) -> Callable[[str, int], object]:
    @contextmanager
    def progress(label: str, total: int) -> Iterator[Callable[[int], None]]:
        if quiet or total <= 0:
            yield lambda n: None
            return
        with click.progressbar(length=total, label=label, file=sys.stderr, show_eta=True) as bar:
            yield bar.update

    return progress


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="clpsurgery")
def cli() -> None:
    """CLP-Transfer as weight surgery on safetensors files."""


def _command_line() -> list[str]:
    return ["clpsurgery", *sys.argv[1:]]


def _echo_err(quiet: bool) -> Callable[[str], None]:
    return (lambda line: None) if quiet else (lambda line: click.echo(line, err=True))


def _report_written(out: Path, result) -> None:
    seconds = ", ".join(f"{k} {v:.1f}s" for k, v in result.stage_seconds.items())
    click.echo(f"wrote {out} ({seconds})")
    for note in result.notes:
        click.echo(f"note: {note}", err=True)


@cli.command("init")
@click.argument("source", type=click.Path())
@click.argument("helper", type=click.Path())
@click.argument("out", type=click.Path(path_type=Path))
@transfer_options
@click.option("--force", is_flag=True, help="Replace OUT if it is a previous clpsurgery output.")
@common_options
def init_command(source: str, helper: str, out: Path, options: TransferOptions, source_tokenizer, source_config, force, quiet) -> None:
    """Write OUT: SOURCE's weights with embeddings rebuilt for HELPER's tokenizer.

    SOURCE is a .safetensors file or a model folder; HELPER is a model folder that already speaks
    the target language with the target tokenizer. Either may be a Hub id, org/name[@revision]:
    only what init reads is fetched into the Hugging Face cache (HF_HUB_OFFLINE=1 reads the cache).
    """
    from clpsurgery.pipeline import commands

    result = commands.init(
        source, helper, out, options, source_tokenizer=source_tokenizer, source_config=source_config, force=force,
        progress=progress_factory(quiet), echo=_echo_err(quiet), command=_command_line(), show_downloads=not quiet,
    )
    _report_written(out, result)


@cli.command("extend")
@click.argument("source", type=click.Path())
@click.argument("helper", type=click.Path())
@click.argument("out", type=click.Path(path_type=Path))
@transfer_options
@click.option("--max-new-tokens", type=click.IntRange(min=0), default=None, help="Append only the N most useful target tokens (with the parts they are built from).")
@click.option("--rank-text", "rank_texts", type=click.Path(exists=True, dir_okay=False, path_type=Path), multiple=True, help="Target-language text: ranks tokens for --max-new-tokens by how much they shorten it, and the fertility before and after is reported.")
@click.option("--force", is_flag=True, help="Replace OUT if it is a previous clpsurgery output.")
@common_options
def extend_command(source: str, helper: str, out: Path, options: TransferOptions, max_new_tokens, rank_texts, source_tokenizer, source_config, force, quiet) -> None:
    """Write OUT: SOURCE with its whole vocabulary kept (every token keeps its id and its rows, byte
    for byte) and HELPER's tokens it lacks appended, their rows made as init makes them.

    The tokenizer is extended in its model (new BPE merges after the source's, new pieces, new
    WordPiece entries), not with added tokens.
    """
    from clpsurgery.pipeline import commands

    texts = [p.read_text(encoding="utf-8", errors="replace") for p in rank_texts]
    result = commands.extend(
        source, helper, out, options, max_new_tokens=max_new_tokens, rank_texts=texts or None, source_tokenizer=source_tokenizer,
        source_config=source_config, force=force, progress=progress_factory(quiet), echo=_echo_err(quiet), command=_command_line(), show_downloads=not quiet,
    )
    _report_written(out, result)
    if texts:
        from clpsurgery.vocab.extension import fertility
        from clpsurgery.vocab.vocabulary import tokenizer_path

        source_json = tokenizer_path(Path(json.loads((out / "clpsurgery.json").read_text(encoding="utf-8"))["inputs"]["source_tokenizer"]))
        if source_json.is_file():
            before, after = fertility(source_json.read_bytes(), texts), fertility((out / "tokenizer.json").read_bytes(), texts)
            click.echo(f"--rank-text: {before.per_word:.3f} -> {after.per_word:.3f} tokens per word, {before.per_byte:.4f} -> {after.per_byte:.4f} per byte")


@cli.command("apply")
@click.argument("transfer", type=click.Path(path_type=Path))
@click.argument("sibling", type=click.Path())
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--max-memory", type=ByteSize(), default="1GiB", show_default=True, help=TransferOptions.specs()["max_memory"].help)
@click.option("--device", type=DEVICE_CHOICE, default="auto", show_default=True, help=TransferOptions.specs()["device"].help)
@click.option("--source-tokenizer", type=click.Path(), help="The sibling's tokenizer.json (default: beside SIBLING).")
@click.option("--source-config", type=click.Path(), help="The sibling's config.json (default: beside SIBLING).")
@click.option("--force", is_flag=True, help="Replace OUT if it is a previous clpsurgery output.")
@common_options
def apply_command(transfer: Path, sibling: str, out: Path, max_memory: int, device: str, source_tokenizer, source_config, force, quiet) -> None:
    """Replay the transfer that wrote TRANSFER (an init output) on SIBLING: a checkpoint with the
    same vocabulary and shapes as that init's source (an instruct or fine-tuned sibling, a base
    with a merged LoRA). The same overlap rows are copied and the same new rows mixed with the
    same weights, with no helper and no search; on the source itself it reproduces init's output.
    """
    from clpsurgery.pipeline import commands

    result = commands.apply(
        transfer, sibling, out, max_memory=max_memory, device=device, source_tokenizer=source_tokenizer, source_config=source_config,
        force=force, progress=progress_factory(quiet), command=_command_line(), show_downloads=not quiet,
    )
    _report_written(out, result)


@cli.command("inspect")
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--against", "helper", type=click.Path(), help="A helper folder (or Hub id): print what init PATH HELPER would do with the same options, writing nothing.")
@transfer_options
@common_options
def inspect_command(path: Path, as_json: bool, helper, options: TransferOptions, source_tokenizer, source_config, quiet: bool) -> None:
    """What is in a checkpoint (headers only), and what init did to it; with --against HELPER,
    what init would do (overlap, special tokens, tensors, bytes, memory) before anything is written.
    The transfer options are init's and only apply with --against."""
    from clpsurgery.pipeline import commands
    from clpsurgery.pipeline.inspection import format_report, format_transfer_report

    if helper is not None:
        report = commands.inspect(path, helper, options, source_tokenizer=source_tokenizer, source_config=source_config, show_downloads=not quiet)
        click.echo(json.dumps(report, indent=2, ensure_ascii=False) if as_json else format_transfer_report(report))
        return
    report = commands.inspect(path, show_downloads=not quiet)
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))


@cli.command("verify")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--source", type=click.Path(), help="Also check unchanged tensors and overlap rows against this source checkpoint (a path or Hub id).")
@common_options
def verify_command(out: Path, source: str | None, quiet: bool) -> None:
    """Check an init output: file hashes, shapes, finite rows; with --source, the copies too.

    Prints one PASS/FAIL line per check; the exit code is 0 when every check passes, 1 otherwise.
    """
    from clpsurgery.pipeline import commands

    checks = commands.verify(out, source, progress=progress_factory(quiet), echo=lambda line: click.echo(line), show_downloads=not quiet)
    failed = [c for c in checks if c.ok is False]
    skipped = sum(1 for c in checks if c.ok is None)
    summary = f"{len(checks) - len(failed) - skipped} passed, {len(failed)} failed" + (f", {skipped} skipped" if skipped else "")
    click.echo(f"{'FAIL' if failed else 'PASS'}  {out}: {summary}")
    if failed:
        sys.exit(EXIT_FAILURE)


@cli.command("demo")
@click.argument("workdir", type=click.Path(path_type=Path), default=Path("clpsurgery-demo"))
@click.option("--force", is_flag=True, help="Replace a previous demo in WORKDIR.")
@common_options
def demo_command(workdir: Path, force: bool, quiet: bool) -> None:
    """Convert a small GPT-2-vocabulary model to a real German vocabulary, then inspect it."""
    from clpsurgery.pipeline.demo import run_demo
    from clpsurgery.pipeline.inspection import format_report, inspect_checkpoint

    out = run_demo(workdir, force=force, progress=progress_factory(quiet), echo=lambda s: click.echo(s, err=True))
    click.echo(format_report(inspect_checkpoint(out)))


class Interrupted(BaseException):
    """SIGINT or SIGTERM during a command. Not a KeyboardInterrupt, which click would catch to print
    an empty line first: the run unwinds (removing its partial output) and exits 130, one line."""


@contextmanager
def _signals_interrupt() -> Iterator[None]:
    """Ctrl-C and SIGTERM (kill, timeout, a job scheduler) both unwind the run and exit 130, until
    its output is complete: from then on the run only reports, and succeeds."""
    from clpsurgery.formats.output_folder import finished_outputs

    finished_before = len(finished_outputs())

    def interrupt(signum, frame) -> None:
        if len(finished_outputs()) == finished_before:
            raise Interrupted(signal.Signals(signum).name)

    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(sig) is not signal.SIG_IGN:  # an ignored SIGINT (nohup, &) stays ignored
                previous[sig] = signal.signal(sig, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _usage_line(e: click.UsageError) -> str:
    """click's usage error as the one line of every option error: `error: --flag: problem`, or
    the command where no one option is at fault."""
    param = getattr(e, "param", None)
    if isinstance(e, click.BadParameter) and not isinstance(e, click.MissingParameter) and param is not None:
        place = param.opts[0] if isinstance(param, click.Option) else param.human_readable_name
        return f"error: {place}: {' '.join(e.message.split())}"
    command = e.ctx.command_path if e.ctx is not None else "clpsurgery"
    return f"error: {command}: {' '.join(e.format_message().split())} (see '{command} --help')"


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the command, turning errors into one line and an exit code."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        with _signals_interrupt():
            cli.main(args=args, prog_name="clpsurgery", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.UsageError as e:
        if isinstance(e, getattr(click.exceptions, "NoArgsIsHelpError", ())):  # `clpsurgery` alone: the help (click 8.2+)
            e.show()
        else:
            click.echo(_usage_line(e), err=True)
        sys.exit(EXIT_USAGE)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except (click.Abort, KeyboardInterrupt, Interrupted):
        if debug:
            raise
        command = args[0] if args else ""
        after = "; the output was not written (its partial folder was removed)" if command in ("init", "extend", "apply", "demo", "refine") else ""
        click.echo(f"error: interrupted{after}", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except SurgeryError as e:
        if debug:
            raise
        click.echo(f"error: {e}", err=True)
        sys.exit(EXIT_USAGE if isinstance(e, OptionError) else EXIT_FAILURE)
    except OSError as e:
        if debug:
            raise
        where = e.filename if e.filename is not None else "system"
        click.echo(f"error: {where}: {e.strerror or e}", err=True)
        sys.exit(EXIT_FAILURE)
    except Exception as e:  # a bug: still one line, with the way to see more
        if debug:
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        click.echo(f"error: internal error ({type(e).__name__}: {message}); rerun with --debug for the traceback", err=True)
        sys.exit(EXIT_FAILURE)


# --- learning beside the surgery: score and refine (clpsurgery/learning/, the `refine` extra) ------


class TextBytes(ByteSize):
    """A number of bytes of text such as 200000, 500kB or 2MiB (no floor: a text may be short)."""

    name = "BYTES"
    EXAMPLES = "200000, 500kB or 2MiB"
    FLOOR, BELOW_FLOOR = 1, "is not a positive size"


@cli.command("score")
@click.argument("model", type=click.Path())
@click.option("--text", "text", type=click.Path(path_type=Path), required=True, help="The UTF-8 text to score, cut into segments at line breaks.")
@click.option("--against", type=click.Path(), help="A second model (the source), scored on the same segments through its own tokenizer; prints the gap.")
@click.option("--max-bytes", type=TextBytes(), default=None, help="Score only the first BYTES of the text (whole lines).")
@click.option("--device", type=DEVICE_CHOICE, default="auto", show_default=True, help="Where the model runs; auto takes the GPU where torch sees one.")
@click.option("--context", type=click.IntRange(min=2), default=1024, show_default=True, help="Tokens per window (at most the model's positions); a longer segment is scored in windows.")
@click.option("--batch", type=click.IntRange(min=1), default=4, show_default=True, help="Windows per forward pass.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@common_options
def score_command(model: str, text: Path, against: str | None, max_bytes: int | None, device: str, context: int, batch: int, as_json: bool, quiet: bool) -> None:
    """Bits per UTF-8 byte of the causal LM in MODEL on a text: comparable across tokenizers.

    For a clpsurgery output, also the loss on its new and its shared tokens and the probability it
    puts on new tokens. Needs the model library: pip install 'clpsurgery[refine]'.
    """
    from clpsurgery.learning.score import format_score
    from clpsurgery.learning.score import score_command as score

    from clpsurgery.formats.hub import resolve_model

    model_path = resolve_model(model, role="model", quiet=quiet)
    against_path = None if against is None else resolve_model(against, role="against", quiet=quiet)
    report = score(model_path, text, against_path, max_bytes, device, context, batch, progress=progress_factory(quiet))
    click.echo(json.dumps(report, indent=2) if as_json else format_score(report))


@cli.command("refine")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--text", "text", type=click.Path(path_type=Path), required=True, help="The UTF-8 text to learn from; its last tenth is held out and scored before and after.")
@click.option("--output", "destination", type=click.Path(path_type=Path), help="Write the refined output to this new folder.")
@click.option("--in-place", is_flag=True, help="Replace OUT with its refined self (through the same staging and rename).")
@click.option("--force", is_flag=True, help="Replace --output if it is a previous clpsurgery output.")
@click.option("--objective", type=click.Choice(["lm"]), default="lm", show_default=True, help="lm: next-token loss on the text.")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Optimiser steps (default 200).")
@click.option("--tokens", type=click.IntRange(min=1), default=None, help="Train on about this many tokens instead of --steps.")
@click.option("--minutes", type=click.FloatRange(min=0, min_open=True), default=None, help="Train for this long instead of --steps (not reproducible).")
@click.option("--batch", type=click.IntRange(min=1), default=8, show_default=True, help="Rows of --seq tokens per step.")
@click.option("--seq", type=click.IntRange(min=1), default=256, show_default=True, help="Tokens per row (at most the model's positions).")
@click.option("--lr", "learning_rate", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True, help="Peak learning rate (AdamW; warmup, then cosine to a tenth).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the order of the rows: on the CPU the same seed writes the same bytes.")
@click.option("--max-bytes", type=TextBytes(), default=None, help="Read only the first BYTES of the text (whole lines).")
@click.option("--max-memory", type=ByteSize(), default=None, help="Refuse to start when the estimate (weights, activations, trained rows) exceeds this (default: the machine's available memory).")
@click.option("--device", type=DEVICE_CHOICE, default="auto", show_default=True, help="Where training runs; auto takes the GPU where torch sees one.")
@common_options
def refine_command(out: Path, text: Path, destination: Path | None, in_place: bool, force: bool, objective: str, steps, tokens, minutes, batch: int, seq: int,
                   learning_rate: float, seed: int, max_bytes, max_memory, device: str, quiet: bool) -> None:
    """Train only the rows init or extend made in OUT (the input embedding's new rows, and an
    untied head's), every other parameter frozen and every other tensor byte for byte as it was.

    Writes --output DIR (or OUT itself with --in-place) atomically, as init does; its manifest
    records the refine and `verify` checks it. Needs the model library: pip install 'clpsurgery[refine]'.
    """
    from clpsurgery.learning.refine import RefineSettings, refine_output

    if sum(x is not None for x in (steps, tokens, minutes)) > 1:
        raise OptionError("refine", "give one of --steps, --tokens and --minutes")
    settings = RefineSettings(objective=objective, steps=steps, tokens=tokens, minutes=minutes, batch=batch, seq=seq, learning_rate=learning_rate,
                              seed=seed, device=device, max_memory=max_memory, max_bytes=max_bytes)
    echo = _echo_err(quiet)
    record = refine_output(out, text, destination, settings, in_place=in_place, force=force, command=["clpsurgery", *sys.argv[1:]],
                           progress=progress_factory(quiet), echo=echo)
    held = record["held_out"]
    click.echo(f"wrote {out if in_place else destination}: held-out {held['before']['bpb']:.4f} -> {held['after']['bpb']:.4f} bits/byte "
               f"after {record['steps']} steps ({record['tokens']} tokens, {record['seconds']:.1f}s)")
