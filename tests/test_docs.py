"""The documentation: README.md's shape, every relative link and its anchor, no dated measurements outside
benchmarks/, and every fcmae command in a bash block parsed by the command's own parser (nothing is run)."""

from __future__ import annotations

import argparse
import re
import runpy
import shlex
import sys
import tomllib
from dataclasses import dataclass
from importlib import import_module
from importlib.util import find_spec
from pathlib import Path

import pytest

from fcmae.config import FinetuneConfig, PretrainConfig, parse_config
from fcmae.config.command_line import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = [README, ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 250
FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", flags=re.S | re.M)
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^()\s]+)\)")
INLINE_CODE = re.compile(r"`[^`\n]*`")
DATE = re.compile(r"\b20\d\d-[01]\d-[0-3]\d\b")
SCRIPTS = {"pretrain.py": PretrainConfig, "finetune.py": FinetuneConfig}
DEMOS = {"pretrain.py": ROOT / "configs" / "demo.yaml", "finetune.py": ROOT / "configs" / "finetune" / "demo.yaml"}


def prose(text: str) -> str:
    """The text outside fenced code blocks, each block replaced by as many empty lines (line numbers kept)."""
    return FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation other than `-` and `_` dropped, spaces as `-`."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # a link in a heading: its text
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a markdown file's headings, duplicates numbered as GitHub numbers them (`name-1`, ...)."""
    found: set[str] = set()
    for line in prose(path.read_text()).splitlines():
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            anchor = base = github_anchor(match.group(1))
            n = 0
            while anchor in found:
                n += 1
                anchor = f"{base}-{n}"
            found.add(anchor)
    return found


def relative_links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link in `path` that points into the repository, not to a URL."""
    links = []
    for number, line in enumerate(prose(path.read_text()).splitlines(), 1):
        for target in LINK.findall(INLINE_CODE.sub("", line)):
            if not re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                links.append((number, target))
    return links


def test_the_docs_exist():
    assert (ROOT / "docs").is_dir() and len(DOCS) > 3, DOCS
    for path in DOCS:
        assert path.is_file(), path


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(path: Path):
    broken = []
    for number, target in relative_links(path):
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        if not resolved.exists():
            broken.append(f"{path.name}:{number}: {target} (no file {resolved.relative_to(ROOT)})")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{path.name}:{number}: {target} (no heading #{anchor} in {resolved.relative_to(ROOT)})")
    assert not broken, "\n".join(broken)


def test_the_link_checker_finds_a_broken_link_and_a_missing_anchor(tmp_path: Path):
    (tmp_path / "a.md").write_text("# Top\n\n## Speed on GPUs: `--compile`\n\n[x](b.md) [y](#speed-on-gpus---compile)"
                                   " [z](#nowhere) `[not a link](c.md)`\n\n```\n[code](d.md)\n```\n")
    assert anchors(tmp_path / "a.md") == {"top", "speed-on-gpus---compile"}
    assert relative_links(tmp_path / "a.md") == [(5, "b.md"), (5, "#speed-on-gpus---compile"), (5, "#nowhere")]


def test_readme_is_short_and_starts_with_the_quickstart():
    text = README.read_text()
    assert len(text.splitlines()) <= README_MAX_LINES, f"README.md has {len(text.splitlines())} lines"
    sections = re.findall(r"^## (.+)$", prose(text), flags=re.M)
    assert sections and sections[0] == "Quickstart", sections
    quickstart = text.split("\n## Quickstart\n", 1)[1].split("\n## ", 1)[0]
    assert quickstart.count("```bash") == 2
    for doc in (ROOT / "docs").glob("*.md"):  # every page of docs/ is reachable from the README
        assert f"docs/{doc.name}" in text, f"README.md does not link docs/{doc.name}"


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_dated_measurements_outside_benchmarks(path: Path):
    """Dated measurements ("passed on ...", "measured on ...") belong in benchmarks/README.md; a date inside
    inline code (an example error message) or a link's target (a heading of benchmarks/README.md) is not one."""
    dated = [f"{path.name}:{n}: {line.strip()}" for n, line in enumerate(prose(path.read_text()).splitlines(), 1)
             if DATE.search(re.sub(r"\]\([^)]*\)", "]", INLINE_CODE.sub("", line)))]
    assert not dated, "\n".join(dated)


# Commands -----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """One fcmae command of a bash block: what runs it (a script, `-m module` or an entry point) and its args."""

    where: str  # file:line
    kind: str  # "script", "module" or "entry"
    name: str  # pretrain.py, fcmae.visualize, fcmae-convert
    args: tuple[str, ...]
    complete: bool  # no `...` elided and no shell variables: the values can be checked too


class Parsed(BaseException):
    """Raised by the patched parser once it has parsed: the command stops before doing anything."""

    def __init__(self, unknown: list[str]):
        self.unknown = unknown


