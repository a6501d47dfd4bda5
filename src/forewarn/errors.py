"""One error root for everything Forewarn reports to a user.

    ForewarnError            status 400 unless a subclass says otherwise
    ├── PlaybookError        a playbook does not validate (carries every problem found)
    ├── EventError           one incoming message is not a valid event
    ├── InputError           a file, argument or request body cannot be used
    │   ├── TooLargeError    413: a request body over a size or count limit
    │   └── SignatureError   a webhook's signature does not verify
    └── NotFoundError        404: no such trigger (or subject, ...)

Every message says what was wrong and what to do about it.
"""

from __future__ import annotations


class ForewarnError(Exception):
    status = 400
    code = "invalid"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict[str, object]:
        return {"error": {"code": self.code, "message": self.message}}


class Problem:
    """One validation problem located in a playbook file."""

    __slots__ = ("file", "line", "message", "trigger")

    def __init__(self, file: str, line: int, trigger: str | None, message: str) -> None:
        self.file = file
        self.line = line
        self.trigger = trigger
        self.message = message

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}"
        if self.trigger:
            where += f": trigger '{self.trigger}'"
        return f"{where}: {self.message}"

    def __repr__(self) -> str:
        return f"Problem({self!s})"


class PlaybookError(ForewarnError):
    code = "invalid_playbook"

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))

    def to_dict(self) -> dict[str, object]:
        body = super().to_dict()
        body["error"]["problems"] = [  # type: ignore[index]
            {"file": p.file, "line": p.line, "trigger": p.trigger, "message": p.message}
            for p in self.problems
        ]
        return body


class EventError(ForewarnError):
    code = "invalid_event"


class InputError(ForewarnError):
    code = "invalid_input"


class TooLargeError(InputError):
    status = 413
    code = "too_large"


class SignatureError(InputError):
    code = "invalid_signature"


class NotFoundError(ForewarnError):
    status = 404
    code = "not_found"
