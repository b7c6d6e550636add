"""The `ckptmap` command line.

Exit status: 0 the plan is clean under its policies; 1 the plan has problems;
2 usage, rule syntax or file errors. Expected errors print one message, no
traceback (`--debug` shows it).
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import CkptmapError, PlanError

if TYPE_CHECKING:
    from .io import Checkpoint
    from .plan import Plan

app = typer.Typer(
    help="Load pretrained PyTorch checkpoints into changed architectures, by rules.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
_state = {"debug": False}

RulesArg = Annotated[list[Path], typer.Argument(help="Rule files (.ckmap/.yaml/.json), in order.")]
SourceOpt = Annotated[
    Path, typer.Option("--source", "-s", help="The checkpoint to map (a file or a model folder).")
]
SelectOpt = Annotated[
    str | None,
    typer.Option(
        "--select", help="Which nested weights of a training checkpoint (model, ema.module)."
    ),
]
TargetOpt = Annotated[
    str | None,
    typer.Option(
        "--target",
        "-t",
        help="Validate against: a checkpoint, a {name: shape} JSON file, or package.module:factory.",
    ),
]


StrictOpt = Annotated[
    bool,
    typer.Option(
        "--strict",
        help="Rules that match nothing are errors, whatever the files' `on unused` says.",
    ),
]
OutOpt = Annotated[
    Path, typer.Option("--out", "-o", help="Where to write: a .safetensors or .pt file.")
]
ShardSizeOpt = Annotated[
    str | None,
    typer.Option(help="Write a sharded folder (--out) with shards of at most this (5GB)."),
]
HashSourceOpt = Annotated[
    bool, typer.Option(help="Record the source files' sha256 in the output's metadata.")
]
ReportOpt = Annotated[Path | None, typer.Option(help="Also write the report as JSON.")]
HtmlOpt = Annotated[
    Path | None,
    typer.Option("--html", help="Also write it as one self-contained HTML page (works offline)."),
]
ReplaceHtmlOpt = Annotated[bool, typer.Option("--overwrite", help="Replace --html if it exists.")]
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="Replace --out and --report if they exist.")
]


class _Console(Console):
    """Key names come from files: control characters (a terminal's escape sequences),
    format characters and lone surrogates are printed as escapes, never as they are."""

    def print(self, *objects: Any, **kwargs: Any) -> None:
        super().print(*(visible(o) if isinstance(o, str) else o for o in objects), **kwargs)


def visible(text: str) -> str:
    """`text` with every character that would act on a terminal (or cannot be encoded)
    written as a Python escape; line breaks and tabs kept."""
    if text.isprintable():
        return text
    return "".join(
        c if c in "\n\t" or c.isprintable() else c.encode("unicode_escape").decode("ascii")
        for c in text
    )


def out() -> Console:
    return _Console(highlight=False, soft_wrap=True, emoji=False)


def err() -> Console:
    return _Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)


def print_table(console: Console, table: Table) -> None:
    """A table; off a terminal (a file, a pipe) as wide as its longest row, so that no key
    name is ever wrapped."""
    if console.is_terminal:
        console.print(table)
        return
    narrow = console.width
    console.width = 1 << 16
    console.width = max(narrow, console.measure(table).maximum)
    try:
        with console.capture() as captured:
            console.print(table)
    finally:
        console.width = narrow
    for line in captured.get().splitlines():  # no padding after the last column
        console.print(line.rstrip(), markup=False, highlight=False)


def _run(fn: Any) -> None:
    """Run a command body: expected errors become one message and an exit status."""
    try:
        fn()
    except PlanError as e:
        if _state["debug"]:
            raise
        err().print(e.render(), markup=False)
        raise typer.Exit(1) from None
    except CkptmapError as e:
        if _state["debug"]:
            raise
        err().print(e.render(), markup=False)
        raise typer.Exit(2) from None
    except ModuleNotFoundError as e:
        from .errors import is_torch_missing, torch_missing

        if _state["debug"] or not is_torch_missing(e):
            raise
        command = fn.__qualname__.split(".")[0]  # the command whose body this is
        err().print(torch_missing(f"ckptmap {command}").render(), markup=False)
        raise typer.Exit(2) from None


@app.callback()
def _main(debug: Annotated[bool, typer.Option(help="Show tracebacks.")] = False) -> None:
    _state["debug"] = debug


# --- check / fmt / schema ---------------------------------------------------------------------


@app.command()
def check(
    rules: Annotated[
        list[Path],
        typer.Argument(help="Rule files (.ckmap/.yaml/.json), or history folders (migrations/)."),
    ],
) -> None:
    """Parse and compile rule files; report errors with their line and column. A folder is a
    revision history: its graph and every step against its parent's schema, strictly."""

    def body() -> None:
        from .compile import compile

        for path in rules:
            if path.is_dir():
                hist = _history(path)
                hist.check()
                out().print(
                    f"{path}: ok, {len(hist.steps)} revisions from {hist.base} to {hist.head}, "
                    f"{hist.fingerprint(hist.head)[:19]}",
                    markup=False,
                )
                continue
            program = compile(path)
            out().print(f"{path}: ok, {len(program.rules)} rules, {program.fingerprint[:19]}")

    _run(body)


@app.command()
def fmt(
    rules: RulesArg,
    check: Annotated[
        bool, typer.Option("--check", help="Change nothing; exit 1 if a file would change.")
    ] = False,
) -> None:
    """Rewrite .ckmap files in canonical form (comments kept)."""

    def body() -> None:
        from .errors import RuleSyntaxError
        from .io import refuse_special
        from .io.write import write_text_atomically
        from .limits import check_text_size
        from .syntax import format_text

        changed = []
        for path in rules:
            if path.suffix != ".ckmap":
                raise RuleSyntaxError(f"{path}: fmt formats .ckmap files", code="CKM111")
            try:
                refuse_special(path, RuleSyntaxError)
                check_text_size(path, RuleSyntaxError, "CKM112")
                text = path.read_text(encoding="utf-8")
            except OSError as e:
                raise RuleSyntaxError(
                    f"{path}: cannot read ({e.strerror})", code="CKM112"
                ) from None
            new = format_text(text, path)
            if new != text:
                changed.append(path)
                if not check:
                    write_text_atomically(path, new, follow=True)
        verb = "would reformat" if check else "reformatted"
        for path in changed:
            out().print(f"{verb} {path}")
        if check and changed:
            raise typer.Exit(1)

    _run(body)


@app.command()
def schema() -> None:
    """Print the JSON Schema of the YAML/JSON rule file form."""
    from .rules import RulesDocument

    print(json.dumps(RulesDocument.json_schema(), indent=2))


# --- inspect ------------------------------------------------------------------------------------


@app.command()
def inspect(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint file or model folder.")],
    select: SelectOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Keys, shapes and dtypes of a checkpoint, layer ranges collapsed (no tensor data read)."""

    def body() -> None:
        from .io import open_checkpoint

        ckpt = open_checkpoint(checkpoint, select)
        if json_out:
            meta = ckpt.meta()
            tensors = {k: {"shape": list(m.shape), "dtype": m.dtype} for k, m in meta.items()}
            doc = {"tensors": tensors, "metadata": ckpt.metadata, "notes": ckpt.notes}
            print(json.dumps(doc, indent=2))
        else:
            print_inspect(out(), ckpt)

    _run(body)


_DTYPE_SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64"}


def print_inspect(console: Console, ckpt: Checkpoint) -> None:
    from .report import collapse_keys

    meta = ckpt.meta()
    groups: dict[tuple, list[str]] = defaultdict(list)
    for key, m in meta.items():
        groups[(m.shape, m.dtype)].append(key)
    order = {k: i for i, k in enumerate(meta)}
    rows = []
    for (shape, dtype), keys in groups.items():
        for pattern, count in collapse_keys(keys):
            first = next((k for k in keys if _first_match_of(pattern, k)), keys[0])
            rows.append((order[first], pattern, shape, dtype, count))
    table = Table(box=None, show_header=True, header_style="bold")
    for col in ("key", "shape", "dtype", "count"):
        table.add_column(col, justify="right" if col == "count" else "left", overflow="fold")
    for _, pattern, shape, dtype, count in sorted(rows):
        table.add_row(
            escape(visible(pattern)),
            str(list(shape)),
            _DTYPE_SHORT.get(dtype or "", dtype or "?"),
            f"×{count}" if count > 1 else "",  # noqa: RUF001
        )
    print_table(console, table)
    numel = sum(math.prod(m.shape) for m in meta.values())
    size = sum(_nbytes(m.shape, m.dtype) for m in meta.values())
    console.print(f"{len(meta)} tensors, {numel:,} values, {_human(size)}")
    for note in ckpt.notes:
        console.print(f"note: {note}", markup=False)
    _print_provenance(console, ckpt.metadata)
    if ckpt.metadata:
        console.print("metadata:")
        for key, value in sorted(ckpt.metadata.items()):
            console.print(f"  {key}: {_metadata_text(value)}", markup=False)


def _print_provenance(console: Console, metadata: dict[str, str]) -> None:
    """Where a file written by ckptmap came from: its revision and every step that made it."""
    from .history import STAMP_CHAIN, STAMP_HISTORY, STAMP_REVISION

    if "ckptmap.version" in metadata:
        console.print(
            f"written by ckptmap {metadata['ckptmap.version']}, rules "
            f"{metadata.get('ckptmap.rules_fingerprint', '?')[:19]}",
            markup=False,
        )
    if STAMP_REVISION not in metadata:
        return
    console.print(
        f"revision: {metadata[STAMP_REVISION]} (history {metadata.get(STAMP_HISTORY, '?')[:19]})",
        markup=False,
    )
    try:
        hops = json.loads(metadata.get(STAMP_CHAIN, "[]"))
        steps = [f"{'+' if h['direction'] == 'upgrade' else '-'}{h['revision']}" for h in hops]
    except (ValueError, TypeError, KeyError):
        steps = ["(unreadable)"]
    console.print(f"made by: {' '.join(steps) or '(no step)'}", markup=False)


def _metadata_text(value: str) -> str:
    """A metadata value on one line: JSON compacted, long text shortened."""
    with contextlib.suppress(ValueError):
        value = json.dumps(json.loads(value), separators=(", ", ": "))
    return value if len(value) <= 300 else value[:297] + "..."


def _nbytes(shape, dtype: str | None) -> int:
    from .meta import itemsize

    return math.prod(shape) * itemsize(dtype)


def _first_match_of(pattern: str, key: str) -> bool:
    import re

    regex = re.sub(r"\\\{[^}]*\\\}", r"\\d+", re.escape(pattern))
    return re.fullmatch(regex, key) is not None


def _human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"


# --- plan / apply -----------------------------------------------------------------------------


def _target(spec: str | None) -> Any:
    if spec is None:
        return None
    path = Path(spec)
    if path.suffix == ".json" and path.is_file():
        from .errors import CheckpointError
        from .limits import check_keys
        from .meta import TensorMeta

        try:
            data = json.loads(_read_text(path))
        except (ValueError, RecursionError) as e:
            why = "nested too deeply" if isinstance(e, RecursionError) else str(e)[:200]
            raise CheckpointError(f"{path}: not valid JSON ({why})", code="CKM540") from None
        if not isinstance(data, dict):
            raise CheckpointError(
                f"{path}: not a JSON object of {{name: [shape]}}", code="CKM540"
            ) from None
        check_keys(data, str(path))
        for key, shape in data.items():
            if not isinstance(shape, list) or not all(
                type(d) is int and 0 <= d < 2**63 for d in shape
            ):
                raise CheckpointError(
                    f"{path}: {key!r} has the shape {json.dumps(shape)[:80]}, not a list of "
                    "whole numbers >= 0",
                    code="CKM540",
                )
        return {k: TensorMeta(tuple(v)) for k, v in data.items()}
    if path.exists():
        return path
    if ":" in spec:
        return _build_model(spec)
    from .errors import CheckpointError

    raise CheckpointError(
        f"{spec}: no such checkpoint, JSON file or package.module:factory", code="CKM501"
    )


def _build_model(spec: str, on_meta: bool = True) -> Any:
    """`package.module:factory` built, on the meta device unless its tensors are needed
    (shapes without memory)."""
    import importlib

    import torch

    from .errors import CheckpointError

    module_name, _, attr = spec.partition(":")
    # as `python -m` does: modules in the working folder can be imported
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (Exception, SystemExit) as e:  # not found, or the module's own code failed
        raise CheckpointError(
            f"{spec}: cannot import the factory ({type(e).__name__}: {e})",
            code="CKM541",
            hint=f"the module is looked up on the import path and in {Path.cwd()}",
        ) from None
    try:
        with torch.device("meta") if on_meta else contextlib.nullcontext():
            model = factory()
    except (Exception, SystemExit) as e:  # a factory that parses arguments exits, say so
        raise CheckpointError(
            f"{spec}: the factory failed ({type(e).__name__}: {e})",
            code="CKM541",
            hint="the factory is called with no arguments"
            + (", on the meta device" if on_meta else ""),
        ) from None
    if not isinstance(model, torch.nn.Module):
        raise CheckpointError(
            f"{spec}: the factory returned a {type(model).__name__}, not an nn.Module",
            code="CKM541",
        )
    return model


@app.command()
def plan(
    rules: RulesArg,
    source: SourceOpt,
    target: TargetOpt = None,
    select: SelectOpt = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the plan as JSON (apply --plan reads it).")
    ] = False,
    strict: StrictOpt = False,
    html_out: HtmlOpt = None,
    overwrite: ReplaceHtmlOpt = False,
) -> None:
    """Dry run: what every source tensor becomes, from names and shapes only."""

    def body() -> None:
        from .compile import compile
        from .io import open_checkpoint

        if html_out is not None:
            _check_page(html_out, overwrite, [*rules, source, target])
        ckpt = open_checkpoint(source, select)
        program = compile(list(rules))
        if html_out is not None:  # nor over a file the rules include
            _check_page(html_out, True, list(program.files))
        the_plan = program.plan(
            ckpt.describe(), _target(target), on_unused="error" if strict else None
        )
        if html_out is not None:
            from .page import plan_page

            title = f"{', '.join(p.name for p in rules)}: {source.name}"
            _write_page(html_out, plan_page(the_plan, title))
        if json_out:
            print(the_plan.to_json())
        else:
            console = out()
            for note in ckpt.notes:
                console.print(f"note: {note}", markup=False)
            print_plan(console, the_plan)
        if not the_plan.ok:
            raise typer.Exit(1)

    _run(body)


def _check_page(path: Path, overwrite: bool, reads: list) -> None:
    """Before any work: the page goes somewhere writable, over no input, over no file unless
    told to."""
    from .io.write import check_text_destination, refuse_clobbering

    inputs = [("input", Path(p)) for p in reads if p is not None and Path(p).exists()]
    refuse_clobbering([("--html", path)], inputs)
    check_text_destination(path, overwrite)


def _write_page(path: Path, text: str) -> None:
    from .io.write import write_text_atomically

    write_text_atomically(path, text)
    err().print(f"wrote {path} ({len(text.encode()) / 1024:.0f} KiB)", markup=False)


def print_plan(console: Console, the_plan: Plan) -> None:
    """The plan grouped by what happened and which rule decided, key ranges collapsed."""
    from .alloc import no_gc

    with no_gc():  # a line per tensor, then folded: none of it is garbage before the end
        _print_plan(console, the_plan)


def _print_plan(console: Console, the_plan: Plan) -> None:
    from .report import collapse_keys, render_problems, shape_change

    # one group per outcome and the rule that decided it (the last to touch the tensor)
    groups: dict[tuple, list[tuple[str, str]]] = defaultdict(list)
    shapes = {e.source: e.shape for e in the_plan.sources}
    for o in the_plan.outputs:
        made_of = " + ".join(o.sources)
        line = o.target if made_of == o.target else f"{made_of} -> {o.target}"
        shape = shape_change([shapes[s] for s in o.sources if s in shapes], o.shape)
        groups[(o.status, o.reason, o.rules[-1] if o.rules else None)].append((line, shape))
    for e in the_plan.sources:
        if e.reason == "skip":
            groups[("skipped", "skip", e.rules[-1])].append((e.source, str(e.shape)))
    for (status, reason, rule_id), items in groups.items():
        label = status if not reason else f"{status} ({reason})"
        rule = f" via {the_plan.rules[rule_id]}" if rule_id is not None else " (no rule matched)"
        n = len(items)
        console.print(f"[bold]{label}[/bold]{escape(rule)}  [dim]{n} tensor{'s' * (n != 1)}[/dim]")
        by_shape: dict[str, list[str]] = defaultdict(list)
        for line, shape in items:
            by_shape[shape].append(line)
        lines = [(p, shape) for shape, names in by_shape.items() for p, _ in collapse_keys(names)]
        for line, shape in sorted(lines):
            console.print(f"  {line}  {shape}", markup=False)
    counts: dict[str, int] = defaultdict(int)
    for e in the_plan.sources:
        counts[e.status] += 1
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    if the_plan.targets is not None:
        tcounts: dict[str, int] = defaultdict(int)
        for t in the_plan.targets:
            tcounts[t.status] += 1
        summary += "; target: " + ", ".join(f"{n} {k}" for k, n in sorted(tcounts.items()))
    console.print(f"{len(the_plan.sources)} source tensors: {summary}", markup=False)
    for title, found in (("problems", the_plan.errors), ("warnings", the_plan.warnings)):
        if found:
            console.print(f"{title}:")
            for line in render_problems(found, the_plan):
                console.print(f"  {line}", markup=False)
    said = {i for p in the_plan.problems if p.kind == "unused" for i in p.rules}
    for i in the_plan.unused_rules:
        if i not in said:  # optional, or `on unused ignore`: listed, not a problem
            console.print(f"matched nothing: {the_plan.rules[i]}", markup=False)
    console.print(f"plan {the_plan.fingerprint[:19]}  {'ok' if the_plan.ok else 'has problems'}")


@app.command()
def apply(
    rules: Annotated[
        list[Path] | None,
        typer.Argument(help="Rule files (.ckmap/.yaml/.json, or ckptmap:NAME), in order."),
    ] = None,
    source: SourceOpt = ...,  # type: ignore[assignment]
    out_path: OutOpt = ...,  # type: ignore[assignment]
    target: TargetOpt = None,
    select: SelectOpt = None,
    max_shard_size: ShardSizeOpt = None,
    hash_source: HashSourceOpt = False,
    report: ReportOpt = None,
    overwrite: OverwriteOpt = False,
    strict: StrictOpt = False,
    reverse: Annotated[
        bool,
        typer.Option(
            help="Map SOURCE back to the names and layout of --original (undo the rules)."
        ),
    ] = False,
    original: Annotated[
        Path | None,
        typer.Option(
            help="With --reverse: the checkpoint the rules were written for (header read)."
        ),
    ] = None,
    saved_plan: Annotated[
        Path | None,
        typer.Option(
            "--plan",
            help="Run a plan saved by `plan --json` instead of RULES (with --reverse: undo it, "
            "no --original needed).",
        ),
    ] = None,
    allow_lossy: Annotated[
        bool, typer.Option(help="With --reverse: restore what can be, when some steps lose data.")
    ] = False,
) -> None:
    """Map a checkpoint under the rules and write the result atomically.

    With --reverse, write a (fine-tuned) model's weights back under the original
    checkpoint's names and layout: the forward plan is rebuilt from --original's
    header (or read from --plan) and inverted entry by entry.
    """

    options = dict(locals())  # every option, by name, for the body
    _run(lambda: _apply(**options))


def _apply(
    rules,
    source,
    out_path,
    target,
    select,
    max_shard_size,
    hash_source,
    report,
    overwrite,
    strict,
    reverse,
    original,
    saved_plan,
    allow_lossy,
) -> None:
    """`apply`, once typer has read the options."""
    from .io import open_checkpoint
    from .io.write import (
        check_destination,
        check_text_destination,
        parse_size,
        provenance,
        refuse_clobbering,
        write_text_atomically,
    )

    shard_size = parse_size(max_shard_size) if max_shard_size else None
    _check_apply_options(rules, saved_plan, target, strict, original, select, allow_lossy, reverse)
    ckpt = open_checkpoint(source, select)
    program = None
    if saved_plan is None:
        from .compile import compile

        program = compile(list(rules or ()))
        if not reverse and program.revision is not None:  # a step of a history
            from .history import refuse_other_revision

            refuse_other_revision(program, ckpt)
    the_target = None if reverse else _target(target)
    reads = _apply_reads(ckpt, program, saved_plan, target, the_target, original)
    refuse_clobbering([("--out", out_path), ("--report", report)], reads)
    check_destination(out_path, sharded=shard_size is not None, overwrite=overwrite)
    if report is not None:
        check_text_destination(report, overwrite)
    the_plan, rules_fingerprint, said = _apply_plan(
        ckpt, program, saved_plan, the_target, reverse, original, strict, allow_lossy
    )
    metadata = provenance(rules_fingerprint, the_plan.fingerprint, ckpt.files, hash_source)
    written, total = _write_with_progress(the_plan, ckpt, out_path, metadata, shard_size, overwrite)
    the_report = the_plan.report(frozen=[])  # a file has no requires_grad
    if report is not None:
        write_text_atomically(report, the_report.model_dump_json(indent=2) + "\n")
    console = out()  # printed once every file is written: a reader that goes away
    for line in said:  # (`| head`) must not stop the writing
        console.print(line, markup=False)
    console.print(str(the_report), markup=False)
    console.print(
        f"wrote {out_path} ({len(written)} file{'s' * (len(written) != 1)}, {_human(total)})"
    )


def _check_apply_options(
    rules, saved_plan, target, strict, original, select, allow_lossy, reverse
) -> None:
    """Options that contradict each other, refused before anything is opened."""
    if rules and saved_plan is not None:
        raise typer.BadParameter("give RULES or --plan, not both", param_hint="--plan")
    if not rules and saved_plan is None:
        raise typer.BadParameter("name the rule files (RULES) or a saved --plan")
    if saved_plan is not None:
        for given, name in (
            (target, "--target"),
            (strict, "--strict"),
            (original, "--original"),
            (select, "--select"),
        ):
            if given:
                raise typer.BadParameter(
                    "a saved plan already says what happens to every key: "
                    f"{name} belongs to `ckptmap plan` when the plan is made",
                    param_hint=name,
                )
    if allow_lossy and not reverse:
        raise typer.BadParameter("--allow-lossy goes with --reverse", param_hint="--allow-lossy")
    if reverse and saved_plan is None and original is None:
        raise typer.BadParameter(
            "--reverse needs --original, the checkpoint the rules were written for "
            "(or --plan, the forward plan saved by `plan --json`)",
            param_hint="--original",
        )


def _apply_reads(ckpt, program, saved_plan, target, the_target, original) -> list:
    """Every path `apply` reads, by role: what no output may touch."""
    from .io import open_checkpoint

    reads: list[tuple[str, Path | None]] = [("source", p) for p in (ckpt.path, *ckpt.files)]
    if saved_plan is not None:
        reads.append(("saved plan", saved_plan))
    if program is not None:
        reads += [("rule file", p) for p in program.files]
    if isinstance(the_target, Path):
        reads += [("target", p) for p in (the_target, *open_checkpoint(the_target).files)]
    elif target is not None and Path(target).is_file():
        reads.append(("target", Path(target)))  # a {name: shape} JSON file
    if original is not None:
        reads += [("original", p) for p in (original, *open_checkpoint(original).files)]
    return reads


def _apply_plan(ckpt, program, saved_plan, the_target, reverse, original, strict, allow_lossy):
    """The plan `apply` runs (made from the rules, read from --plan, or inverted), its rules'
    fingerprint, and the notes to print after the writing."""
    from .io import open_checkpoint
    from .plan import Plan

    said: list[str] = []
    unused = "error" if strict else None
    if saved_plan is not None:
        forward = Plan.from_json(_read_text(saved_plan), saved_plan)
        rules_fingerprint = forward.rules_fingerprint
    else:
        rules_fingerprint = program.fingerprint
    if reverse:
        if saved_plan is None:
            # keys of SOURCE that the original never had (a new head) are left out
            forward = program.plan(
                open_checkpoint(original).describe(),
                ckpt.describe(),
                on_missing="ignore",
                on_unused=unused,
            ).check()
        the_plan = forward.inverse(allow_lossy=allow_lossy)
        said += [f"warning: {problem.message}" for problem in the_plan.warnings]
    elif saved_plan is not None:
        the_plan = forward.check()
    else:
        the_plan = program.plan(ckpt.describe(), the_target, on_unused=unused).check()
    if reverse or saved_plan is not None:  # a plan not made from SOURCE may leave keys out
        from .report import collapse_keys

        used = {e.source for e in the_plan.sources}
        extra = [k for k in ckpt.meta() if k not in used]
        if extra:
            keys = ", ".join(p for p, _ in collapse_keys(extra))
            why = "from the original" if saved_plan is None else "in the saved plan"
            said.insert(0, f"note: left out, not {why}: {keys}")
    said += [f"note: {note}" for note in ckpt.notes]  # known once the checkpoint is opened
    return the_plan, rules_fingerprint, said


def _write_with_progress(the_plan, ckpt, out_path, metadata, shard_size, overwrite):
    """Write the plan's output, with a progress bar over bytes on a terminal."""
    from .apply import write_plan

    total = sum(_nbytes(o.shape, o.dtype) for o in the_plan.outputs if o.status == "loaded")
    with _progress(total) as on_bytes:
        written = write_plan(
            the_plan,
            ckpt,
            out_path,
            metadata=metadata,
            max_shard_size=shard_size,
            on_bytes=on_bytes,
            overwrite=overwrite,
        )
    return written, total


@contextlib.contextmanager
def _progress(total: int | None) -> Any:
    """A progress bar over bytes on a terminal (none off one): yields the `on_bytes` call."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err(), disable=not err().is_terminal) as progress:
        task = progress.add_task("writing", total=total)
        yield lambda n: progress.advance(task, n)


def _read_text(path: Path) -> str:
    from .errors import CheckpointError
    from .io import refuse_special
    from .limits import check_text_size

    refuse_special(path)
    check_text_size(path)
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read ({e})", code="CKM501") from None


# --- suggest ------------------------------------------------------------------------------------


@app.command()
def suggest(
    source: SourceOpt,
    target: Annotated[
        str,
        typer.Option(
            "--target",
            "-t",
            help="What to map onto: a checkpoint, a {name: shape} JSON file, or package.module:factory.",
        ),
    ],
    select: SelectOpt = None,
    out_path: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write the rule file here.")
    ] = None,
    overwrite: OverwriteOpt = False,
    json_out: Annotated[
        bool, typer.Option("--json", help="The rules, evidence, unresolved keys as JSON.")
    ] = False,
    hint: Annotated[
        list[str] | None,
        typer.Option("--hint", help="A rename you know, applied first: 'old -> new'."),
    ] = None,
) -> None:
    """Write the rule file that maps SOURCE onto TARGET, from names and shapes alone, each
    rule with its evidence; what two candidates fit equally is listed as unresolved. Exit 1
    when something is unresolved or the verifying plan has problems."""

    def body() -> None:
        from .io import open_checkpoint
        from .io.write import check_text_destination, refuse_clobbering, write_text_atomically
        from .suggest import suggest as find

        ckpt = open_checkpoint(source, select)
        the_target = _target(target)
        if out_path is not None:
            reads: list[tuple[str, Path | None]] = [("source", p) for p in (ckpt.path, *ckpt.files)]
            if isinstance(the_target, Path):
                reads.append(("target", the_target))
            elif Path(target).is_file():
                reads.append(("target", Path(target)))
            refuse_clobbering([("--out", out_path)], reads)
            check_text_destination(out_path, overwrite)
        found = find(ckpt, the_target, hint or ())
        console = out()
        if json_out:
            print(found.to_json())
        elif out_path is None:
            console.print(found.to_text(), markup=False, end="")
        if out_path is not None:
            write_text_atomically(out_path, found.to_text())
            (err() if json_out else console).print(f"wrote {out_path}", markup=False)
        said = err() if out_path is None and not json_out else console
        if not json_out:
            said.print(found.summary(), markup=False)
        if not found.ok:
            raise typer.Exit(1)

    _run(body)


# --- revision histories -----------------------------------------------------------------------

HistoryOpt = Annotated[
    Path, typer.Option("--history", help="The history: a folder of revision steps (migrations/).")
]
FromOpt = Annotated[
    str | None,
    typer.Option("--from", help="The revision SOURCE is at, when its stamp and schema cannot say."),
]


def _history(folder: Path) -> Any:
    from .history import History

    return History(folder)


@app.command()
def history(
    folder: Annotated[Path, typer.Argument(help="A folder of revision steps.")],
    html_out: HtmlOpt = None,
    overwrite: ReplaceHtmlOpt = False,
) -> None:
    """Draw a history: its revisions from base to head, merges, and what each step changes."""

    def body() -> None:
        if html_out is not None:
            _check_page(html_out, overwrite, [folder])
        hist = _history(folder)
        summaries = {s.revision: s for s in hist.check()}
        if html_out is not None:
            from .page import history_page

            _write_page(html_out, history_page(hist, f"history: {folder.name}"))
        console = out()
        console.print(
            f"{folder}: {len(hist.steps)} revisions, base {hist.base}, head {hist.head}",
            markup=False,
        )
        width = max(len(r) for r in hist.order)
        for rev in reversed(hist.order):  # newest first, as `git log` and `alembic history`
            s = summaries[rev]
            mark = "@" if rev == hist.head else "o"
            kind = "merge " if len(s.parents) > 1 else ""
            if not s.parents:
                said = f"base, {s.tensors} tensors"
            else:
                changes = ", ".join(f"{n} {k}" for k, n in s.changes.items() if n) or "no change"
                said = f"{kind}from {', '.join(s.parents)}: {changes}"
            console.print(f"{mark} {rev.ljust(width)}  {said}", markup=False)

    _run(body)


@app.command()
def current(
    source: Annotated[Path, typer.Argument(help="A checkpoint file or model folder.")],
    history: HistoryOpt = ...,  # type: ignore[assignment]
    select: SelectOpt = None,
) -> None:
    """Name the revision a checkpoint is at (its stamp, else the schema it matches); exit 1
    when it is at none."""

    def body() -> None:
        from .io import open_checkpoint

        found = _history(history).current(open_checkpoint(source, select))
        out().print(f"{source}: {found}", markup=False)
        if found.revision is None:
            raise typer.Exit(1)

    _run(body)


@app.command()
def upgrade(
    source: Annotated[Path, typer.Argument(help="The checkpoint to upgrade.")],
    history: HistoryOpt = ...,  # type: ignore[assignment]
    out_path: OutOpt = ...,  # type: ignore[assignment]
    to: Annotated[str, typer.Option(help="The revision to reach (head, or an id).")] = "head",
    from_: FromOpt = None,
    target: Annotated[
        str | None,
        typer.Option(
            "--target",
            "-t",
            help="The model at --to (package.module:factory): checked against, and the "
            "tensors a step introduces without a fill are taken from it.",
        ),
    ] = None,
    select: SelectOpt = None,
    max_shard_size: ShardSizeOpt = None,
    hash_source: HashSourceOpt = False,
    report: ReportOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Upgrade a checkpoint through the history's steps, in one pass, to a stamped file."""
    options = dict(locals())
    _run(lambda: _migrate_file(**options, downgrade=False, allow_lossy=False))


@app.command()
def downgrade(
    source: Annotated[Path, typer.Argument(help="The checkpoint to downgrade.")],
    history: HistoryOpt = ...,  # type: ignore[assignment]
    out_path: OutOpt = ...,  # type: ignore[assignment]
    to: Annotated[str, typer.Option(help="The older revision to go back to.")] = ...,  # type: ignore[assignment]
    from_: FromOpt = None,
    select: SelectOpt = None,
    allow_lossy: Annotated[
        bool, typer.Option(help="Go back even where a step loses data (said as warnings).")
    ] = False,
    max_shard_size: ShardSizeOpt = None,
    hash_source: HashSourceOpt = False,
    report: ReportOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Take a checkpoint back to an older revision: the exact inverse of the upgrade."""
    options = dict(locals())
    _run(lambda: _migrate_file(**options, target=None, downgrade=True))


def _migrate_file(
    *,
    source,
    history,
    out_path,
    to,
    from_,
    target,
    select,
    max_shard_size,
    hash_source,
    report,
    overwrite,
    downgrade,
    allow_lossy,
) -> None:
    """`upgrade` and `downgrade`: the paths checked, the file written, the report printed."""
    from .io import open_checkpoint
    from .io.write import (
        check_destination,
        check_text_destination,
        parse_size,
        refuse_clobbering,
        write_text_atomically,
    )

    shard_size = parse_size(max_shard_size) if max_shard_size else None
    hist = _history(history)
    ckpt = open_checkpoint(source, select)
    model = _build_model(target, on_meta=False) if target else None
    reads = [("source", p) for p in (ckpt.path, *ckpt.files)]
    # the whole folder: its steps, their includes, schemas; a file dropped in it would be
    # read as a step next time
    reads += [("history folder", hist.path)]
    reads += [("history step", f) for s in hist.steps.values() for f in s.program.files]
    refuse_clobbering([("--out", out_path), ("--report", report)], reads)
    check_destination(out_path, sharded=shard_size is not None, overwrite=overwrite)
    if report is not None:
        check_text_destination(report, overwrite)
    with _progress(None) as on_bytes:
        the_plan, written = hist.write(
            ckpt,
            out_path,
            to,
            downgrade=downgrade,
            from_=from_,
            model=model,
            allow_lossy=allow_lossy,
            max_shard_size=shard_size,
            overwrite=overwrite,
            hash_source=hash_source,
            on_bytes=on_bytes,
        )
    the_report = the_plan.report(frozen=[])
    if report is not None:
        write_text_atomically(report, the_report.model_dump_json(indent=2) + "\n")
    console = out()
    console.print(str(the_report), markup=False)
    total = sum(_nbytes(o.shape, o.dtype) for o in the_plan.outputs if o.status == "loaded")
    console.print(
        f"wrote {out_path} at {hist.resolve(to)} ({len(written)} file"
        f"{'s' * (len(written) != 1)}, {_human(total)})",
        markup=False,
    )


@app.command()
def revision(
    folder: Annotated[Path, typer.Argument(help="The history folder (made when --base is given).")],
    message: Annotated[str, typer.Option("--message", "-m", help="What the step changes.")] = ...,  # type: ignore[assignment]
    rev_id: Annotated[
        str | None, typer.Option("--id", help="The revision id (default: NNNN-words-of-message).")
    ] = None,
    base: Annotated[
        str | None,
        typer.Option(
            help="Start a history: the base revision and its schema, from a checkpoint, a {name: shape} JSON file or "
            "package.module:factory."
        ),
    ] = None,
    target: Annotated[
        str | None,
        typer.Option(
            "--target",
            "-t",
            help="The new revision's schema, from a checkpoint, a {name: shape} JSON file or package.module:factory "
            "(needed when the step adds tensors).",
        ),
    ] = None,
    autogenerate: Annotated[
        bool,
        typer.Option(help="Fill the step's rules with `suggest` from the head's schema to -t's."),
    ] = False,
) -> None:
    """Write a new step file whose parent is the head (the rules are left for you), or with
    --base the first revision of a new history and its schema snapshot."""

    def body() -> None:
        from .history import new_revision

        written = new_revision(
            folder,
            message,
            rev_id,
            base=_target(base) if base else None,
            schema=_target(target) if target else None,
            autogenerate=autogenerate,
        )
        for path in written:
            out().print(f"wrote {path}", markup=False)

    _run(body)


@app.command()
def diff(
    a: Annotated[Path, typer.Argument(help="A checkpoint file or folder.")],
    b: Annotated[Path, typer.Argument(help="Another one.")],
    values: Annotated[
        bool,
        typer.Option(
            "--values", help="Also compare the values of tensors in both (one tensor at a time)."
        ),
    ] = False,
    atol: Annotated[float, typer.Option(help="With --values: absolute tolerance.")] = 0.0,
    rtol: Annotated[float, typer.Option(help="With --values: tolerance relative to B.")] = 0.0,
) -> None:
    """What differs between two checkpoints: names, shapes, dtypes and, with --values, values.

    Exit 1 when anything differs (values: past |a - b| <= atol + rtol * |b|; NaN equals NaN).
    """

    def body() -> None:
        from .io import open_checkpoint
        from .report import collapse_keys

        ckpt_a, ckpt_b = open_checkpoint(a), open_checkpoint(b)
        meta_a, meta_b = ckpt_a.meta(), ckpt_b.meta()
        console = out()
        only_a = [k for k in meta_a if k not in meta_b]
        only_b = [k for k in meta_b if k not in meta_a]
        changed = [k for k in meta_a if k in meta_b and meta_a[k] != meta_b[k]]
        for title, keys in ((f"only in {a.name}", only_a), (f"only in {b.name}", only_b)):
            if keys:
                console.print(f"{title} ({len(keys)}):", markup=False)
                for pattern, count in collapse_keys(keys):
                    console.print(
                        f"  {pattern}" + (f"  ×{count}" if count > 1 else ""),  # noqa: RUF001
                        markup=False,
                    )
        if changed:
            console.print(f"changed ({len(changed)}):")
            groups: dict[tuple, list[str]] = defaultdict(list)
            for k in changed:
                groups[(meta_a[k], meta_b[k])].append(k)
            for (ma, mb), keys in groups.items():
                for pattern, _ in collapse_keys(keys):
                    console.print(
                        f"  {pattern}  {list(ma.shape)} {ma.dtype} -> {list(mb.shape)} {mb.dtype}",
                        markup=False,
                    )
        same = len(meta_a) - len(only_a) - len(changed)
        console.print(f"{same} tensors with the same name, shape and dtype")
        differ = []
        for name, tol in (("--atol", atol), ("--rtol", rtol)):
            if not (math.isfinite(tol) and tol >= 0):
                raise typer.BadParameter(f"{tol}: a tolerance is a number >= 0", param_hint=name)
        if values:
            from .errors import is_torch_missing, torch_missing
            from .values import compare

            common = [k for k in meta_a if k in meta_b and k not in changed]
            try:
                differ = compare(ckpt_a, ckpt_b, common, atol, rtol) if common else []
            except ModuleNotFoundError as e:
                if not is_torch_missing(e):
                    raise
                raise torch_missing("ckptmap diff --values") from None
            if differ:
                console.print(f"values differ ({len(differ)}):")
                for d in differ:
                    console.print(f"  {d}", markup=False)
            tolerance = "equal" if atol == rtol == 0 else f"within atol={atol:g}, rtol={rtol:g}"
            console.print(f"{len(common) - len(differ)} of them {tolerance}", markup=False)
        if only_a or only_b or changed or differ:
            raise typer.Exit(1)

    _run(body)


@app.command()
def demo(
    keep: Annotated[
        Path | None,
        typer.Option(help="Write the demo's files into this new folder and leave them there."),
    ] = None,
) -> None:
    """Fine-tune recipe end to end on a built-in example (no downloads)."""

    def body() -> None:
        from .demo import run
        from .errors import CheckpointError

        if keep is not None:
            if keep.exists() and (not keep.is_dir() or any(keep.iterdir())):
                raise CheckpointError(
                    f"{keep}: already exists; --keep needs a new or empty folder", code="CKM533"
                )
            keep.mkdir(parents=True, exist_ok=True)
        run(out(), keep)
        if keep is not None:
            out().print(f"the demo's files are in {keep}", markup=False)

    _run(body)


@app.command("rules")
def list_rules() -> None:
    """The rule files that ship with ckptmap: use them as ckptmap:NAME anywhere a rule file goes."""
    from .shipped import SHIPPED_PREFIX, describe_rule_file, shipped_rules

    table = Table(box=None, show_header=True, header_style="bold")
    table.add_column("name")
    table.add_column("what it is for")
    for name, path in shipped_rules().items():
        table.add_row(escape(SHIPPED_PREFIX + name), escape(describe_rule_file(path)))
    print_table(out(), table)


def _give_back_freed_tensors() -> None:
    """Have glibc serve every allocation of 4 MiB or more (a tensor) with its own mapping.

    By default glibc raises that threshold to the largest block freed so far (up to
    32 MiB), after which tensors come from the heap, and a heap freed out of order
    is not returned to the system: a streaming run's memory would drift up by
    tens of MiB with the order tensors happen to be released in. This process
    only streams tensors, so it asks for the plain behaviour (the library, running
    inside someone else's program, leaves their allocator alone). An explicit
    MALLOC_MMAP_THRESHOLD_ in the environment wins.
    """
    import os

    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    m_mmap_threshold = -3
    mallopt(m_mmap_threshold, 4 << 20)


def _die_quietly_on_broken_pipes() -> None:
    """`ckptmap plan ... | head` ends as `cat` would: killed by SIGPIPE when the reader goes,
    not a traceback and exit 1 (1 means "the plan has problems")."""
    import signal

    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)


def main() -> None:
    for stream in (sys.stdout, sys.stderr):  # a name no encoding can take is escaped, not fatal
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
    _die_quietly_on_broken_pipes()
    _give_back_freed_tensors()
    app()


if __name__ == "__main__":
    main()
