"""Errors a user can act on. Each carries a one-line message and a hint; the CLI prints both
and exits 2 (bad input) or 1 (failure) without a traceback."""

from __future__ import annotations


class OwnlmError(Exception):
    """Base of every error ownlm raises on purpose."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class BadRequest(OwnlmError):
    """The user asked for something malformed: a bad ref, flag, parameter or name. `param` names
    the offending API parameter, when there is one."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None, param: str | None = None, code: str | None = None):
        super().__init__(message, hint)
        self.param, self.code = param, code


class ModelNotFound(OwnlmError):
    exit_code = 2


class ModelFormatError(OwnlmError):
    """A model file is truncated, hostile, unsupported or inconsistent."""

    exit_code = 2


class ChatTemplateError(OwnlmError):
    exit_code = 2


class OfflineError(OwnlmError):
    """Network access was needed but forbidden (OWNLM_OFFLINE=1) or impossible."""

    exit_code = 2


class IntegrityError(OwnlmError):
    """A blob's digest does not match what was pinned or recorded."""

    exit_code = 2


class FetchError(OwnlmError):
    """A download or a package fetch failed."""

    exit_code = 1
