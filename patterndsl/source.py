"""Source text, positions and the one error type a user ever sees.

Every message about a `.pat` file reads `file:line:col: error: message`, then the source line, a caret
under the offending text and, where we can guess the fix, a hint. The CLI prints `PatternError`s and
exits with status 2; anything else escaping is a bug in patterndsl, not the user's mistake.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Source:
    path: str
    text: str

    def line(self, number: int) -> str:
        lines = self.text.splitlines()
        return lines[number - 1] if 1 <= number <= len(lines) else ""


@dataclass(frozen=True, slots=True)
class Span:
    """1-based line and column of the first character, and the length to underline on that line."""

    source: Source = field(repr=False, compare=False)
    line: int
    column: int
    length: int = 1

    def __str__(self) -> str:
        return f"{self.source.path}:{self.line}:{self.column}"


class PatternError(Exception):
    """A mistake in a pattern or in how it is used; carries where it is and how to fix it."""

    def __init__(self, message: str, span: Span | None = None, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.span = span
        self.hint = hint

    def render(self) -> str:
        if self.span is None:
            text = f"error: {self.message}"
            return text + (f"\n  hint: {self.hint}" if self.hint else "")
        line = self.span.source.line(self.span.line).expandtabs(1)
        caret_len = max(1, min(self.span.length, max(1, len(line) - self.span.column + 1)))
        parts = [
            f"{self.span}: error: {self.message}",
            f"  {line}",
            "  " + " " * (self.span.column - 1) + "^" + "~" * (caret_len - 1),
        ]
        if self.hint:
            parts.append(f"  hint: {self.hint}")
        return "\n".join(parts)

    def __str__(self) -> str:
        return self.render()


def did_you_mean(name: str, candidates: list[str] | tuple[str, ...] | set[str]) -> str | None:
    """The closest known name, for the hint under an unknown one."""
    import difflib

    close = difflib.get_close_matches(name, sorted(candidates), n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else None
