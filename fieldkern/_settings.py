"""Process-wide choices (backend, kernel precision): an environment variable gives the
initial value, code can set it globally or for a ``with`` block."""

from __future__ import annotations

import os


class Setting:
    """One named choice among ``choices``, read from ``env_var`` until set in code."""

    def __init__(self, name: str, choices: tuple[str, ...], env_var: str, default: str):
        self.name = name
        self.choices = choices
        self.env_var = env_var
        self.default = default
        self.current: str | None = None  # None: not set in code, read the environment

    def check(self, value: object, source: str) -> str:
        if not isinstance(value, str) or value.lower() not in self.choices:
            raise ValueError(f"{source} must be one of {self.choices}, got {value!r}")
        return value.lower()

    def get(self) -> str:
        if self.current is not None:
            return self.current
        return self.check(os.environ.get(self.env_var, self.default), f"environment variable {self.env_var}")


class SettingSwitch:
    """Base of ``set_backend``/``set_precision``: calling it sets the value until changed
    again; used as a context manager it restores the previous value on exit (also on error)."""

    setting: Setting

    def __init__(self, value: str):
        new = self.setting.check(value, self.setting.name)
        self._previous = self.setting.current
        self.setting.current = new

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.setting.current = self._previous

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.setting.get()!r})"
