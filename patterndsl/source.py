"""Source text, positions and the one error type a user ever sees.

Every message about a `.pat` file reads `file:line:col: error: message`, then the source line, a caret
under the offending text and, where we can guess the fix, a hint. The CLI prints `PatternError`s and
exits with status 2; anything else escaping is a bug in patterndsl, not the user's mistake.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

MAX_SOURCE_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class Source:
    path: str
    text: str

    def line(self, number: int) -> str:
        """Line `number`, counted as the parser and editors count them: at '\\n' only (splitlines() would
        also break at form feeds and Unicode line separators, which a comment may hold)."""
        lines = self.text.split("\n")
        return lines[number - 1].removesuffix("\r") if 1 <= number <= len(lines) else ""


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
        shown, at = _window(line, self.span.column - 1)
        caret_len = max(1, min(self.span.length, max(1, len(shown) - at)))
        parts = [
            f"{self.span}: error: {self.message}",
            f"  {shown}",
            "  " + " " * at + "^" + "~" * (caret_len - 1),
        ]
        if self.hint:
            parts.append(f"  hint: {self.hint}")
        return "\n".join(parts)

    def __str__(self) -> str:
        return self.render()


SHOWN_LINE = 100  # characters of a long source line shown around the error


def _window(line: str, at: int) -> tuple[str, int]:
    """A long line cut to SHOWN_LINE characters around column `at` (0-based), with '...' where it was cut,
    and the caret's column in what is shown: a 5000-character line is not printed whole."""
    if len(line) <= SHOWN_LINE:
        return line, at
    start = min(max(0, at - SHOWN_LINE // 3), len(line) - SHOWN_LINE)
    end = start + SHOWN_LINE
    head = "..." if start > 0 else ""
    tail = "..." if end < len(line) else ""
    return head + line[start:end] + tail, len(head) + at - start


def did_you_mean(name: str, candidates: list[str] | tuple[str, ...] | set[str]) -> str | None:
    """The closest known name, for the hint under an unknown one."""
    import difflib

    close = difflib.get_close_matches(name, sorted(candidates), n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else None


def read_source(path: str | Path) -> str:
    """The text of a `.pat` file, or a PatternError that names it.

    The file is opened without blocking and must be a regular file: reading a device such as /dev/zero
    never ends, and opening a FIFO waits for a writer that may never come. Its size is checked before it
    is read, so a huge file costs nothing; at most MAX_SOURCE_BYTES + 1 bytes are ever read (a file that
    grows meanwhile is still refused).
    """
    p = str(Path(path))
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except (FileNotFoundError, NotADirectoryError):
        raise PatternError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise PatternError(f"{p}: is a directory, not a .pat file") from None
    except OSError as e:
        raise PatternError(f"{p}: cannot read: {e.strerror or e}") from None
    too_big = PatternError(
        f"{p}: the file is larger than {MAX_SOURCE_BYTES} bytes", None, "a pattern file is a few lines of text"
    )
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise PatternError(f"{p}: is a directory, not a .pat file")
        if not stat.S_ISREG(info.st_mode):
            raise PatternError(
                f"{p}: not a regular file (a device, pipe or socket)", None,
                "patc reads pattern files; save the text to a file",
            )  # fmt: skip
        if info.st_size > MAX_SOURCE_BYTES:
            raise too_big
        chunks: list[bytes] = []
        left = MAX_SOURCE_BYTES + 1
        while left > 0 and (chunk := os.read(fd, left)):
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as e:
        raise PatternError(f"{p}: cannot read: {e.strerror or e}") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > MAX_SOURCE_BYTES:
        raise too_big
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        start_of_line = data.rfind(b"\n", 0, e.start) + 1
        line = data.count(b"\n", 0, e.start) + 1
        column = len(data[start_of_line : e.start].decode("utf-8", "replace")) + 1
        where = Span(Source(p, data.decode("utf-8", "replace")), line, column)
        raise PatternError(f"not UTF-8 text (byte {e.start})", where, "save the file as UTF-8") from None
