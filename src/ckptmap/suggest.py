"""Suggesting rules: from two key sets (names, shapes, dtypes only), the shortest rule file
that maps one onto the other, each rule with its evidence; ambiguity is listed with its
candidates, never resolved by a coin toss, and the file is verified by planning it.

The engine, in passes over the keys:

  wrappers   whole leading segments stripped or added (DataParallel's `module.`,
             torch.compile's `_orig_mod.`, Hugging Face's `model.`), when they make more
             names meet
  exact      the same name and shape (or a 2-D transpose) on both sides
  templates  the rest, numbers folded (`h.{}.attn.c_attn.weight`, with its indices); a
             source template meets a target template with the same indices and shapes
             (kept, or transposed), scored by name tokens with the ecosystem's synonyms
             (q_proj ~ wq ~ query, gamma ~ weight); a pair is taken only when each is the
             other's best by a margin, else its keys are unresolved with the candidates
  families   N -> 1 merges whose sizes add up along one dim (q, k, v into qkv, grouped
             query sizes too), 1 -> N splits, per-expert tensors stacked
  rules      renames folded to the shortest heads under which every key goes one way;
             transposes, merges, splits; `skip` for what the target has no place for,
             `init` for what the source cannot provide
  verify     the file is compiled and planned against the target: a rule that goes
             unused is dropped, a plan that does not give the intended mapping falls back
             to whole-key renames, and what still fails is reported
"""

from __future__ import annotations

import difflib
import functools
import json
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .compile import compile
from .errors import RuleSyntaxError, UsageError
from .io import describe
from .meta import TensorMeta
from .patterns import Matcher
from .report import collapse_keys
from .rules import (
    Init,
    Merge,
    OpCall,
    Prefix,
    Rename,
    Ruleset,
    Skip,
    Split,
    Statement,
    Strip,
    Transform,
    quote,
    regex,
)
from .statements import compile_rule
from .syntax import parse

if TYPE_CHECKING:
    from .plan import Plan

# whole segments as the ecosystems name them, and the one word each means here
SEGMENTS = {
    "input_layernorm": "attn_norm",
    "attention_norm": "attn_norm",
    "ln_1": "attn_norm",
    "post_attention_layernorm": "mlp_norm",
    "ffn_norm": "mlp_norm",
    "ln_2": "mlp_norm",
    "ln_f": "final_norm",
    "embed_tokens": "embed",
    "tok_embeddings": "embed",
    "tok_emb": "embed",
    "word_embeddings": "embed",
    "wte": "embed",
    "wpe": "pos_embed",
    "position_embeddings": "pos_embed",
    "pos_emb": "pos_embed",
    "lm_head": "head",
    "output": "head",
    "classifier": "head",
    "q_proj": "q",
    "wq": "q",
    "query": "q",
    "to_q": "q",
    "k_proj": "k",
    "wk": "k",
    "key": "k",
    "to_k": "k",
    "v_proj": "v",
    "wv": "v",
    "value": "v",
    "to_v": "v",
    "o_proj": "o",
    "wo": "o",
    "out_proj": "o",
    "to_out": "o",
    "c_attn": "qkv",
    "qkv_proj": "qkv",
    "wqkv": "qkv",
    "in_proj": "qkv",
    "gate_proj": "gate",
    "up_proj": "up",
    "down_proj": "down",
    "c_fc": "up",
    "fc1": "up",
    "fc2": "down",
    "self_attn": "attn",
    "attention": "attn",
    "self_attention": "attn",
    "feed_forward": "mlp",
    "ffn": "mlp",
    "moe": "mlp",
    "block_sparse_moe": "mlp",
    "gamma": "weight",
    "beta": "bias",
    "kernel": "weight",
    "h": "layers",
    "blocks": "layers",
    "layer": "layers",
}
# Meta's Llama and torchtitan name the feed-forward's three weights by number
LLAMA_MLP = {"w1": "gate", "w2": "down", "w3": "up"}
LLAMA_MLP_PARENTS = frozenset({"feed_forward", "experts"})  # torchtitan's, Mixtral's
# the order of the members of a fused tensor, when names say it
FUSED_ORDER = {"q": 0, "k": 1, "v": 2, "gate": 0, "up": 1}
MARGIN = 0.1  # how much better the best candidate must be than the next one
FLOOR = 0.2  # how alike two names must be at the least


@dataclass
class Unresolved:
    """Keys no rule could place with certainty, and the candidates there were."""

    keys: list[str]  # source keys (side "source") or target keys (side "target")
    side: str
    candidates: list[str]
    why: str

    def __str__(self) -> str:
        keys = ", ".join(k for k, _ in collapse_keys(self.keys))
        cands = f"; candidates: {', '.join(self.candidates)}" if self.candidates else ""
        return f"{self.side} {keys}: {self.why}{cands}"


@dataclass
class Suggested:
    """One suggested rule and why: the keys it moves, their shapes, how sure."""

    statement: Statement
    evidence: str
    keys: int = 0
    confidence: str = "certain"  # "certain" | "likely"


@dataclass
class Suggestion:
    """What `suggest` found: the rules (`rules`, a Ruleset; `to_text()` gives the file with
    the evidence as comments), the keys it could not place (`unresolved`), the source ->
    target mapping it makes, and the `plan` that verifies it."""

    suggested: list[Suggested]
    unresolved: list[Unresolved]
    plan: Plan
    notes: list[str] = field(default_factory=list)

    @property
    def rules(self) -> Ruleset:
        return Ruleset(rules=tuple(s.statement for s in self.suggested))

    @property
    def mapping(self) -> dict[str, str]:
        """Source key -> the target key the suggestion loads it into (merged: the merged
        tensor); keys listed as unresolved are not in it, whatever the plan would do."""
        flagged = {k for u in self.unresolved if u.side == "source" for k in u.keys}
        return {k: v for k, v in self.plan.mapping.items() if k not in flagged}

    @property
    def ok(self) -> bool:
        """Nothing unresolved, and the verifying plan clean: no problem, and no key left
        missing or unexpected (verification only warns of those, to show them)."""
        return self.plan.ok and not self.unresolved and not self.plan.warnings

    def to_text(self) -> str:
        intro = "ckptmap 1\n\n# suggested by `ckptmap suggest`: check each rule's evidence\n\n"
        return intro + self.body()

    def body(self) -> str:
        """The rules with their evidence as comments, and the unresolved keys (no header)."""
        lines = []
        for s in self.suggested:
            sure = "" if s.confidence == "certain" else f" [{s.confidence}]"
            lines.append(f"# {_one_line(s.evidence)}{sure}")
            lines.append(s.statement.to_text())
        for u in self.unresolved:
            lines.append(f"# unresolved: {_one_line(str(u))}")
        return "\n".join(lines) + "\n"

    def to_json(self) -> str:
        doc = {
            "rules": [
                {
                    "rule": s.statement.to_text(),
                    "evidence": s.evidence,
                    "keys": s.keys,
                    "confidence": s.confidence,
                }
                for s in self.suggested
            ],
            "unresolved": [
                {"side": u.side, "keys": u.keys, "candidates": u.candidates, "why": u.why}
                for u in self.unresolved
            ],
            "mapping": self.mapping,
            "plan": {
                "ok": self.plan.ok,
                "fingerprint": self.plan.fingerprint,
                "problems": [p.message for p in self.plan.problems],
            },
            "notes": self.notes,
        }
        return json.dumps(doc, indent=2)

    def summary(self) -> str:
        report = self.plan.report()
        lines = [
            f"{len(self.suggested)} rules; the plan: {len(report.loaded)} loaded, "
            f"{len(report.skipped)} skipped, {len(report.initialized)} initialized, "
            f"{len(report.missing)} missing, {len(report.unexpected)} unexpected"
            + ("" if self.plan.ok else f", {len(self.plan.errors)} problems")
        ]
        lines += [f"unresolved: {u}" for u in self.unresolved]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def suggest(source: Any, target: Any, hints: Iterable[str] = ()) -> Suggestion:
    """The rules that map `source` onto `target` (each anything a plan takes), from names,
    shapes and dtypes alone. `hints` are renames the user knows (`"old -> new"`), applied
    first. Nothing is guessed: keys that two candidates fit equally are `unresolved`."""
    src = describe(source, role="source").meta
    tgt = describe(target, role="target").meta
    engine = _Engine(src, tgt, [_hint(h) for h in hints])
    engine.run()
    return engine.verified()


