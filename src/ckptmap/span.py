"""Where a rule (or a piece of one) stands in its file: the one pydantic model errors need."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Span(BaseModel):
    """Where a rule (or a piece of one) stands: file, 1-based line and column."""

    model_config = ConfigDict(frozen=True)

    file: str | None = None
    line: int
    column: int
    end_line: int | None = None
    end_column: int | None = None

    def __str__(self) -> str:
        return f"{self.file or '<rules>'}:{self.line}:{self.column}"
