"""Name -> "module:attr" tables, imported on use, with "did you mean" for misspelled names."""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from edgecli.errors import ConfigError


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices`` to a mistyped ``word``, else ''."""
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


@dataclass(frozen=True)
class Entry:
    target: str  # "package.module:attr"
    summary: str = ""
    tags: frozenset[str] = field(default_factory=frozenset)


class Registry:
    def __init__(self, kind: str, key: str, entries: dict[str, Entry]):
        self.kind = kind  # "model", "dataset"
        self.key = key  # the config key users set, e.g. "model.arch"
        self.entries = entries

    def names(self) -> list[str]:
        return sorted(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries or ":" in name

    def check(self, name: str) -> None:
        """Raise a ConfigError naming the key if ``name`` is neither registered nor an import path."""
        if name in self.entries or ":" in name:
            return
        raise ConfigError(
            f"{self.key}: unknown {self.kind} '{name}'{did_you_mean(name, self.entries)}; "
            f"choose from {', '.join(self.names())} or give 'package.module:Class'"
        )

    def load(self, name: str) -> Any:
        self.check(name)
        target = self.entries[name].target if name in self.entries else name
        return import_target(target, self.key)


def import_target(target: str, key: str) -> Any:
    mod_name, _, attr = target.partition(":")
    if not mod_name or not attr:
        raise ConfigError(f"{key}: '{target}' is not of the form 'package.module:Name'")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ConfigError(f"{key}: cannot import '{mod_name}' ({e})") from None
    except Exception as e:  # noqa: BLE001 - user code: a SyntaxError or an exception at import is one line
        where = f" at line {e.lineno}" if isinstance(e, SyntaxError) and e.lineno else ""
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise ConfigError(f"{key}: importing '{mod_name}' failed{where} ({type(e).__name__}: {first})") from None
    try:
        obj = mod
        for part in attr.split("."):
            obj = getattr(obj, part)
        return obj
    except AttributeError:
        raise ConfigError(f"{key}: '{mod_name}' has no attribute '{attr}'") from None