def bash_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, command line) for each command of the bash blocks of `path`, continuation lines joined."""
    out = []
    text = path.read_text()
    for block in re.finditer(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        first = text[: block.start(1)].count("\n") + 1
        pending, start = "", None
        for offset, line in enumerate(block.group(1).splitlines()):
            start = first + offset if start is None else start
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            if (pending + line).strip():
                out.append((start, pending + line))
            pending, start = "", None
    return out


def commands_in(tokens: list[str], where: str, entries: dict[str, str]) -> list[Command]:
    """The fcmae commands in one shell line's tokens: `&&`, `;` and `|` separate commands, and a quoted
    command string (`bash -c '...'`) is searched too."""
    found: list[Command] = []
    segment: list[str] = []
    for token in [*tokens, ";"]:
        if token not in ("&&", "||", ";", "|"):
            segment.append(token)
            continue
        for i, word in enumerate(segment):
            if " " in word:
                found += commands_in(shlex.split(word, comments=True), where, entries)
                break
            rest = segment[i + 1:]
            if Path(word).name in SCRIPTS and not word.startswith("-"):
                found.append(_command(where, "script", Path(word).name, rest))
            elif word == "-m" and rest and rest[0].split(".")[0] == "fcmae":
                found.append(_command(where, "module", rest[0], rest[1:]))
            elif word in entries:
                found.append(_command(where, "entry", word, rest))
            else:
                continue
            break
        segment = []
    return found


def _command(where: str, kind: str, name: str, rest: list[str]) -> Command:
    args = tuple(a for a in rest if a != "...")
    complete = len(args) == len(rest) and not any("$" in a for a in args)
    return Command(where, kind, name, args, complete)


def documented_commands() -> tuple[list[Command], list[str]]:
    """Every fcmae command in the bash blocks of the README and docs/, and the lines skipped for placeholders
    (`<NAME>`, `[--optional flags]`): those are not commands as written."""
    entries = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    commands, skipped = [], []
    for path in DOCS:
        for number, line in bash_lines(path):
            where = f"{path.relative_to(ROOT)}:{number}"
            try:
                tokens = shlex.split(line, comments=True)
            except ValueError:  # a quote left open in a shell line of another tool
                skipped.append(where)
                continue
            if any(re.search(r"<[A-Za-z_]+>|^\[|^[^[]*\]$", t) for t in tokens):  # <NAME>, [--flag X]; not .[demo]
                skipped.append(where)
                continue
            commands += commands_in(tokens, where, entries)
    return commands, skipped


COMMANDS, SKIPPED = documented_commands()


def test_the_commands_are_found():
    """The extraction finds each kind of command, so the parametrized check below cannot pass by finding none."""
    names = {c.name for c in COMMANDS}
    assert {"pretrain.py", "finetune.py", "fcmae.convert", "fcmae-convert", "fcmae.visualize", "fcmae-stats",
            "fcmae-shards"} <= names, names
    assert len(COMMANDS) >= 30 and sum(c.complete for c in COMMANDS) >= 20, (len(COMMANDS), SKIPPED)
    assert not SKIPPED, f"commands with placeholders, which a reader cannot run as written: {SKIPPED}"


def check_command(command: Command, monkeypatch: pytest.MonkeyPatch) -> None:
    """Parse `command` with its own parser; raise on an unknown flag, a missing argument or (for a complete
    pretrain.py / finetune.py line) a bad value. Nothing is run."""
    monkeypatch.chdir(ROOT)
    if command.kind == "script":
        cls = SCRIPTS[command.name]
        needs_minkowski = any(a.startswith("minkowski") for a in command.args)
        if command.complete and not (needs_minkowski and find_spec("MinkowskiEngine") is None):
            # the values too: the config file, sizes, schedules, timm strings (a backend that is not installed
            # fails validation, so such a line gets its flags checked only)
            parse_config(cls, list(command.args), demo=DEMOS[command.name])
            return
        _, unknown = build_parser(cls).parse_known_args(list(command.args))
        assert not unknown, f"unknown flags {unknown}"
        return
    original = argparse.ArgumentParser.parse_known_args

    def parse_and_stop(self, args=None, namespace=None):
        _, unknown = original(self, args, namespace)
        raise Parsed(unknown)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", parse_and_stop)
    try:
        if command.kind == "module":
            monkeypatch.setattr(sys, "argv", [command.name, *command.args])
            runpy.run_module(command.name, run_name="__main__", alter_sys=True)
        else:
            module, _, function = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"][
                command.name].partition(":")
            getattr(import_module(module), function)(list(command.args))
    except Parsed as parsed:
        assert not parsed.unknown, f"unknown arguments {parsed.unknown}"
    except SystemExit as exit:  # argparse's own error (plain ArgumentParser), or a script that ran to its end
        assert exit.code in (0, None), f"exit status {exit.code}"
    else:
        assert not command.args, "the command took arguments but parsed none"


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: f"{c.where}:{c.name}")
def test_documented_command_parses(command: Command, monkeypatch: pytest.MonkeyPatch, capsys):
    check_command(command, monkeypatch)


@pytest.mark.parametrize("line, error", [
    ("python pretrain.py --config configs/demo.yaml --mask-ration 0.5", "did you mean --mask-ratio"),
    ("python pretrain.py --config configs/demo.yaml --model convnextv2_gigantic", "convnextv2_gigantic"),
    ("accelerate launch finetune.py --data-path x --layer-decy 0.7 ...", "--layer-decy"),
    ("python -m fcmae.convert a.safetensors b.safetensors --to timm --conv-mpl", "--conv-mpl"),
    ("fcmae-stats /data --samples 10 --channels 4", "--channels"),
    ("python -m fcmae.visualize --images x --out grid.png", "--checkpoint"),
])
def test_a_bad_command_fails_the_check(line: str, error: str, monkeypatch: pytest.MonkeyPatch, capsys):
    entries = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    (command,) = commands_in(shlex.split(line), "example", entries)
    with pytest.raises((AssertionError, ValueError)) as raised:
        check_command(command, monkeypatch)
    assert error in str(raised.value) + capsys.readouterr().err
