"""User-facing errors: one clear message that names the config key and the override that fixes it.

The CLI prints a :class:`ConfigError` without a traceback and exits with :data:`EXIT_CONFIG`.
"""

from __future__ import annotations

import difflib
from typing import Iterable, Optional, Sequence

EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_INTERRUPTED = 130
"""128 + the signal number: 130 after SIGINT (Ctrl-C), 143 after SIGTERM."""


def exit_code(summary: dict) -> int:
    """The process exit code for a finished run's summary."""
    reason = summary.get("stop_reason")
    if reason in ("completed", "early_stopped"):
        return 0
    if reason == "interrupted":
        return 128 + int(summary.get("signal_number") or 2)
    return EXIT_FAILED


class ConfigError(Exception):
    """A bad key, value, option or file in the run spec.

    ``key`` is the full config key (``optimizer.lr``), ``fix`` an override or action that repairs it.
    """

    def __init__(self, key: Optional[str], message: str, fix: Optional[str] = None) -> None:
        super().__init__(message)
        self.key = key
        self.message = message
        self.fix = fix

    def __str__(self) -> str:
        text = f"{self.key}: {self.message}" if self.key else self.message
        if self.fix:
            text += f"\n  fix: {self.fix}"
        return text


def did_you_mean(word: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """The candidates closest to ``word`` (case-insensitive), best first."""
    pool = sorted(set(candidates))
    lowered = {c.lower(): c for c in pool}
    hits = difflib.get_close_matches(word.lower(), list(lowered), n=n, cutoff=0.6)
    return [lowered[h] for h in hits]


def suggestion(word: str, candidates: Iterable[str]) -> str:
    """`" Did you mean 'x'?"` or an empty string."""
    hits = did_you_mean(word, candidates)
    if not hits:
        return ""
    return " Did you mean " + " or ".join(f"'{h}'" for h in hits) + "?"


def check(condition: bool, key: str, message: str, fix: Optional[str] = None) -> None:
    """Raise :class:`ConfigError` for ``key`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(key, message, fix)


def check_choice(value: str, choices: Sequence[str], key: str) -> None:
    """``value`` must be one of ``choices``; otherwise name them and the closest one."""
    if value not in choices:
        close = did_you_mean(value, choices, 1) or list(choices)
        raise ConfigError(
            key,
            f"'{value}' is not one of {', '.join(choices)}.{suggestion(value, choices)}",
            f"set {key}={close[0]}",
        )