def _one_line(text: str) -> str:
    """A comment stays one line whatever a key name holds (a line break would start a
    statement of its own in the file)."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def _hint(text: str) -> Rename:
    """A hint is a rename as the language writes it (`"old" -> "new"`, `/re/ -> "..."`),
    or bare words `old -> new`."""

    if not isinstance(text, str) or "->" not in text:
        raise UsageError(f"a hint is 'old -> new' (a rename), not {text!r}", code="CKM001")
    old, new = (part.strip() for part in text.split("->", 1))
    if old[:1] not in ('"', "/"):
        old = quote(old)
    if new[:1] != '"':
        new = quote(new)
    try:
        rules = parse(f"rename {old} -> {new}\n").rules
    except (RuleSyntaxError, ValueError) as e:
        message = e.message if isinstance(e, RuleSyntaxError) else str(e)
        raise UsageError(f"the hint {text!r} is no rename: {message}", code="CKM001") from None
    if len(rules) != 1 or not isinstance(rules[0], Rename):
        raise UsageError(f"the hint {text!r} is one rename, 'old -> new'", code="CKM001")
    return rules[0]


# --- names ----------------------------------------------------------------------------------


def _template(name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """A key's segments with numbers as `{}`, and the numbers."""
    segs = name.split(".")
    return tuple("{}" if s.isdigit() else s for s in segs), tuple(s for s in segs if s.isdigit())


@functools.lru_cache(maxsize=65536)
def _canonical(template: tuple[str, ...]) -> tuple[str, ...]:
    """Each segment as the one word it means here (numbers kept as `{}`)."""
    out: list[str] = []
    for k, seg in enumerate(template):
        if seg in LLAMA_MLP and k and template[k - 1] in LLAMA_MLP_PARENTS:  # Meta's w1..w3
            out.append(LLAMA_MLP[seg])
        elif seg in SEGMENTS:
            out.append(SEGMENTS[seg])
        else:
            out.append("_".join(SEGMENTS.get(t, t) for t in seg.split("_")))
    return tuple(out)


def _tokens(canonical: tuple[str, ...]) -> dict[str, float]:
    """The words of a template, weighted: the leaf counts most."""
    out: dict[str, float] = {}
    words = [s for s in canonical if s != "{}"]
    for depth, seg in enumerate(reversed(words)):
        weight = 3.0 if depth == 0 else 2.0 if depth == 1 else 1.0
        for p in seg.split("_"):
            if p:
                out[p] = max(out.get(p, 0.0), weight)
    return out


def _alike(a: tuple[str, ...], b: tuple[str, ...]) -> float:
    """How alike two templates' names are, 0..1: their words (the leaf weighing most) and
    their order; 1.0 when they are the same names up to synonyms."""
    ca, cb = _canonical(a), _canonical(b)
    if ca == cb:
        return 1.0
    ta, tb = _tokens(ca), _tokens(cb)
    common = sum(min(ta[t], tb[t]) for t in ta.keys() & tb.keys())
    total = sum(ta.values()) + sum(tb.values())
    words = 2 * common / total if total else 0.0
    order = difflib.SequenceMatcher(None, ca, cb, autojunk=False).ratio()
    return min(0.99, 0.5 * words + 0.5 * order)


def _text(template: tuple[str, ...], idx_sets: Iterable[tuple[str, ...]] = ()) -> str:
    """`h.{0..11}.attn.c_attn.weight`: a template as people read it."""
    keys = [_fill(template, idx) for idx in idx_sets] or [
        ".".join("*" if s == "{}" else s for s in template)
    ]
    return ", ".join(k for k, _ in collapse_keys(keys))


def _fill(template: tuple[str, ...], idx: tuple[str, ...]) -> str:
    it = iter(idx)
    return ".".join(next(it) if s == "{}" else s for s in template)


def _shape(m: TensorMeta) -> str:
    return str(list(m.shape))


# --- the engine -----------------------------------------------------------------------------


@dataclass
class _Group:
    """Keys of one template: {indices: metadata}."""

    template: tuple[str, ...]
    keys: dict[tuple[str, ...], TensorMeta]

    def names(self) -> list[str]:
        return [_fill(self.template, i) for i in self.keys]


