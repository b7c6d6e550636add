"""Highlighting for `.ckmap` rule files: a Pygments lexer.

Registered through the `pygments.lexers` entry point, so anything that highlights with
Pygments (MkDocs, Sphinx, `rich`, `pygmentize`) colours ```` ```ckmap ```` blocks and
`*.ckmap` files once ckptmap is installed. The words it knows are the grammar's
(`grammar/ckptmap.lark`); a test keeps the two in step.
"""

from __future__ import annotations

from pygments.lexer import RegexLexer, bygroups, include
from pygments.token import (
    Comment,
    Keyword,
    Name,
    Number,
    Operator,
    Punctuation,
    String,
    Text,
    Whitespace,
)

# the statements' first words, and the words that join their parts
STATEMENTS = (
    "strip",
    "prefix",
    "rename",
    "skip",
    "transform",
    "merge",
    "split",
    "init",
    "freeze",
    "unfreeze",
    "include",
    "revision",
    "optional",
    "ckptmap",
)
# the statements whose strings are literal text (a prefix, a file, a revision id)
LITERAL = ("strip", "prefix", "include", "revision")
POLICY = "on"
JOINERS = ("from",)


class CkmapLexer(RegexLexer):
    """The ckptmap rule language (`.ckmap`)."""

    name = "ckptmap rules"
    aliases = ["ckmap", "ckptmap"]
    filenames = ["*.ckmap"]
    mimetypes = ["text/x-ckmap"]
    url = "https://github.com/ckptmap/ckptmap"

    tokens = {
        "root": [
            (r"[ \t\f]+", Whitespace),
            (r"\r?\n", Whitespace),
            (r"#.*$", Comment.Single),
            # `on mismatch skip`: a policy names a problem, then what to do
            (
                r"\b(on)(\s+)([A-Za-z_][\w-]*)(\s+)([A-Za-z_][\w-]*)",
                bygroups(Keyword, Whitespace, Name.Label, Whitespace, Name.Constant),
            ),
            # their strings are plain text: no captures, no wildcards
            (r"\b(" + "|".join(LITERAL) + r")\b", Keyword, "literal"),
            (r"\b(" + "|".join(STATEMENTS) + r")\b", Keyword),
            (r"\b(" + "|".join(JOINERS) + r")\b", Keyword),
            (r"->", Operator),
            (r"\|", Operator, "op"),
            include("values"),
            (r"[,\[\]()]", Punctuation),
            (r"[A-Za-z_][\w-]*", Name),
            (r".", Text),
        ],
        "values": [
            (r'"', String.Double, "string"),
            (r"/(?:[^/\\\n]|\\[^\n])+/", String.Regex),
            (r"-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?", Number),
        ],
        "string": [
            (r"\{\{|\}\}", String.Escape),
            (r"\{[^{}\"\n]*\}", String.Interpol),  # a capture: {i}, {name:int}
            (r"\*\*|\*", String.Symbol),  # glob wildcards
            (r"\\[^\n]", String.Escape),
            (r'[^"\\{}*\n]+', String.Double),
            (r"[{}]", String.Double),
            (r'"', String.Double, "#pop"),
            (r"\n", Whitespace, "#pop"),  # a string cut by the line's end: the parser says so
        ],
        "literal": [
            (r"[ \t\f]+", Whitespace),
            (r'"', String.Double, "plain"),
            (r"\b(" + "|".join(JOINERS) + r")\b", Keyword),
            (r",", Punctuation),
            (r"#.*$", Comment.Single),
            (r"\r?\n", Whitespace, "#pop"),
            (r".", Text),
        ],
        "plain": [
            (r"\\[^\n]", String.Escape),
            (r'[^"\\\n]+', String.Double),
            (r'"', String.Double, "#pop"),
            (r"\n", Whitespace, "#pop:2"),
        ],
        "op": [
            (r"[ \t\f]+", Whitespace),
            (
                r"([A-Za-z_][\w-]*)(\s*)(\()",
                bygroups(Name.Function, Whitespace, Punctuation),
                "args",
            ),
            (r"", Text, "#pop"),
        ],
        "args": [
            (r"[ \t\f]+", Whitespace),
            (r"\)", Punctuation, "#pop:2"),
            include("values"),
            (r"[,\[\]]", Punctuation),
            (r"[A-Za-z_][\w-]*", Name.Constant),
            (r"\n", Whitespace, "#pop:2"),
            (r".", Text),
        ],
    }
