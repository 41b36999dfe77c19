"""The README's option tables are generated from the click commands, so they cannot drift from --help.

`python tests/test_readme.py` rewrites the section between the two markers in README.md; the
tests below fail when the README holds anything else there, or when a default in it is not the
one `--help` prints.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import click
from click.testing import CliRunner

from clpsurgery.cli import cli

README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN = "<!-- options:begin -->"
END = "<!-- options:end -->"
COMMANDS = ("init", "extend", "apply", "inspect", "verify", "score", "refine", "demo")
TRANSFER_COMMANDS = ("init", "extend", "inspect")  # the commands that plan a transfer share its options


def _help_records(name: str) -> list[tuple[str, str, str]]:
    """Each option of a command as --help shows it: (flags and metavar, default, help with extras)."""
    command = cli.commands[name]
    parent = click.Context(cli, info_name="clpsurgery", **cli.context_settings)  # -h beside --help
    ctx = click.Context(command, info_name=name, parent=parent)
    records = []
    for param in command.get_params(ctx):
        if not isinstance(param, click.Option):
            continue
        flags, shown = param.get_help_record(ctx)
        default = _shown_default(param, ctx, shown)
        records.append((flags, default, " ".join(shown.split())))
    return records


def _shown_default(param: click.Option, ctx: click.Context, shown: str) -> str:
    if hasattr(param, "get_help_extra"):  # click >= 8.2
        return str(param.get_help_extra(ctx).get("default", ""))
    found = re.search(r"\[default: ([^;\]]*)", " ".join(shown.split()))
    return found.group(1) if found else ""


def _meaning(shown: str) -> str:
    """The help text without its default, which has a column of its own (a range stays)."""
    text = re.sub(r"\s*\[default: [^;\]]*\]$", "", shown)
    return re.sub(r"default: [^;\]]*; ", "", text)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _table(records: list[tuple[str, str, str]], commands: list[str] | None = None) -> list[str]:
    """A markdown table of options; with `commands`, a first column naming each row's command."""
    first = "| command " if commands else ""
    lines = [f"{first}| option | default | meaning |", f"{'| --- ' if commands else ''}| --- | --- | --- |"]
    for i, (flags, default, shown) in enumerate(records):
        command = f"| {commands[i]} " if commands else ""
        shown_default = f"`{_cell(default)}`" if default else ""
        lines.append(f"{command}| `{_cell(flags)}` | {shown_default} | {_cell(_meaning(shown))} |")
    return lines


def options_markdown() -> str:
    """The option tables: the transfer options once, then what each command adds to them."""
    records = {name: _help_records(name) for name in COMMANDS}
    common = [r for r in records["init"] if all(r in records[name] for name in COMMANDS)]
    shared = [r for r in records["init"] if r not in common and all(r in records[name] for name in TRANSFER_COMMANDS)]
    lines = [f"Transfer options, the same for {', '.join(f'`{n}`' for n in TRANSFER_COMMANDS)} (with `--against`):", ""]
    lines += _table(shared)
    rows, commands = [], []
    for name in COMMANDS:
        extras = [r for r in records[name] if r not in common and (name not in TRANSFER_COMMANDS or r not in shared)]
        rows += extras
        commands += [f"`{name}`"] * len(extras)
    rows += common
    commands += ["every command"] * len(common)
    lines += ["", "Each command's own options:", ""]
    lines += _table(rows, commands)
    return "\n".join(lines)


def _row_cells(line: str) -> list[str]:
    """A table row's cells (escaped pipes stay inside their cell)."""
    if not line.startswith("|"):
        return ["", "", ""]
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def _readme_section(text: str) -> str:
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[start:end].strip("\n")


def test_readme_option_tables_are_generated_from_the_commands():
    assert _readme_section(README.read_text(encoding="utf-8")) == options_markdown(), (
        "README.md's option tables differ from the click commands: run `python tests/test_readme.py`"
    )


def test_every_option_of_every_command_is_in_the_readme_with_the_default_help_prints():
    section = _readme_section(README.read_text(encoding="utf-8"))
    runner = CliRunner()
    for name in COMMANDS:
        result = runner.invoke(cli, [name, "--help"])
        assert result.exit_code == 0, result.output
        printed = " ".join(result.output.split())
        for flags, default, _ in _help_records(name):
            cells = [_row_cells(line) for line in section.splitlines()]
            row = next((c for c in cells if c[-3] == f"`{_cell(flags)}`" and (len(c) == 3 or c[0] in (f"`{name}`", "every command"))), None)
            if row is None:  # a transfer option: in the first table, without a command column
                row = next((c for c in cells if len(c) == 3 and c[0] == f"`{_cell(flags)}`"), None)
            assert row is not None, f"{name} {flags} is not in the README"
            if default:
                assert f"[default: {default}" in printed, f"{name} --help does not print {flags}'s default {default}"
                assert row[-2] == f"`{_cell(default)}`", f"{name} {flags}: the README's default is not {default}"


def test_the_readme_names_the_default_method_that_help_prints():
    printed = " ".join(CliRunner().invoke(cli, ["init", "--help"]).output.split())
    section = _readme_section(README.read_text(encoding="utf-8"))
    method_row = next(_row_cells(line) for line in section.splitlines() if line.startswith("| `--method"))
    default = method_row[1].strip("`")
    assert f"[default: {default}]" in printed


def main() -> None:
    """Rewrite the README's option tables from the commands."""
    text = README.read_text(encoding="utf-8")
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    README.write_text(text[:start] + "\n" + options_markdown() + "\n" + text[end:], encoding="utf-8")
    print(f"rewrote the option tables in {README}", file=sys.stderr)


if __name__ == "__main__":
    main()