class _Engine:
    def __init__(self, src: dict[str, TensorMeta], tgt: dict[str, TensorMeta], hints: list[Rename]):
        self.original = src
        self.tgt = tgt
        self.hints = hints
        self.out: list[Suggested] = []
        self.unresolved: list[Unresolved] = []
        self.notes: list[str] = []
        # the source as the rules so far leave it: current name -> original name
        self.names: dict[str, str] = {k: k for k in src}
        self.pairs: dict[str, str] = {}  # current source name -> target key (same tensor)
        self.transposed: set[str] = set()  # target keys stored transposed in the source
        self.taken: set[str] = set()  # target keys provided
        self.consumed: set[str] = set()  # current source names used by merges/splits/stacks
        self.families: list[Suggested] = []
        self.used: set[tuple[str, tuple[str, ...]]] = set()  # ("s"|"t", template) in families
        self.pending_source: dict[tuple[str, ...], list[str]] = {}  # templates, their candidates
        self.evidence: dict[tuple[str, ...], tuple] = {}  # target template -> how it was met
        self.skips: list[str] = []
        self.inits: list[str] = []
        self.contested: set[str] = set()  # target keys an unresolved source could go to
        self.flagged: set[str] = set()  # source keys already said to be unresolved
        self.shifted = False

    def meta(self, current: str) -> TensorMeta:
        return self.original[self.names[current]]

    # --- passes ---
    def run(self) -> None:
        for hint in self.hints:
            before = dict(self.names)
            self._apply(hint, f"your hint: {hint.to_text()}")
            if self.names.keys() == before.keys():
                raise UsageError(f"the hint {hint.to_text()} matches no source key", code="CKM001")
        self._wrappers()
        self._exact()
        self._shifts()
        self._templates()
        self._families()
        self._leftovers()

    def _apply(self, statement: Statement, evidence: str, keys: int | None = None) -> None:
        rule = compile_rule(0, statement)
        renamed: dict[str, str] = {}
        for current, original in self.names.items():
            new = rule.step(current)
            name = new if isinstance(new, str) else current
            if name in renamed:
                raise UsageError(
                    f"{statement.to_text()} makes one name of {renamed[name]} and {original}",
                    code="CKM001",
                )
            renamed[name] = original
        moved = sum(1 for a, b in zip(self.names, renamed, strict=True) if a != b)
        self.names = renamed
        self.out.append(Suggested(statement, evidence, moved if keys is None else keys))

    def _overlap(self, names: Iterable[str]) -> int:
        return sum(1 for n in names if n in self.tgt and self.tgt[n].shape == self.meta_of(n).shape)

    def meta_of(self, name: str) -> TensorMeta:
        return self.original[self.names[name]] if name in self.names else TensorMeta(())

    def _wrappers(self) -> None:
        """Whole leading segments stripped or added while that makes more names meet."""
        for _ in range(4):
            here = self._overlap(self.names)
            scored: list[tuple[int, str, Statement, str]] = []
            for statement, why in self._wrapper_candidates():
                rule = compile_rule(0, statement)
                moved = {}
                for n in self.names:
                    new = rule.step(n)
                    moved[new if isinstance(new, str) else n] = n
                if len(moved) < len(self.names):
                    continue  # two names would become one
                gain = (
                    sum(
                        1
                        for new, old in moved.items()
                        if new in self.tgt and self.tgt[new].shape == self.meta_of(old).shape
                    )
                    - here
                )
                if gain > 0:
                    scored.append((gain, statement.to_text(), statement, why))
            if not scored:
                return
            # the most names met; of as many, the longest prefix (both wrappers at once)
            scored.sort(key=lambda t: (-t[0], -len(t[1]), t[1]))
            top = scored[0]
            rivals = [t for t in scored[1:] if t[0] == top[0] and not _nested(t[2], top[2])]
            if rivals:  # two towers (encoder., decoder.) meet the target alike: no guess
                self.notes.append(
                    f"{top[1]} and {rivals[0][1]} would each meet {top[0]} target keys: "
                    "which wrapper to take cannot be told"
                )
                return
            self._apply(top[2], top[3])

    def _wrapper_candidates(self) -> list[tuple[Statement, str]]:
        src_first = _first_segments(self.names)
        tgt_first = _first_segments(self.tgt)
        out: list[tuple[Statement, str]] = []
        n, m = len(self.names), len(self.tgt)
        known = {"module": "DataParallel / DDP", "_orig_mod": "torch.compile"}
        for head, count in _leading(self.names).items():
            first = head.split(".", 1)[0]
            if (
                first not in tgt_first
                and count * 2 >= n
                and not any(s.isdigit() for s in head.split("."))
            ):
                wrappers = [known[s] for s in head.split(".") if s in known]
                out.append(
                    (
                        Strip(f"{head}."),
                        f"{count} of {n} source keys start with {head}., no target key does"
                        + (f" ({', '.join(wrappers)})" if wrappers else ""),
                    )
                )
        for seg, count in tgt_first.items():
            if seg not in src_first and count * 2 >= m and not seg.isdigit():
                out.append(
                    (
                        Prefix(f"{seg}."),
                        f"{count} of {m} target keys start with {seg}., no source key does",
                    )
                )
        return out

    def _exact(self) -> None:
        for name in list(self.names):
            t = self.tgt.get(name)
            if t is None:
                continue
            m = self.meta(name)
            if tuple(t.shape) == tuple(m.shape):
                self.pairs[name] = name
                self.taken.add(name)
            elif len(t.shape) == 2 and tuple(t.shape) == tuple(m.shape)[::-1]:
                self.pairs[name] = name
                self.taken.add(name)
                self.transposed.add(name)

    # --- numbered lists whose numbers moved ---
    def _shifts(self) -> None:
        """A list of modules (`features.{i}`, `layers.{i}`) with an entry added or removed:
        the entries are aligned by what each holds (names under it and shapes), and taken
        only when the alignment is the only one (the same both ways)."""
        src_lists = _lists(self.names, self.meta)
        tgt_lists = _lists(self.tgt, self.tgt.__getitem__)
        for prefix, src in src_lists.items():
            tgt = tgt_lists.get(prefix)
            if tgt is None or sorted(src) == sorted(tgt):
                continue
            a_idx, b_idx = sorted(src, key=int), sorted(tgt, key=int)
            a_sig, b_sig = [src[i] for i in a_idx], [tgt[i] for i in b_idx]
            forward = _aligned(a_sig, b_sig)
            backward = _aligned(a_sig[::-1], b_sig[::-1])
            n, m = len(a_sig), len(b_sig)
            backward = {n - 1 - i: m - 1 - j for i, j in backward.items()}
            where = ".".join(prefix)
            # an entry added or removed must be unlike every other: among entries alike,
            # which one went cannot be told
            lone = [a_sig[i] for i in range(n) if i not in forward]
            lone += [b_sig[j] for j in range(m) if j not in forward.values()]
            alike = any(a_sig.count(g) + b_sig.count(g) > 1 for g in lone)
            under = [".".join((*prefix, i, *suffix)) for i in a_idx for suffix, _ in src[i]]
            for key in under:  # the names alone may have paired these: undone either way
                old = self.pairs.pop(key, None)
                if old is not None:
                    self.taken.discard(old)
                    self.transposed.discard(old)
            if forward != backward or alike:
                self.unresolved.append(
                    Unresolved(
                        under,
                        "source",
                        [f"{where}.{{{b_idx[0]}..{b_idx[-1]}}}"] if b_idx else [],
                        f"{where} has {n} entries, the target's {m}, and entries alike "
                        "make it impossible to tell which were added or removed",
                    )
                )
                self.flagged.update(under)
                self.contested.update(
                    ".".join((*prefix, j, *suffix)) for j in b_idx for suffix, _ in tgt[j]
                )
                continue
            moves = [
                (".".join((*prefix, a_idx[i], *suffix)), ".".join((*prefix, b_idx[j], *suffix)))
                for i, j in forward.items()
                for suffix, _ in src[a_idx[i]]
            ]
            for key_a, key_b in moves:
                self.pairs[key_a] = key_b
                self.taken.add(key_b)
            shifted = [(a_idx[i], b_idx[j]) for i, j in forward.items() if a_idx[i] != b_idx[j]]
            if shifted:
                self.shifted = True
                self.notes.append(
                    f"{where}: entries aligned by what they hold: "
                    + ", ".join(f"{a} -> {b}" for a, b in shifted)
                )

    # --- templates ---
    def _groups(self, names: Iterable[str], meta: Any) -> dict[tuple[str, ...], _Group]:
        groups: dict[tuple[str, ...], _Group] = {}
        for name in names:
            tpl, idx = _template(name)
            groups.setdefault(tpl, _Group(tpl, {})).keys[idx] = meta(name)
        return groups

    def _templates(self) -> None:
        """Source templates met with target templates: the same indices and shapes (kept,
        else transposed), some word in common beyond `weight`/`bias`, and each the other's
        clear best among all that fit (never a pair left over once the others are taken)."""
        left = (n for n in self.names if n not in self.pairs and n not in self.flagged)
        src = self._groups(left, self.meta)
        tgt = self._groups(
            (t for t in self.tgt if t not in self.taken and t not in self.contested),
            self.tgt.__getitem__,
        )
        fits = self._fits(src, tgt)
        by_target: dict[tuple, dict[tuple, tuple[float, str]]] = defaultdict(dict)
        for a, cands in fits.items():
            for b, fit in cands.items():
                by_target[b][a] = fit
        for a, cands in fits.items():
            if not cands:
                continue
            b, (score, mode) = max(cands.items(), key=lambda kv: (kv[1][0], kv[0]))
            if score < FLOOR or not _clear_best(cands, b) or not _clear_best(by_target[b], a):
                continue
            if not _words_in_common(a, b):
                continue  # shapes alone, or only `.weight`: no evidence of the same tensor
            self._take(src[a], tgt[b], mode, score, cands, by_target[b])
        self._square_layouts()
        taken_src = set(self.pairs)
        for a, cands in fits.items():  # what several targets fit alike, or too weakly
            if cands and _fill(a, next(iter(src[a].keys))) not in taken_src:
                ranked = sorted(cands.items(), key=lambda kv: (-kv[1][0], kv[0]))[:3]
                self.pending_source[a] = [
                    f"{_text(b, tgt[b].keys)} ({s:.2f})" for b, (s, _) in ranked
                ]
                for b in cands:  # a candidate is no new tensor: it is unresolved too
                    self.contested.update(tgt[b].names())
        self._renumbered(src, tgt, taken_src)

    def _fits(self, src: dict, tgt: dict) -> dict[tuple, dict[tuple, tuple[float, str]]]:
        """For each source template, the target templates its tensors fit, scored. Found
        through an index (shapes, then words), not by trying every pair."""
        # (shapes, word) -> target templates: a candidate shares the shapes and a word
        index: dict[tuple[Any, str], list[tuple]] = defaultdict(list)
        for b, gb in tgt.items():
            for word in _words(b) or {""}:
                index[(_signature(gb), word)].append(b)

        by_shapes: dict[Any, list[tuple]] = defaultdict(list)
        for b, gb in tgt.items():
            by_shapes[_signature(gb)].append(b)

        def near(ga: _Group, a: tuple, transposed: bool) -> list[tuple]:
            sig = _signature(ga, transposed)
            found = {b for w in (_words(a) or {""}) for b in index.get((sig, w), ())}
            # with no word in common, the shapes' fits still make it unresolved, not new
            return sorted(found) or by_shapes.get(sig, [])[:8]

        fits: dict[tuple, dict[tuple, tuple[float, str]]] = {}
        for a, ga in src.items():
            cands: dict[tuple, tuple[float, str]] = {}
            for b in near(ga, a, False):
                if _fit(ga, tgt[b]) == "same" and _same_dtypes(ga, tgt[b]):
                    cands[b] = (_alike(a, b), "same")
            if not cands:  # a transposed layout only where no kept shape fits
                for b in near(ga, a, True):
                    if _fit(ga, tgt[b]) == "transpose" and _same_dtypes(ga, tgt[b]):
                        cands[b] = (_alike(a, b), "transpose")
            fits[a] = cands
        return fits

    def _renumbered(self, src: dict, tgt: dict, taken_src: set[str]) -> None:
        """Templates that meet but for their numbering (four layers onto two): unresolved,
        with the candidates, never skipped and initialized."""
        for a, ga in src.items():
            if a in self.pending_source or _fill(a, next(iter(ga.keys))) in taken_src:
                continue
            shapes = {tuple(m.shape) for m in ga.keys.values()}
            near = [
                b
                for b, gb in tgt.items()
                if b.count("{}") == a.count("{}")
                and b.count("{}")
                and {tuple(m.shape) for m in gb.keys.values()} == shapes
                and gb.keys.keys() != ga.keys.keys()
                and _words_in_common(a, b)
            ]
            if near:
                self.pending_source[a] = [
                    f"{_text(b, tgt[b].keys)} (numbered otherwise)" for b in near[:3]
                ]
                for b in near:
                    self.contested.update(tgt[b].names())

    def _take(
        self, ga: _Group, gb: _Group, mode: str, score: float, others: dict, rivals: dict
    ) -> None:
        for idx in ga.keys:
            a, b = _fill(ga.template, idx), _fill(gb.template, idx)
            self.pairs[a] = b
            self.taken.add(b)
            if mode == "transpose":
                self.transposed.add(b)
        near = [(x, s) for x, (s, _) in others.items() if x != gb.template]
        self.evidence[gb.template] = (ga, score, near, mode)

    def _square_layouts(self) -> None:
        """Square 2-D weights give no shape evidence of a transposed layout; when every other
        2-D weight of the same layer template is transposed, these are too (GPT-2's Conv1D)."""
        layers: dict[tuple, list[tuple[str, bool]]] = defaultdict(list)
        for a, b in self.pairs.items():
            m = self.meta(a)
            if len(m.shape) != 2 or not b.endswith("weight"):
                continue
            tpl, _ = _template(b)
            home = tpl[: tpl.index("{}") + 1] if "{}" in tpl else None
            if home is None:
                continue
            square = m.shape[0] == m.shape[1]
            layers[home].append((b, square))
        for home, weights in layers.items():
            shaped = [b for b, square in weights if not square]
            squares = [b for b, square in weights if square]
            if not (squares and len(shaped) >= 2 and all(b in self.transposed for b in shaped)):
                continue
            # a square weight is taken to be stored so only when a module of its name is
            # (GPT-2's attn.c_proj beside mlp.c_proj): else the shapes cannot tell
            flipped = {b.split(".")[-2] for b in shaped if b.count(".") >= 1}
            named = [b for b in squares if b.split(".")[-2] in flipped]
            unknown = [b for b in squares if b not in named]
            self.transposed.update(named)
            if named:
                self.notes.append(
                    f"{_text(home)}: every non-square weight is stored transposed, so "
                    f"{', '.join(k for k, _ in collapse_keys(named))}, square, of a module "
                    "named as transposed ones are, is taken to be too"
                )
            if unknown:
                sources = [a for a, b in self.pairs.items() if b in unknown]
                for a in sources:
                    b = self.pairs.pop(a)
                    self.taken.discard(b)
                    self.contested.add(b)
                self.flagged.update(sources)
                self.unresolved.append(
                    Unresolved(
                        sources,
                        "source",
                        unknown,
                        "square, in a layer whose other weights are stored transposed: "
                        "whether it is too cannot be told from its shape",
                    )
                )

    # --- families: merges, splits, stacks ---
    def _families(self) -> None:
        left_src = sorted(n for n in self.names if n not in self.pairs and n not in self.flagged)
        left_tgt = sorted(t for t in self.tgt if t not in self.taken and t not in self.contested)
        if not left_src or not left_tgt:
            return
        src = self._groups(left_src, self.meta)
        tgt = self._groups(left_tgt, self.tgt.__getitem__)
        self._merges(src, tgt, "merge")
        src = self._groups([n for n in left_src if n not in self.consumed], self.meta)
        tgt = self._groups([t for t in left_tgt if t not in self.taken], self.tgt.__getitem__)
        self._merges(tgt, src, "split")
        src = self._groups([n for n in left_src if n not in self.consumed], self.meta)
        tgt = self._groups([t for t in left_tgt if t not in self.taken], self.tgt.__getitem__)
        self._stacks(src, tgt)

    def _merges(self, many: dict, one: dict, kind: str) -> None:
        """Groups of `many` that differ in one segment and add up to a group of `one`."""
        side_many, side_one = ("s", "t") if kind == "merge" else ("t", "s")
        families: dict[tuple, list[tuple]] = defaultdict(list)
        for tpl in many:
            for p, seg in enumerate(tpl):
                if seg != "{}":
                    families[(*tpl[:p], "*", *tpl[p + 1 :])].append(tpl)
        for fam, members in families.items():
            if len(members) < 2 or any((side_many, m) in self.used for m in members):
                continue
            idx = set(many[members[0]].keys)
            if any(set(many[m].keys) != idx for m in members):
                continue
            order = sorted(members, key=lambda m: _member_order(m, fam))
            best = []
            for tpl, g in one.items():
                if (side_one, tpl) in self.used or set(g.keys) != idx:
                    continue
                if not _fused(fam, order, tpl):
                    continue  # sizes that add up are no evidence by themselves
                options = _adds_up(order, many, g)
                if options:
                    layout = self._layout(tpl if kind == "split" else order[0], kind)
                    options.sort(key=lambda o: (o[1] != bool(layout), o[0]))
                    best.append((_alike(tuple(s for s in fam if s != "*"), tpl), tpl, options[0]))
            if not best:
                continue
            best.sort(key=lambda t: -t[0])
            if best and any(_member_order(m, fam)[0] == 9 for m in order):
                self.unresolved.append(  # the names do not say in which order they join
                    Unresolved(
                        [n for m in order for n in many[m].names()],
                        "source" if kind == "merge" else "target",
                        [_text(t, one[t].keys) for _, t, _ in best[:3]],
                        "its pieces add up, but their names do not say their order",
                    )
                )
                self.used.update((side_many, m) for m in order)
                continue
            if len(best) > 1 and best[0][0] - best[1][0] < MARGIN:
                self.unresolved.append(
                    Unresolved(
                        [n for m in order for n in many[m].names()],
                        "source" if kind == "merge" else "target",
                        [_text(t, one[t].keys) for _, t, _ in best[:3]],
                        f"its pieces add up to several {'targets' if kind == 'merge' else 'sources'}",
                    )
                )
                self.used.update((side_many, m) for m in order)
                continue
            score, tpl, (dim, transpose) = best[0]
            self._family(kind, order, many, tpl, one, dim, transpose, score)

    def _layout(self, template: tuple[str, ...], kind: str) -> bool | None:
        """Whether the source stores this layer's 2-D weights transposed (GPT-2's Conv1D):
        True when at least two non-square weights met under its layer all are, False when
        one was met kept, None when nothing says."""
        if "{}" not in template:
            return None
        home = template[: template.index("{}") + 1]
        flips = []
        for a, b in self.pairs.items():
            m = self.meta(a)
            tpl = _template(a if kind == "split" else b)[0]
            if len(m.shape) == 2 and m.shape[0] != m.shape[1] and tpl[: len(home)] == home:
                flips.append(b in self.transposed)
        if len(flips) >= 2 and all(flips):
            return True
        return False if any(not f for f in flips) else None

    def _family(self, kind, order, many, tpl, one, dim, transpose, score) -> None:
        side_many, side_one = ("s", "t") if kind == "merge" else ("t", "s")
        self.used.update((side_many, m) for m in order)
        self.used.add((side_one, tpl))
        g = one[tpl]
        pieces = [_text(m, many[m].keys) for m in order]
        sizes = " + ".join(str(many[m].keys[next(iter(many[m].keys))].shape[dim]) for m in order)
        whole = _text(tpl, g.keys)
        if kind == "merge":
            for m in order:
                self.consumed.update(many[m].names())
            self.taken.update(g.names())
            patterns, target = [_pattern(m) for m in order], _pattern(tpl)
            ops = [OpCall("cat", (dim,))] + ([OpCall("transpose", (0, 1))] if transpose else [])
            statement: Statement = Merge(tuple(patterns), target, tuple(ops))
            said = f"{', '.join(pieces)} -> {whole}: sizes {sizes} along dim {dim}"
        else:
            for m in order:
                self.taken.update(many[m].names())
            self.consumed.update(g.names())
            ops = ([OpCall("transpose", (0, 1))] if transpose else []) + [
                OpCall(
                    "split",
                    (tuple(many[m].keys[next(iter(many[m].keys))].shape[dim] for m in order), dim),
                )
            ]
            statement = Split(_pattern(tpl), tuple(_pattern(m) for m in order), tuple(ops))
            said = f"{whole} -> {', '.join(pieces)}: sizes {sizes} along dim {dim}"
        if transpose:
            said += ", stored transposed"
        self.families.append(
            Suggested(statement, said + f" (names {score:.2f} alike)", len(g.keys), "likely")
        )

    def _stacks(self, src: dict, tgt: dict) -> None:
        """Per-expert tensors (`experts.{e}.w1.weight`) stacked into one (`w1` [E, ...])."""
        for b, gb in tgt.items():
            if ("t", b) in self.used:
                continue
            found = []
            for a, ga in src.items():
                if ("s", a) in self.used or a.count("{}") != b.count("{}") + 1:
                    continue
                split = _stack_fit(ga, gb)
                if split is not None and _stack_named(a, b):
                    found.append((_alike(a, b), a, split))
            if not found:
                continue
            found.sort(key=lambda t: -t[0])
            if len(found) > 1 and found[0][0] - found[1][0] < MARGIN:
                self.unresolved.append(
                    Unresolved(
                        gb.names(),
                        "target",
                        [_text(a, src[a].keys) for _, a, _ in found[:3]],
                        "several per-piece groups stack to it",
                    )
                )
                continue
            score, a, position = found[0]
            self.used.update({("s", a), ("t", b)})
            ga = src[a]
            self.consumed.update(ga.names())
            self.taken.update(gb.names())
            count = len({idx[position] for idx in ga.keys})
            pattern = _pattern(a, gather=position)
            self.families.append(
                Suggested(
                    Merge((pattern,), _pattern(b), (OpCall("stack", (0,)),)),
                    f"{_text(a, ga.keys)} -> {_text(b, gb.keys)}: {count} pieces of "
                    f"{_shape(ga.keys[next(iter(ga.keys))])} stacked (names {score:.2f} alike)",
                    len(ga.keys),
                    "likely",
                )
            )

    # --- what is left ---
    def _leftovers(self) -> None:
        left_src = sorted(n for n in self.names if n not in self.pairs and n not in self.consumed)
        left_tgt = sorted(t for t in self.tgt if t not in self.taken)
        flagged: set[str] = {k for u in self.unresolved for k in u.keys} | self.flagged
        for tpl, cands in self.pending_source.items():
            keys = [n for n in left_src if _template(n)[0] == tpl and n not in flagged]
            if keys:
                why = (
                    "several targets fit it alike"
                    if len(cands) > 1
                    else "a target fits its shapes, but nothing in the names says it is the same"
                )
                self.unresolved.append(Unresolved(keys, "source", cands, why))
                flagged.update(keys)
        self.skips = [n for n in left_src if n not in flagged]
        self.inits = [t for t in left_tgt if t not in self.contested]

    # --- the file ---
    def rules(self, fold: bool = True) -> list[Suggested]:
        out = list(self.out)  # hints and wrappers, in order
        out += self._skip_rules()
        out += self.families
        out += _renames(self, fold)
        for b in sorted(self.transposed):
            m = self.tgt[b]
            out.append(
                Suggested(
                    Transform(b, (OpCall("transpose", (0, 1)),)),
                    f"{b}: the source stores it {list(m.shape)[::-1]}, the target {list(m.shape)}"
                    + (
                        " (square: taken to be stored transposed like its layer's other weights)"
                        if m.shape[0] == m.shape[1]
                        else ""
                    ),
                    1,
                    "certain" if m.shape[0] != m.shape[1] else "likely",
                )
            )
        out += _folded_inits(self)
        return _fold_transposes(out)

    def _skip_rules(self) -> list[Suggested]:
        """`skip` for the source keys the target has no place for (those an `init` replaces
        are dropped by it)."""
        drop = set(self.skips) - set(self.inits)
        others = set(self.names) - drop
        return [
            Suggested(
                Skip(pattern),
                f"the target has no place for {', '.join(k for k, _ in collapse_keys(under))}",
                len(under),
            )
            for pattern, under in _fold_keys(drop, others)
        ]

    def verified(self) -> Suggestion:
        for fold in (True, False):
            suggested = self.rules(fold)
            plan, suggested = _verify(suggested, self.original, self.tgt)
            intended = self.intended()
            loaded = plan.mapping  # a property that builds a dict: once
            wrong = {k: v for k, v in loaded.items() if intended.get(k, v) != v}
            wrong |= {k: "(not loaded)" for k in intended if k not in loaded}
            if plan.ok and not wrong:
                break
        if wrong:  # never a mapping that was not found: said, and not ok
            self.unresolved.append(
                Unresolved(sorted(wrong), "source", [], "the rules do not give the mapping found")
            )
            self.notes.append(
                f"the plan does not give the mapping found for {len(wrong)} keys "
                f"({', '.join(sorted(wrong)[:3])}): check these rules"
            )
        for u in self.unresolved:  # said in the user's names, as the source has them
            if u.side == "source":
                u.keys = [self.names.get(k, k) for k in u.keys]
        return Suggestion(suggested, self.unresolved, plan, self.notes)

    def intended(self) -> dict[str, str]:
        return {self.names[a]: b for a, b in self.pairs.items()}


