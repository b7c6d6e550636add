"""ckptmap: load pretrained PyTorch checkpoints into changed architectures, by rules.

import ckptmap
report = ckptmap.load_into(model, "resnet18.pt", 'strip "module."\ninit "fc"')
"""

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
from .version import __version__

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
