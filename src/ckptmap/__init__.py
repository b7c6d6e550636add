"""ckptmap: load pretrained PyTorch checkpoints into changed architectures, by rules.

import ckptmap
report = ckptmap.load_into(model, "resnet18.pt", 'strip "module."\ninit "fc"')

Each name below is imported on first use (PEP 562): `import ckptmap` itself costs
nothing, so a command line that prints its help never builds the rule models.
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING, Any

from .version import __version__

# name -> the module that defines it
_WHERE = {
    "Program": "compile",
    "compile": "compile",
    "CheckpointError": "errors",
    "CkptmapError": "errors",
    "HistoryError": "errors",
    "LoadError": "errors",
    "PlanError": "errors",
    "RuleCompileError": "errors",
    "RuleSyntaxError": "errors",
    "UsageError": "errors",
    "History": "history",
    "upgrade_on_load": "history",
    "load_into": "load",
    "migrate": "load",
    "Plan": "plan",
    "Report": "report",
    "Ruleset": "rules",
    "Suggestion": "suggest",
    "suggest": "suggest",
    "load_rules": "syntax",
    "parse": "syntax",
}

__all__ = [
    "CheckpointError",
    "CkptmapError",
    "History",
    "HistoryError",
    "LoadError",
    "Plan",
    "PlanError",
    "Program",
    "Report",
    "RuleCompileError",
    "RuleSyntaxError",
    "Ruleset",
    "Suggestion",
    "UsageError",
    "__version__",
    "compile",
    "load_into",
    "load_rules",
    "migrate",
    "parse",
    "suggest",
    "upgrade_on_load",
]

if TYPE_CHECKING:
    from .compile import Program, compile
    from .errors import (
        CheckpointError,
        CkptmapError,
        HistoryError,
        LoadError,
        PlanError,
        RuleCompileError,
        RuleSyntaxError,
        UsageError,
    )
    from .history import History, upgrade_on_load
    from .load import load_into, migrate
    from .plan import Plan
    from .report import Report
    from .rules import Ruleset
    from .suggest import Suggestion, suggest
    from .syntax import load_rules, parse


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'ckptmap' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value  # once: the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})


class _Package(types.ModuleType):
    """`ckptmap.compile` and `ckptmap.suggest` are functions, though modules of those
    names exist: importing the module must not put it in the function's place (Python
    sets a submodule on its package when it is first imported)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("compile", "suggest") and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