def _lists(names: Iterable[str], meta: Any) -> dict[tuple[str, ...], dict[str, tuple]]:
    """{list prefix: {index: what the entry holds: ((suffix, shape), ...)}} for the first
    numbered segment of every key."""
    out: dict[tuple[str, ...], dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for name in names:
        segs = name.split(".")
        for p, seg in enumerate(segs):
            if seg.isdigit():
                out[tuple(segs[:p])][seg].append((tuple(segs[p + 1 :]), tuple(meta(name).shape)))
                break
    return {k: {i: tuple(sorted(v)) for i, v in d.items()} for k, d in out.items()}


def _aligned(a: list, b: list) -> dict[int, int]:
    """Positions of `a` matched to positions of `b` with the same signature, in order."""
    out = {}
    matcher = difflib.SequenceMatcher(None, a, b, autojunk=False)
    for block in matcher.get_matching_blocks():
        for k in range(block.size):
            out[block.a + k] = block.b + k
    return out


def _leading(names: Iterable[str], most: int = 3) -> dict[str, int]:
    """How many names start with each of their first one, two, three segments."""
    out: dict[str, int] = defaultdict(int)
    for n in names:
        segs = n.split(".")
        for k in range(1, min(most, len(segs) - 1) + 1):
            out[".".join(segs[:k])] += 1
    return out


def _nested(a: Statement, b: Statement) -> bool:
    """Whether one wrapper rule's prefix is the other's start (`_orig_mod.` in
    `_orig_mod.module.`): the longer is the same evidence, not a rival."""
    pa = a.prefix if isinstance(a, (Strip, Prefix)) else ""
    pb = b.prefix if isinstance(b, (Strip, Prefix)) else ""
    return type(a) is type(b) and (pa.startswith(pb) or pb.startswith(pa))


def _first_segments(names: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for n in names:
        if "." in n:
            out[n.split(".", 1)[0]] += 1
    return out


def _clear_best(cands: dict, choice: Any) -> bool:
    """The choice beats every other candidate by the margin, or is the only one whose
    names are the same up to synonyms and the others' differ in more than a leaf word."""
    best = cands[choice][0]
    others = [s for k, (s, _) in cands.items() if k != choice]
    if all(best - s >= MARGIN for s in others):
        return True
    return best == 1.0 and all(s < 0.97 for s in others)


GENERIC = frozenset({"weight", "bias", "{}"})


def _words_in_common(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    """Evidence beyond the shapes: a word of the names in common besides weight/bias (as
    written or as the synonyms read it), or, for keys with no other word, the same leaf."""
    ca, cb = _words(a), _words(b)
    return bool(ca & cb) or (not ca and not cb and _canonical(a)[-1:] == _canonical(b)[-1:])


def _signature(g: _Group, transposed: bool = False) -> Any:
    """What two templates' tensors must share to fit: their indices and shapes."""
    return frozenset(
        (i, tuple(m.shape)[::-1] if transposed and len(m.shape) == 2 else tuple(m.shape))
        for i, m in g.keys.items()
    )


def _same_dtypes(ga: _Group, gb: _Group) -> bool:
    """dtypes that are known on both sides agree in kind: a float is no integer counter."""

    def kind(d: str | None) -> str | None:
        if d is None:
            return None
        return "int" if d.startswith(("int", "uint")) or d == "bool" else "float"

    return all(
        kind(ga.keys[i].dtype) is None
        or kind(gb.keys[i].dtype) is None
        or kind(ga.keys[i].dtype) == kind(gb.keys[i].dtype)
        for i in ga.keys
    )


def _fit(ga: _Group, gb: _Group) -> str | None:
    """How the tensors of two templates meet: "same" shapes, "transpose"d, or not at all."""
    if len(ga.keys) != len(gb.keys) or ga.keys.keys() != gb.keys.keys():
        return None
    if all(tuple(ga.keys[i].shape) == tuple(gb.keys[i].shape) for i in ga.keys):
        return "same"
    if all(
        len(gb.keys[i].shape) == 2 and tuple(ga.keys[i].shape) == tuple(gb.keys[i].shape)[::-1]
        for i in ga.keys
    ):
        return "transpose"
    return None


def _fused(family: tuple[str, ...], members: list, whole: tuple[str, ...]) -> bool:
    """Whether the names say these members are the pieces of that fused tensor: the same
    names but at the members' place, where the fused one's word holds each member's
    (`qkv` holds q, k and v; `gate_up` gate and up)."""
    p = family.index("*")
    if len(whole) != len(family):
        return False
    cf, cw = _canonical(tuple(s if s != "*" else "x" for s in family)), _canonical(whole)
    if any(cf[i] != cw[i] for i in range(len(family)) if i != p):
        return False
    word = cw[p]
    return all(_canonical(m)[p] in word and _canonical(m)[p] != word for m in members)


def _member_order(template: tuple[str, ...], family: tuple[str, ...]) -> tuple:
    seg = template[family.index("*")]
    word = SEGMENTS.get(seg, seg)
    return (FUSED_ORDER.get(word, 9), seg)


def _adds_up(order: list, many: dict, g: _Group) -> list[tuple[int, bool]]:
    """Every (dim, transposed) along which the members' shapes add up to the group's, the
    same for every index (square pieces fit both ways: the layout decides)."""
    found = []
    for transpose in (False, True):
        for dim in (0, 1):
            ok = True
            for idx, whole in g.keys.items():
                shapes = [tuple(many[m].keys[idx].shape) for m in order]
                target = tuple(whole.shape)
                if transpose:
                    if len(target) != 2 or any(len(s) != 2 for s in shapes):
                        ok = False
                        break
                    target = target[::-1]
                if any(len(s) != len(target) for s in shapes) or not len(target) > dim:
                    ok = False
                    break
                if sum(s[dim] for s in shapes) != target[dim] or any(
                    s[:dim] + s[dim + 1 :] != target[:dim] + target[dim + 1 :] for s in shapes
                ):
                    ok = False
                    break
            if ok:
                found.append((dim, transpose))
    return found


def _words(template: tuple[str, ...]) -> set[str]:
    return (set(template) | set(_canonical(template))) - GENERIC


def _stack_named(pieces: tuple[str, ...], whole: tuple[str, ...]) -> bool:
    """Whether the names say the stacked tensor is made of these pieces: its last word is
    one of theirs (`experts.{e}.w1.weight` into `experts.w1`)."""
    leaf = [w for w in whole if w not in GENERIC][-1:]
    canon = [w for w in _canonical(whole) if w not in GENERIC][-1:]
    have = _words(pieces)
    return bool(leaf) and (leaf[0] in have or canon[0] in have)


def _stack_fit(ga: _Group, gb: _Group) -> int | None:
    """The position of the index that numbers the pieces, when `ga`'s tensors stacked along
    a new first dim are `gb`'s; else None."""
    for position in range(len(next(iter(ga.keys)))):
        rest: dict[tuple, list[tuple[str, TensorMeta]]] = defaultdict(list)
        for idx, m in ga.keys.items():
            rest[idx[:position] + idx[position + 1 :]].append((idx[position], m))
        if rest.keys() != gb.keys.keys():
            continue
        ok = True
        for key, pieces in rest.items():
            numbers = sorted(int(n) for n, _ in pieces)
            shapes = {tuple(m.shape) for _, m in pieces}
            whole = tuple(gb.keys[key].shape)
            if numbers != list(range(len(numbers))) or len(shapes) != 1:
                ok = False
                break
            if whole != (len(numbers), *shapes.pop()):
                ok = False
                break
        if ok:
            return position
    return None


_CAPTURES = "ijklmn"


def _pattern(template: tuple[str, ...], gather: int | None = None) -> str:
    """A rule pattern for a template: its numbers as captures `{i}`, `{j}`… (`gather`: the
    number that numbers pieces is `{e}`, a capture the target does not use)."""
    out, n = [], 0
    for seg in template:
        if seg == "{}":
            out.append(
                "{e}"
                if n == gather
                else "{" + _CAPTURES[n - (gather is not None and n > gather)] + "}"
            )
            n += 1
        else:
            out.append(seg.replace("{", "{{").replace("}", "}}"))
    return ".".join(out)


def _renames(engine: _Engine, fold: bool) -> list[Suggested]:
    """Renames for the pairs whose names differ: the shortest heads (leading segments, with
    their numbers as captures) under which every source key goes the same way."""
    pairs = {a: b for a, b in engine.pairs.items() if a != b}
    if not pairs:
        return []
    skipped = set(engine.skips)  # dropped before any rename sees them
    everyone = {
        a: engine.pairs.get(a)
        for a in engine.names
        if a not in engine.consumed and a not in skipped
    }
    leaves = _leaf_renames(pairs, everyone) if fold else []
    for leaf in leaves:
        for k, _ in leaf[2]:
            pairs.pop(k)
    by_first: dict[str, list[str]] = defaultdict(list)
    for a in everyone:
        by_first[a.split(".", 1)[0]].append(a)
    rules: list[tuple[Any, str, list[tuple[str, str]]]] = list(leaves)
    todo = [(a, b, 0) for a, b in sorted(pairs.items())]
    done: set[str] = set()
    while todo:
        a, b, cut = todo.pop(0)
        if a in done:
            continue
        head_a, head_b = _heads(a, b, cut if fold else len(a.split(".")))
        pattern, target = _capture(head_a, head_b)
        rule = compile_rule(0, Rename(pattern, target))
        covered, consistent = [], True
        # a pattern that starts with a capture may match a key under any first segment
        under = everyone if pattern.startswith("{") else by_first[head_a[0]]
        for k in under:
            new = rule.step(k)
            if not isinstance(new, str):
                continue
            if everyone.get(k) != new:
                consistent = False
                break
            covered.append((k, new))
        if not consistent:
            todo.insert(0, (a, b, cut + 1))
            continue
        done.update(k for k, _ in covered)
        rules.append((pattern, target, covered))
    out = []
    for pattern, target, covered in _in_order(rules):
        out.append(_rename_evidence(engine, pattern, target, covered))
    return out


def _rename_evidence(engine: _Engine, pattern: Any, target: str, covered: list) -> Suggested:
    """A rename with what it moves (heads, an example with its shape) and how it was told."""
    if not isinstance(pattern, str):  # a leaf rename, by regex
        first = covered[0]
        old, new = first[0].rsplit(".", 1)[1], target.rsplit(".", 1)[1]
        said = (
            f"{len(covered)} keys end in .{old} where the target's end in .{new}, the rest "
            f"alike (e.g. {first[0]} {_shape(engine.meta(first[0]))})"
        )
        return Suggested(Rename(pattern, target), said, len(covered))
    depth = pattern.count(".") + 1
    heads = [".".join(k.split(".")[:depth]) for k, _ in covered]
    theirs = [
        ".".join(b.split(".")[: len(b.split(".")) - len(k.split(".")) + depth]) for k, b in covered
    ]
    first = covered[0]
    said = (
        f"{len(covered)} key{'s' * (len(covered) != 1)} under "
        f"{', '.join(k for k, _ in collapse_keys(heads))} -> "
        f"{', '.join(k for k, _ in collapse_keys(theirs))} "
        f"(e.g. {first[0]} {_shape(engine.meta(first[0]))})"
    )
    scores = [
        engine.evidence[t] for t in {_template(b)[0] for _, b in covered} if t in engine.evidence
    ]
    confidence = "certain"
    if scores:
        best = min(s[1] for s in scores)
        rivals = sorted((r for s in scores for r in s[2]), key=lambda r: (-r[1], r[0]))
        said += f"; names {best:.2f} alike"
        if rivals:
            said += f", next best {_text(rivals[0][0])} ({rivals[0][1]:.2f})"
            if best - rivals[0][1] < 0.3:
                confidence = "likely"
    elif any(engine.names[k] != k or b != k for k, b in covered):
        said += "; aligned by what the entries hold" if engine.shifted else ""
    return Suggested(Rename(pattern, target), said, len(covered), confidence)


def _leaf_renames(pairs: dict[str, str], everyone: dict[str, Any]) -> list[tuple[Any, str, list]]:
    """Keys that differ only in their last segment, the same way everywhere (legacy
    `gamma`/`beta` for `weight`/`bias`): one regex rename for all of them."""

    groups: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)
    for a, b in pairs.items():
        sa, sb = a.rsplit(".", 1), b.rsplit(".", 1)
        if len(sa) == 2 and len(sb) == 2 and sa[0] == sb[0] and sa[1] != sb[1]:
            groups[(sa[1], sb[1])].append((a, b))
    out = []
    for (leaf_a, leaf_b), items in sorted(groups.items()):
        under = {k for k in everyone if k.endswith("." + leaf_a)}
        if len(items) >= 2 and under == {a for a, _ in items}:
            out.append((regex(rf"(.+)\.{re.escape(leaf_a)}"), "{1}." + leaf_b, items))
    return out


def _in_order(rules: list[tuple[Any, str, list]]) -> list[tuple[Any, str, list]]:
    """Renames in an order where none renames again what an earlier one made (a list whose
    entries moved up by one is renamed from its end)."""
    compiled = [compile_rule(0, Rename(p, t)) for p, t, _ in rules]
    # which rules could match a name, by its first segment (a regex or a capture: any)
    by_first: dict[str, list[int]] = defaultdict(list)
    anywhere: list[int] = []
    for j, (p, _, _) in enumerate(rules):
        first = p.split(".", 1)[0] if isinstance(p, str) else "{"
        (anywhere if "{" in first or "*" in first else by_first[first]).append(j)
    before: dict[int, set[int]] = {i: set() for i in range(len(rules))}
    after: dict[int, set[int]] = defaultdict(set)
    for i, (_, _, covered) in enumerate(rules):
        for _, new in covered:
            for j in (*by_first.get(new.split(".", 1)[0], ()), *anywhere):
                if i != j and j not in before[i] and isinstance(compiled[j].step(new), str):
                    before[i].add(j)  # j would rename what i makes: j goes first
                    after[j].add(i)
    order: list[int] = []
    ready = sorted(i for i, deps in before.items() if not deps)
    while ready:
        i = ready.pop(0)
        order.append(i)
        for k in sorted(after.get(i, ())):
            before[k].discard(i)
            if not before[k] and k not in order and k not in ready:
                ready.append(k)
        ready.sort()
    order += [i for i in range(len(rules)) if i not in order]  # a cycle: verification says so
    return [rules[i] for i in order]


def _heads(a: str, b: str, cut: int) -> tuple[list[str], list[str]]:
    """The leading segments that differ, with `cut` more of the common tail kept."""
    sa, sb = a.split("."), b.split(".")
    common = 0
    while common < min(len(sa), len(sb)) and sa[-1 - common] == sb[-1 - common]:
        common += 1
    common = max(0, min(common - cut, len(sa) - 1, len(sb) - 1))
    return sa[: len(sa) - common], sb[: len(sb) - common]


def _capture(head_a: list[str], head_b: list[str]) -> tuple[str, str]:
    """A rename pattern and target for two heads: numbers the target keeps become captures."""
    names: dict[str, str] = {}
    pattern = []
    for seg in head_a:
        if seg.isdigit() and seg not in names:
            names[seg] = _CAPTURES[len(names)] if len(names) < len(_CAPTURES) else f"n{len(names)}"
            pattern.append("{" + names[seg] + "}")
        else:
            pattern.append(_escape(seg))
    target = ["{" + names[s] + "}" if s in names else _escape(s) for s in head_b]
    used = {s for s in head_b if s in names}
    # a number the target does not use stays literal in the pattern
    pattern = [
        p
        if not (p.startswith("{") and p[1:-1] in names.values()) or _seg_of(p, names) in used
        else _seg_of(p, names)
        for p in pattern
    ]
    return ".".join(pattern), ".".join(target)


def _seg_of(p: str, names: dict[str, str]) -> str:
    return next(seg for seg, n in names.items() if "{" + n + "}" == p)


def _escape(seg: str) -> str:
    return seg.replace("{", "{{").replace("}", "}}")


def _folded_inits(engine: _Engine) -> list[Suggested]:
    """`init` for the target keys nothing provides, folded to whole modules where every key
    under one is new."""
    new = set(engine.inits)
    out = []
    for pattern, under in _fold_keys(new, set(engine.tgt) - new):
        said = ", ".join(k for k, _ in collapse_keys(under))
        same = [n for n in engine.names if n in new]
        moved = [n for n in engine.names if n in under and engine.pairs.get(n, n) != n]
        if moved:
            why = f"{said}: new (the source's {moved[0]} goes to {engine.pairs[moved[0]]})"
        elif any(n in under for n in same):
            shown = [n for n in same if n in under][:2]
            shapes = ", ".join(
                f"{n} {_shape(engine.meta(n))} vs {_shape(engine.tgt[n])}" for n in shown
            )
            why = f"{said}: the source's are of other shapes ({shapes}): the target's are new"
        else:
            why = f"nothing in the source provides {said}"
        out.append(Suggested(Init(pattern), why, len(under)))
    return out


def _fold_keys(keys: set[str], others: set[str]) -> list[tuple[str, list[str]]]:
    """Patterns that match all of `keys` and none of `others`: the shortest module heads,
    then numbers as `*` where that matches no other key."""

    heads: dict[str, list[str]] = {}
    prefixes: set[str] = set()
    for o in others:
        segs = o.split(".")
        prefixes.update(".".join(segs[:n]) for n in range(1, len(segs) + 1))
    for key in sorted(keys):
        segs = key.split(".")
        head = next(
            (".".join(segs[:n]) for n in range(1, len(segs)) if ".".join(segs[:n]) not in prefixes),
            key,
        )
        heads.setdefault(head, []).append(key)
    folded: dict[str, list[str]] = {}
    for head, under in heads.items():
        star = ".".join("*" if seg.isdigit() else seg for seg in head.split("."))
        pattern = head
        if star in folded:
            pattern = star
        elif star != head:
            matcher = Matcher(_escape(star))
            if not any(matcher.match(o) for o in others):
                pattern = star
        folded.setdefault(pattern, []).extend(under)
    return list(folded.items())


def _fold_transposes(out: list[Suggested]) -> list[Suggested]:
    """One `transform` a template for transposes of numbered keys."""
    kept, groups = [], defaultdict(list)
    for s in out:
        if isinstance(s.statement, Transform):
            tpl, _ = _template(s.statement.pattern.text)
            groups[tpl].append(s)
        else:
            kept.append(s)
    for tpl, items in groups.items():
        if len(items) == 1:
            kept.append(items[0])
            continue
        first = items[0]
        kept.append(
            Suggested(
                Transform(_pattern(tpl), first.statement.ops),  # type: ignore[attr-defined]
                f"{len(items)} keys {_text(tpl, [_template(i.statement.pattern.text)[1] for i in items])}: "  # type: ignore[attr-defined]
                + first.evidence.split(": ", 1)[1],
                len(items),
                min((i.confidence for i in items), key=lambda c: c != "likely"),
            )
        )
    return kept


def _verify(
    suggested: list[Suggested], src: dict[str, TensorMeta], tgt: dict[str, TensorMeta]
) -> tuple[Plan, list[Suggested]]:
    """Plan the file against the target; drop rules that go unused, and plan again."""
    for _ in range(3):
        program = compile(Ruleset(rules=tuple(s.statement for s in suggested)))
        plan = program.plan(src, tgt, on_unused="ignore", on_missing="warn", on_unexpected="warn")
        if not plan.unused_rules:
            return plan, suggested
        unused = set(plan.unused_rules)
        suggested = [s for i, s in enumerate(suggested) if i not in unused]
    return plan, suggested
