"""Invariants, checked on generated inputs."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

import ckptmap
from ckptmap.plan import TensorMeta
from ckptmap.rules import (
    Freeze,
    Include,
    Init,
    Merge,
    OpCall,
    Pattern,
    Policy,
    Prefix,
    Rename,
    Revision,
    Ruleset,
    Skip,
    Split,
    Strip,
    Transform,
    Unfreeze,
)
from ckptmap.syntax import format_text, parse, parse_yaml

# --- parse(print(r)) == r ----------------------------------------------------------------------

text = st.text(
    alphabet=st.sampled_from(list('abcXYZ019._-*{}"\\/ #\t\n→é')), min_size=1, max_size=12
)
regex_text = text.filter(lambda s: "\n" not in s and "\r" not in s).map(
    lambda s: s + "x" if (len(s) - len(s.rstrip("\\"))) % 2 else s
)
patterns = st.one_of(text.map(Pattern), regex_text.map(lambda s: Pattern(s, True)))
words = st.from_regex(r"[A-Za-z_][A-Za-z0-9_-]{0,6}", fullmatch=True)
scalars = st.one_of(
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    words,
)
op_args = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3), max_leaves=6)
op_calls = st.builds(lambda n, a: OpCall(n, tuple(a)), words, st.lists(op_args, max_size=3))
op_chains = st.lists(op_calls, min_size=1, max_size=3).map(tuple)
fills = st.one_of(
    st.sampled_from([OpCall("zeros"), OpCall("ones")]),
    st.tuples(scalars, scalars, st.integers(0, 2**31)).map(lambda a: OpCall("normal", a)),
)
revision_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,12}", fullmatch=True)
statements = st.one_of(
    st.tuples(patterns, op_chains).map(lambda t: Transform(*t)),
    st.tuples(st.lists(patterns, min_size=1, max_size=3), text, op_chains).map(
        lambda t: Merge(tuple(t[0]), t[1], t[2])
    ),
    st.tuples(patterns, st.lists(text, min_size=1, max_size=3), op_chains).map(
        lambda t: Split(t[0], tuple(t[1]), t[2])
    ),
    text.map(Strip),
    text.map(Prefix),
    st.tuples(patterns, st.text(max_size=10)).map(lambda pt: Rename(*pt)),
    patterns.map(Skip),
    patterns.map(Init),
    st.tuples(patterns, fills).map(lambda t: Init(*t)),
    st.tuples(revision_ids, st.lists(revision_ids, max_size=2, unique=True))
    .filter(lambda t: t[0] not in t[1])
    .map(lambda t: Revision(t[0], tuple(t[1]))),
    patterns.map(Freeze),
    patterns.map(Unfreeze),
    st.sampled_from(
        [Policy("mismatch", "skip"), Policy("missing", "warn"), Policy("unexpected", "ignore")]
    ),
    text.map(Include),
)


def _maybe_optional(statement, optional: bool):
    if optional and statement.optionable:
        return type(statement)(**{**dict(statement), "optional": True})
    return statement


statements = st.one_of(
    st.tuples(statements, st.booleans()).map(lambda t: _maybe_optional(*t)),
    st.sampled_from([Policy("unused", a) for a in ("error", "warn", "ignore")]),
)
rulesets = st.lists(statements, max_size=8).map(lambda rules: Ruleset(tuple(rules)))


@given(rulesets)
def test_text_round_trip(ruleset):
    assert parse(ruleset.to_text()) == ruleset


@given(rulesets)
def test_yaml_round_trip(ruleset):
    assert parse_yaml(ruleset.to_yaml()) == ruleset
    assert parse_yaml(ruleset.to_json()) == ruleset


@given(rulesets)
def test_printing_is_canonical(ruleset):
    once = parse(ruleset.to_text()).to_text()
    assert parse(once).to_text() == once


# --- fmt keeps the meaning and is idempotent, whatever the layout -------------------------------

# comments may hold anything but a line break, including what str.splitlines breaks at
comment_text = st.text(
    alphabet=st.one_of(
        st.characters(blacklist_characters="\n"), st.sampled_from("\f\x85\u2028\r\t")
    ),
    max_size=12,
)
blank = st.sampled_from(["", " ", "\t", "\f", " \f ", "\r"])


@st.composite
def layouts(draw):
    """A ruleset written by a person: indents, blank lines, comments of every kind."""
    ruleset = draw(rulesets)
    lines = []
    if draw(st.booleans()):
        lines.append("ckptmap 1" + draw(st.sampled_from(["", "  # v1", "\t#\f"])))
    for statement in ruleset.rules:
        for _ in range(draw(st.integers(0, 2))):
            lines.append(
                draw(blank) + draw(st.sampled_from(["", "# "])) + draw(comment_text)
                if draw(st.booleans())
                else draw(blank)
            )
        trailing = draw(st.one_of(st.just(""), comment_text.map(lambda c: "  # " + c)))
        lines.append(draw(st.sampled_from(["", " ", "\t", "\f"])) + statement.to_text() + trailing)
    ending = draw(st.sampled_from(["\n", "", "\r\n"]))
    return draw(st.sampled_from(["\n", "\r\n"])).join(lines) + ending


@given(layouts())
@settings(max_examples=300)
def test_fmt_keeps_meaning_and_is_idempotent(source):
    try:
        before = parse(source)
    except ckptmap.CkptmapError:
        return  # a comment line without '#' is not rule text; fmt only takes what parses
    once = format_text(source)
    assert parse(once) == before, (source, once)
    assert format_text(once) == once, (source, once)


# --- the parser raises only CkptmapError ---------------------------------------------------------

rule_words = st.sampled_from(
    [
        "strip",
        "rename",
        "skip",
        "init",
        "freeze",
        "on",
        "missing",
        "->",
        '"a.b"',
        "/x(/",
        "{i}",
        "include",
        "ckptmap",
        "1",
        "\n",
        " ",
        '"',
        "/",
        "#",
        "\\",
    ]
)


@given(st.one_of(st.text(max_size=60), st.lists(rule_words, max_size=15).map(" ".join)))
@settings(max_examples=400)
def test_parser_raises_only_ckptmap_errors(source):
    try:
        parse(source)
    except ckptmap.CkptmapError as e:
        assert e.code.startswith("CKM1")
        e.render()


@given(st.text(max_size=80))
def test_yaml_front_end_raises_only_ckptmap_errors(source):
    try:
        parse_yaml(source)
    except ckptmap.CkptmapError as e:
        e.render()


# --- plans: every key accounted for, order never matters -------------------------------------

segments = st.sampled_from(
    [
        "module",
        "layer1",
        "layer2",
        "0",
        "1",
        "fc",
        "conv",
        "bn",
        "weight",
        "bias",
        "attn",
        "q",
        "num_batches_tracked",
    ]
)
keys = st.lists(segments, min_size=1, max_size=4).map(".".join)
key_sets = st.dictionaries(keys, st.lists(st.integers(1, 4), max_size=2).map(tuple), max_size=12)
glob_patterns = st.sampled_from(
    ["module", "fc", "layer{i}", "layer{i}.{j}", "**.bias", "*.weight", "**", "conv", "attn.q"]
)
plan_rules = st.lists(
    st.one_of(
        st.just('strip "module."'),
        st.just('prefix "m."'),
        glob_patterns.map(lambda p: f'skip "{p}"'),
        glob_patterns.map(lambda p: f'init "{p}"'),
        glob_patterns.map(lambda p: f'freeze "{p}"'),
        glob_patterns.map(lambda p: f'unfreeze "{p}"'),
        st.just('rename "layer{i}.{j}" -> "stages.{i}.{j}"'),
        st.just('rename /(.*)\\.weight/ -> "{1}.w"'),
        st.just('rename "conv" -> "fc"'),
        st.sampled_from(["on mismatch skip", "on missing warn", "on unexpected ignore"]),
    ),
    max_size=6,
).map("\n".join)


def _meta(d):
    return {k: TensorMeta(v) for k, v in d.items()}


@given(plan_rules, key_sets, st.one_of(st.none(), key_sets))
@settings(max_examples=300, deadline=None)
def test_every_key_accounted_for_exactly_once(rules, source, target):
    plan = ckptmap.compile(rules).plan(_meta(source), None if target is None else _meta(target))
    report = plan.report()
    assert report.accounts_for(source, target or ())
    assert sorted(e.source for e in plan.sources) == sorted(source)
    if target is not None:
        assert sorted(t.target for t in plan.targets) == sorted(target)


@given(plan_rules, key_sets, key_sets, st.randoms(use_true_random=False))
@settings(max_examples=200, deadline=None)
def test_plan_independent_of_input_order(rules, source, target, rnd: random.Random):
    program = ckptmap.compile(rules)
    first = program.plan(_meta(source), _meta(target))
    items, titems = list(source.items()), list(target.items())
    rnd.shuffle(items)
    rnd.shuffle(titems)
    second = program.plan(_meta(dict(items)), _meta(dict(titems)))
    assert first.fingerprint == second.fingerprint
    assert first.to_json() == second.to_json()


# --- the planner's shortcuts agree with the plain definition --------------------------------

rename_rules = st.lists(
    st.sampled_from(
        [
            'strip "module."',
            'strip "layer1."',
            'prefix "m."',
            'rename "layer{i}.{j}" -> "stages.{i}.{j}"',
            'rename "layer1" -> "first"',
            'rename "**.bias" -> "b"',
            'rename "fc" -> ""',
            'rename "*.weight" -> "{{w}}"',
            'rename /(.*)\\.weight/ -> "{1}.w"',
            'skip "**.num_batches_tracked"',
            'skip "layer2"',
            'skip "*.0"',
        ]
    ),
    max_size=6,
).map("\n".join)


@given(rename_rules, key_sets)
@settings(max_examples=300, deadline=None)
def test_bucketed_planning_equals_key_by_key_pipeline(rules, source):
    """Rules tried per bucket of keys equal but for digits give what running every rule on
    every key in order (the language's definition) gives."""
    from ckptmap.patterns import SKIP

    program = ckptmap.compile(rules)
    expected, skipped = {}, set()
    for key in source:
        name = key
        for rule in program.steps:
            out = rule.step(name)
            if out is SKIP:
                skipped.add(key)
                break
            if out is not None:
                name = out
        else:
            expected[key] = name
    plan = program.plan(_meta(source))
    got = {e.source: e.target for e in plan.sources if e.status != "skipped"}
    assert got == expected
    assert {e.source for e in plan.sources if e.reason == "skip"} == skipped


columnar_rules = st.lists(
    st.one_of(
        rename_rules,
        st.sampled_from(
            [
                'transform "**.weight" | transpose(0, 1)',
                'transform "fc.*" | pad(0, 0, 2)',
                'merge "attn.q", "attn.k" -> "attn.qk" | cat(0)',
                'merge "layer{i}.{j}.weight" -> "stacked.{i}" | stack(0)',
                'split "fc.weight" -> "fc.a", "fc.b" | split(2, 0)',
                'split "stacked.{i}" -> "layer{i}.{j}.w" | unstack(0)',
                'init "**.bias"',
                'rename "layer{i}" -> "x"',
            ]
        ),
    ),
    max_size=5,
).map("\n".join)


@given(columnar_rules, key_sets, st.one_of(st.none(), key_sets))
@settings(max_examples=300, deadline=None)
def test_planning_in_columns_equals_planning_key_by_key(rules, source, target):
    """The planner's columns (whole buckets renamed at once, records made on demand) give
    byte for byte the plan that running every rule node by node gives, problems and
    fingerprint included."""
    from ckptmap.io import describe
    from ckptmap.resolve import build_plan

    try:
        program = ckptmap.compile(rules)
    except ckptmap.CkptmapError:
        return
    src = describe(_meta(source), role="source")
    tgt = None if target is None else describe(_meta(target), role="target")
    fast = build_plan(program, src, tgt, program.policies)
    slow = build_plan(program, src, tgt, program.policies, columns=False)
    assert fast.fingerprint == slow.fingerprint
    assert fast.to_json() == slow.to_json()


json_values = st.recursive(
    st.none() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.tuples(inner, inner),
    max_leaves=8,
)


@given(st.lists(st.tuples(json_values, json_values, json_values), max_size=6))
@settings(max_examples=500, deadline=None)
def test_the_fingerprints_fast_encoding_gives_json_s_bytes(rows):
    """Rows of the planner's kinds (text of any characters, whole numbers of any size,
    None, lists) encode to the bytes json.dumps gives, whichever encoder does it."""
    import json

    from ckptmap.plan import _encoded

    assert _encoded(rows) == json.dumps(rows, separators=(",", ":"))[1:-1].encode()


# --- string patterns: the linear matcher agrees with the regex that defines them -------------

from ckptmap.patterns import Matcher, _glob_to_regex, _match_segments, _segments_of  # noqa: E402

seg_parts = st.sampled_from(["a", "b", "_", "ab", "{x}", "{y}", "{z}", "*", "{{", "}}"])
pattern_segments = st.one_of(
    st.just("**"), st.lists(seg_parts, min_size=1, max_size=4).map("".join)
)
string_patterns = st.lists(pattern_segments, min_size=1, max_size=4).map(".".join)
key_texts = st.lists(st.text(alphabet="ab_{}", max_size=5), min_size=1, max_size=5).map(".".join)


@given(string_patterns, key_texts)
@settings(max_examples=1500)
def test_segment_matcher_agrees_with_the_regex(pattern, key):
    try:
        source, _, _ = _glob_to_regex(pattern)
    except Exception:
        return  # a malformed pattern (a capture bound twice): refused at compile time
    import re

    m = re.compile(source).fullmatch("." + key)
    found = _match_segments(_segments_of(pattern), key)
    if m is None:
        assert found is None, (pattern, key, found)
        return
    assert found is not None, (pattern, key, m)
    spans, rest = found
    want = {n[2:]: (m.start(n) - 1, m.end(n) - 1) for n in m.re.groupindex if n != "_rest"}
    assert spans == want, (pattern, key)
    want_rest = None if m.start("_rest") < 0 else (m.start("_rest") - 1, m.end("_rest") - 1)
    assert rest == want_rest, (pattern, key)


def test_string_patterns_never_backtrack_without_bound():
    import time

    cases = [
        ("blk{i}_{j}", "blk" + "_" * 20000 + "."),
        ("{p}{q}{r}{s}x", "a" * 4000),
        ("**.**.**.x", ".".join(["a"] * 3000)),
        ("*a*a*a*b", "a" * 4000),
    ]
    for pattern, key in cases:
        matcher = Matcher(pattern)
        start = time.perf_counter()
        matcher.match(key)
        assert time.perf_counter() - start < 0.5, pattern
