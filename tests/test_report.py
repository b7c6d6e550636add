"""Report and plan rendering, pinned by golden files (UPDATE_GOLDEN=1 rewrites them)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from models import ResNet, wrapped

import ckptmap
from ckptmap.report import collapse_keys, format_numbers

RULES = """\
strip "module."
strip "_orig_mod."
skip "**.num_batches_tracked"
init "fc"
freeze "**"
unfreeze "layer4"
"""


@pytest.fixture
def plan():
    source = {k: tuple(v.shape) for k, v in wrapped(ResNet(1000)).items()}
    return ckptmap.compile(RULES).plan(source, ResNet(5), on_missing="warn")


def test_report_summary(plan, golden):
    golden("report_resnet.txt", str(plan.report()) + "\n")


def test_report_json(plan):
    report = plan.report()
    again = ckptmap.Report.model_validate_json(report.model_dump_json())
    assert again == report
    assert report.skipped[0].rules[-1].line == 3


def test_plan_text(golden):
    source = {
        "module.conv.weight": (8, 3, 3, 3),
        "module.bn.num_batches_tracked": (),
        "module.fc.weight": (1000, 8),
        "module.old.bias": (8,),
    }
    target = {"conv.weight": (8, 3, 3, 3), "fc.weight": (5, 8), "new.weight": (8,)}
    plan = ckptmap.compile(RULES).plan(source, target, on_missing="warn", on_unexpected="warn")
    golden("plan_small.txt", str(plan) + "\n")


def test_plan_error_message(golden):
    source = {"module.fc.weight": (1000, 64), "module.fc.bias": (1000,)}
    target = {f"layers.{i}.w": (2,) for i in range(12)} | {"fc.weight": (5, 64), "fc.bias": (5,)}
    plan = ckptmap.compile('strip "module."').plan(source, target)
    with pytest.raises(ckptmap.PlanError) as info:
        plan.check()
    golden("plan_error.txt", info.value.render() + "\n")


@pytest.mark.parametrize(
    "keys, expected",
    [
        ([f"layers.{i}.attn.q.weight" for i in range(12)], [("layers.{0..11}.attn.q.weight", 12)]),
        (
            [f"layers.{i}.experts.{j}.w1" for i in range(4) for j in range(8)],
            [("layers.{0..3}.experts.{0..7}.w1", 32)],
        ),
        (["layer1.0.w", "layer2.0.w", "layer4.0.w"], [("layer{1,2,4}.0.w", 3)]),
        (["a.0", "a.1", "b"], [("a.{0,1}", 2), ("b", 1)]),
        (["h.01.w", "h.02.w"], [("h.01.w", 1), ("h.02.w", 1)]),  # zero-padded: not numbers
    ],
)
def test_collapse_keys(keys, expected):
    assert collapse_keys(keys) == expected


def test_format_numbers():
    assert format_numbers([3]) == "3"
    assert format_numbers([0, 1, 2, 3, 7, 9, 10, 11]) == "{0..3,7,9..11}"


def _expand(pattern: str) -> set[str]:
    """Every key a collapsed line stands for ({0..2,5} ranges, position by position)."""
    import itertools
    import re

    pieces = re.split(r"\{([^}]*)\}", pattern)
    choices = []
    for i, piece in enumerate(pieces):
        if i % 2 == 0:
            choices.append([piece])
            continue
        numbers = []
        for run in piece.split(","):
            a, _, b = run.partition("..")
            numbers += range(int(a), int(b or a) + 1)
        choices.append([str(n) for n in numbers])
    return {"".join(c) for c in itertools.product(*choices)}


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 3), st.integers(0, 4), st.sampled_from(["up", "gate", "bias"])),
        min_size=1,
        max_size=40,
        unique=True,
    )
)
def test_collapsed_lines_stand_for_exactly_the_keys(triples):
    keys = [f"layers.{a}.experts.{b}.{c}" for a, b, c in triples]
    lines = collapse_keys(keys)
    assert sum(n for _, n in lines) == len(keys)
    for key in keys:  # each key on exactly one line (numbers that move together read as one)
        assert sum(key in _expand(line) for line, _ in lines) == 1, (key, lines)
    for line, n in lines:
        assert n <= len(_expand(line))


numbered_segments = st.sampled_from(
    [
        *("a", "b1", "layers", "experts", "w2", "x9y", "conv1x1", "h#", "é1", "٣", "1٣", ""),
        *("0", "1", "9", "10", "01", "007", "00", "99999999999999999999"),
    ]
)


@settings(max_examples=500, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.lists(numbered_segments, min_size=1, max_size=4).map(".".join),
            st.tuples(st.integers(0, 120), st.integers(0, 12)).map(
                lambda t: f"layers.{t[0]}.experts.{t[1]}.w1 -> blocks.{t[0]}.moe.{t[1]}"
            ),
        ),
        max_size=40,
    )
)
def test_reading_numbers_by_template_equals_reading_each_key(keys):
    """The folding's shortcut (keys that share a digit template read together) reads every
    key as reading it alone does: the same groups, numbers and order."""
    from ckptmap.report import _numbered_groups

    assert _numbered_groups(keys) == _numbered_groups(keys, by_template=False)
