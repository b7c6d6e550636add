"""Editor and docs support for `.ckmap`: the Pygments lexer (registered as an entry point)
and the TextMate grammar with its VS Code language configuration under editors/."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VSCODE = ROOT / "editors" / "vscode"
RULE_FILES = sorted((ROOT / "rules").glob("*.ckmap"))


def _doc_blocks() -> list[str]:
    """Every ```ckmap block of the docs and the README."""
    blocks = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        blocks += re.findall(r"```ckmap\n(.*?)```", page.read_text(), re.S)
    return blocks


def _grammar_words() -> set[str]:
    """The words the grammar's statements are made of (quoted literals in the .lark)."""
    text = (ROOT / "grammar" / "ckptmap.lark").read_text()
    return {w for w in re.findall(r'"([a-z]+)"', text)}


SAMPLES = [path.read_text() for path in RULE_FILES] + _doc_blocks()


def test_the_lexer_is_found_by_name_and_by_file_name():
    from pygments.lexers import get_lexer_by_name, get_lexer_for_filename

    from ckptmap.highlight import CkmapLexer

    assert isinstance(get_lexer_by_name("ckmap"), CkmapLexer)
    assert isinstance(get_lexer_by_name("ckptmap"), CkmapLexer)
    assert isinstance(get_lexer_for_filename("rules/wrappers.ckmap"), CkmapLexer)


def test_the_lexer_knows_every_word_of_the_grammar():
    from ckptmap.highlight import JOINERS, POLICY, STATEMENTS

    assert {*STATEMENTS, POLICY, *JOINERS} == _grammar_words()


@pytest.mark.parametrize("text", SAMPLES, ids=lambda t: t.strip().splitlines()[0][:40])
def test_the_lexer_reads_every_shipped_rule_file_and_docs_example(text):
    from pygments.token import Comment, Error, Keyword, String

    from ckptmap.highlight import CkmapLexer

    tokens = list(CkmapLexer().get_tokens(text))
    assert not [t for t in tokens if t[0] in Error], "a token the lexer does not know"
    assert "".join(v for _, v in tokens) == (text if text.endswith("\n") else text + "\n")
    for line in text.splitlines():
        word = line.split(" ", 1)[0]
        if word in _grammar_words():  # each statement's first word is a keyword
            assert any(t in Keyword and v == word for t, v in tokens)
        if "#" in line and '"' not in line:
            assert any(t in Comment for t, _ in tokens)
        if '"' in line:
            assert any(t in String for t, _ in tokens)


def test_the_lexer_marks_captures_wildcards_regexes_ops_and_policies():
    from pygments.token import Keyword, Name, Number, Operator, String

    from ckptmap.highlight import CkmapLexer

    text = (
        'rename "h.{i}.attn.*" -> "blocks.{i}.{{x}}"\n'
        'rename /(.*)\\.w/ -> "{1}"\n'
        'transform "**.weight" | pad(0, 0, 2) | cast(bfloat16)\n'
        "on mismatch skip\n"
    )
    tokens = [(t, v) for t, v in CkmapLexer().get_tokens(text) if v.strip()]
    assert (String.Interpol, "{i}") in tokens
    assert (String.Symbol, "*") in tokens and (String.Symbol, "**") in tokens
    assert (String.Escape, "{{") in tokens
    assert (String.Regex, "/(.*)\\.w/") in tokens
    assert (Operator, "->") in tokens and (Operator, "|") in tokens
    assert (Name.Function, "pad") in tokens and (Name.Function, "cast") in tokens
    assert (Number, "2") in tokens and (Name.Constant, "bfloat16") in tokens
    assert [(Keyword, "on"), (Name.Label, "mismatch"), (Name.Constant, "skip")] == tokens[-3:]


def test_rich_highlights_ckmap_blocks():
    from rich.console import Console
    from rich.syntax import Syntax

    console = Console(record=True, color_system="truecolor", width=100)
    console.print(Syntax('rename "a.{i}" -> "b.{i}"  # moved', "ckmap"))
    html = console.export_html(inline_styles=True)
    colours = set(re.findall(r"color: (#[0-9a-f]{6})", html))
    assert len(colours) >= 3  # keyword, string, capture, comment: not one plain colour


# --- the TextMate grammar and VS Code language configuration -----------------------------


def _textmate():
    return json.loads((VSCODE / "syntaxes" / "ckmap.tmLanguage.json").read_text())


def test_the_vscode_extension_names_files_that_exist():
    package = json.loads((VSCODE / "package.json").read_text())
    (language,) = package["contributes"]["languages"]
    (grammar,) = package["contributes"]["grammars"]
    assert language["extensions"] == [".ckmap"] and grammar["language"] == language["id"]
    assert grammar["scopeName"] == _textmate()["scopeName"]
    config = json.loads((VSCODE / language["configuration"]).read_text())
    assert config["comments"]["lineComment"] == "#"
    assert (VSCODE / grammar["path"]).is_file()


def _patterns(node):
    """Every (name, regex) in a TextMate grammar node, nested patterns included."""
    for key in ("match", "begin", "end"):
        if key in node:
            yield node.get("name", key), node[key]
    for child in node.get("patterns", []):
        yield from _patterns(child)


def test_the_textmate_grammar_compiles_and_knows_every_word():
    grammar = _textmate()
    for node in grammar["repository"].values():
        for _, regex in _patterns(node):
            re.compile(regex)  # the constructs used are common to Oniguruma and Python
    words = re.search(r"\\b\((.*?)\)\\b", grammar["repository"]["keyword"]["match"]).group(1)
    policy = grammar["repository"]["policy"]["match"]
    assert {*words.split("|"), re.search(r"\((\w+)\)", policy).group(1)} == _grammar_words()


def _scopes(line: str) -> list[tuple[str, str]]:
    """A line scoped as a TextMate engine does with this grammar: leftmost match first, the
    first pattern on a tie; a begin/end pair with patterns of its own scans inside it, one
    without is a single span."""
    grammar = _textmate()

    def rules_of(patterns: list) -> list:
        return [grammar["repository"][p["include"][1:]] if "include" in p else p for p in patterns]

    def scan(at: int, rules: list, end: re.Pattern | None) -> tuple[list, int]:
        out = []
        while at < len(line):
            close = end.search(line, at) if end else None
            best = None
            for rule in rules:
                m = re.compile(rule.get("match") or rule["begin"]).search(line, at)
                if m and (best is None or m.start() < best[1].start()):
                    best = (rule, m)
            if close and (best is None or close.start() <= best[1].start()):
                return out, close.end()
            if best is None:
                break
            rule, m = best
            if "begin" in rule and "beginCaptures" in rule:
                caps = rule["beginCaptures"]
                out += [(caps[k]["name"], m.group(int(k))) for k in caps]
                inner, at = scan(m.end(), rules_of(rule["patterns"]), re.compile(rule["end"]))
                out += inner
                continue
            stop = m.end()
            if "begin" in rule:
                closing = re.compile(rule["end"]).search(line, stop)
                stop = closing.end() if closing else len(line)
            if "captures" in rule:
                out += [
                    (rule["captures"][str(k)]["name"], m.group(k))
                    for k in range(1, m.re.groups + 1)
                    if str(k) in rule["captures"]
                ]
            else:
                out.append((rule["name"], line[m.start() : stop]))
            at = max(stop, at + 1)
        return out, len(line)

    return scan(0, rules_of(grammar["patterns"]), None)[0]


@pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: p.name)
def test_the_textmate_grammar_scopes_every_shipped_rule_file(path):
    for line in path.read_text().splitlines():
        scopes = _scopes(line)
        word = line.split(" ", 1)[0]
        if word in _grammar_words() - {"on"}:
            assert scopes[0] == ("keyword.control.statement.ckmap", word), line
        if line.lstrip().startswith("#"):
            assert scopes == [("comment.line.number-sign.ckmap", line.lstrip())]
            continue
        for quoted in re.findall(r'"(?:[^"\\]|\\.)*"', line.split(" #")[0]):
            assert ("string.quoted.double.ckmap", quoted) in scopes, line


def test_the_textmate_grammar_scopes_ops_policies_and_regexes():
    assert _scopes("on mismatch skip") == [
        ("keyword.control.policy.ckmap", "on"),
        ("entity.name.tag.problem.ckmap", "mismatch"),
        ("constant.language.action.ckmap", "skip"),
    ]
    scopes = _scopes("transform /a\\.(\\d+)/ | transpose(0, 1)  # swap")
    assert ("string.regexp.ckmap", "/a\\.(\\d+)/") in scopes
    assert ("entity.name.function.op.ckmap", "transpose") in scopes
    assert ("constant.numeric.ckmap", "1") in scopes
    assert scopes[-1] == ("comment.line.number-sign.ckmap", "# swap")
    # strip, prefix, include and revision take plain text: no capture, no wildcard inside
    assert _scopes('strip "a.{x}*"  # c') == [
        ("keyword.control.statement.ckmap", "strip"),
        ("string.quoted.double.ckmap", '"a.{x}*"'),
        ("comment.line.number-sign.ckmap", "# c"),
    ]
    assert ("keyword.control.statement.ckmap", "from") in _scopes('revision "2" from "1", "1b"')


def test_the_lexer_reads_literal_strings_as_plain_text():
    from pygments.token import Keyword, String

    from ckptmap.highlight import CkmapLexer

    tokens = [(t, v) for t, v in CkmapLexer().get_tokens('strip "a.{x}*"\n') if v.strip()]
    assert tokens == [(Keyword, "strip"), *[(String.Double, v) for v in ('"', "a.{x}*", '"')]]
    revision = list(CkmapLexer().get_tokens('revision "2" from "1", "1b"\n'))
    assert (Keyword, "from") in revision


# --- the docs as a site ----------------------------------------------------------------------


def test_the_site_lists_every_docs_page():
    import yaml

    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    listed = {next(iter(item.values())) for item in config["nav"]}
    assert listed == {p.name for p in (ROOT / "docs").glob("*.md")}


@pytest.mark.slow
def test_the_site_builds_strictly_with_ckmap_highlighted(tmp_path):
    import subprocess
    import sys

    subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=300,
    )
    page = (tmp_path / "language" / "index.html").read_text()
    assert re.search(r'<span class="k">rename</span>', page)
    assert (tmp_path / "images" / "plan-page.png").is_file()


@pytest.mark.slow
def test_the_pre_commit_hooks_run_the_commands_they_name(tmp_path):
    """Each hook's entry, as pre-commit runs it (the entry, its args, the matching files)."""
    import subprocess
    import sys

    import yaml

    hooks = {h["id"]: h for h in yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text())}
    assert set(hooks) == {"ckptmap-check", "ckptmap-fmt"}
    good, messy = tmp_path / "good.ckmap", tmp_path / "messy.ckmap"
    good.write_text('ckptmap 1\n\nstrip "module."\n')
    messy.write_text('strip    "module."\n')
    bad = tmp_path / "bad.ckmap"
    bad.write_text('rename "a" "b"\n')
    cli = str(Path(sys.executable).with_name("ckptmap"))
    for hook in hooks.values():
        assert hook["language"] == "python" and re.search(hook["files"], "rules/x.ckmap")
        assert not re.search(hook["files"], "model.safetensors")

    def run(hook: str, *files: Path) -> subprocess.CompletedProcess:
        entry = hooks[hook]["entry"].split()
        return subprocess.run([cli, *entry[1:], *map(str, files)], capture_output=True, text=True)

    assert run("ckptmap-check", good, messy).returncode == 0
    failed = run("ckptmap-check", good, bad)
    assert failed.returncode == 2 and "bad.ckmap:1:" in failed.stderr + failed.stdout
    assert run("ckptmap-fmt", messy).returncode == 0
    assert messy.read_text() == 'ckptmap 1\n\nstrip "module."\n'  # rewritten: pre-commit sees it


@pytest.mark.slow
def test_everything_that_never_touches_a_tensor_runs_without_torch():
    """tests/without_torch.py with torch made unimportable (.ci/run also runs it where
    torch is not installed at all)."""
    import subprocess
    import sys

    run = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "without_torch.py"), "--block"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
