"""User-facing errors. The CLI turns them into exit code 2 and one line per problem."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class Problem:
    """One problem in one input file: `FILE: [section] key: message (allowed: ...)`."""

    file: str
    section: str | None = None
    key: str | None = None
    message: str
    allowed: str | None = None
    variant: str | None = None

    def __str__(self) -> str:
        where = self.file
        if self.section:
            where += f": [{self.section}]"
        if self.key:
            where += f" {self.key}" if self.section else f": {self.key}"
        text = f"{where}: {self.message}"
        if self.allowed:
            text += f" (allowed: {self.allowed})"
        if self.variant:
            text += f" (in variant {self.variant})"
        return text


class UserError(Exception):
    """Bad input: every problem found, reported together; exit code 2."""

    def __init__(self, problems: list[Problem] | list[str] | str):
        if isinstance(problems, str):
            problems = [problems]
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))

    def lines(self) -> list[str]:
        return [str(p) for p in self.problems]
