"""Boxes of a plan's outputs computed from boxes of its sources (what a sharded load reads):
for every op and every box, equal to the box cut from the whole output; and only the ops
whose index map is not a rectangle read their sources whole."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ckptmap
from ckptmap.regions import Recipes, cut, evaluate, reads, whole_reads

Q, K, V = "a.q.weight", "a.k.weight", "a.v.weight"
CASES = {
    # name: (rules, {source: shape}, ops that need their inputs whole for some boxes)
    "fuse": (
        f'merge "{Q}", "{K}", "{V}" -> "a.qkv.weight" | cat(0)',
        {Q: (6, 4), K: (2, 4), V: (2, 4)},
    ),
    "fuse then transpose": (
        f'merge "{Q}", "{K}", "{V}" -> "a.qkv.weight" | cat(0) | transpose(0, 1)',
        {Q: (6, 4), K: (2, 4), V: (2, 4)},
    ),
    "split": ('split "w" -> "q", "k", "v" | split([5, 2, 3], 1)', {"w": (3, 10)}),
    "stack": (
        'merge "e.0", "e.1", "e.2" -> "experts" | stack(0)',
        {f"e.{i}": (4, 3) for i in range(3)},
    ),
    "unstack": ('split "experts" -> "e.0", "e.1", "e.2" | unstack(1)', {"experts": (4, 3, 5)}),
    "transpose": ('transform "w" | transpose(0, 1)', {"w": (5, 7)}),
    "permute": ('transform "w" | permute(2, 0, 1)', {"w": (3, 4, 5)}),
    "slice": ('transform "w" | slice(0, 1, 4)', {"w": (6, 3)}),
    "cast": ('transform "w" | cast(float64)', {"w": (4, 4)}),
    "rope": ('transform "w" | rope_permute(2)', {"w": (8, 6)}),
    "select": ('transform "w" | select(1, [2, 0])', {"w": (5, 3)}),
    "pad": ('transform "w" | pad(0, 1, 2)', {"w": (3, 4)}),
    "reshape": ('transform "w" | reshape([4, 6])', {"w": (6, 4)}),
}


def box_of(draw, shape):
    offsets, sizes = [], []
    for n in shape:
        a = draw(st.integers(0, n))
        b = draw(st.integers(a, n))
        offsets.append(a)
        sizes.append(b - a)
    return tuple(offsets), tuple(sizes)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(CASES)), st.data())
def test_a_box_of_an_output_equals_the_box_cut_from_it(case, data):
    rules, shapes = CASES[case]
    g = torch.Generator().manual_seed(0)
    source = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    plan = ckptmap.compile(rules).plan(source).check()
    full = plan.apply(source)
    recipes = Recipes(plan)
    for o in plan.outputs:
        box = box_of(data.draw, o.shape)
        if math.prod(box[1]) == 0:
            continue
        node = recipes.of(o.value, box)
        got = evaluate(node, lambda r: cut(source[r.source], r.box).clone())
        assert torch.equal(got, cut(full[o.target], box)), (case, o.target, box)
        read = sum(math.prod(r.box[1]) for r in reads(node))
        if not whole_reads(node) and case not in ("pad", "select"):
            assert read == math.prod(box[1]), (case, box)  # a rectangle reads just its box


def test_only_ops_that_need_it_read_whole():
    def whole_for(case, box):
        rules, shapes = CASES[case]
        plan = ckptmap.compile(rules).plan(dict(shapes)).check()
        o = plan.outputs[0]
        return bool(whole_reads(Recipes(plan).of(o.value, box)))

    rows = ((0, 0), (2, 4))  # half the rows of an [8, 4|6]-ish tensor
    assert not whole_for("transpose", ((0, 0), (5, 3)))
    assert whole_for("rope", ((0, 0), (4, 6)))  # rows cut: RoPE reads the whole tensor
    assert not whole_for("rope", ((0, 2), (8, 3)))  # columns cut, every row: a rectangle
    assert whole_for("reshape", rows)
    assert not whole_for("select", ((1, 0), (3, 2)))
