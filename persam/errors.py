"""The library's errors, in its own terms (the lowest persam layer: it imports nothing of the project).

:class:`InputError` is every problem with what the user gave: a file that is missing, unreadable,
corrupt or inconsistent, or a setting that cannot be used.  Its message is one line naming the
file (or the setting) and the problem; the command line (persam.cli) prints it and exits 2.
:class:`SettingError` names its settings by the library's names ("device", "backend", ...), which
the command line words as its flags (``--device``, ``--backend``, ...).
"""

from __future__ import annotations

from typing import Callable

__all__ = ["InputError", "SettingError"]


class InputError(ValueError):
    """A file that cannot be used: missing, unreadable, corrupt or inconsistent."""


class SettingError(InputError):
    """A setting that cannot be used as given, e.g. device "cuda" where there is no GPU.

    `template` is the one-line message with each setting it names written ``{name}`` (e.g.
    ``"{device} cuda: no CUDA GPU is available (use {device} cpu)"``), `settings` those names.
    ``str()`` names them as they are ("device cuda: ..."); :meth:`worded` names them otherwise.
    """

    def __init__(self, template: str, *settings: str) -> None:
        self.template = template
        self.settings = settings
        super().__init__(self.worded(lambda name: name))

    def worded(self, name: Callable[[str], str]) -> str:
        """The message with each setting called ``name(setting)``, e.g. the command line's flag."""
        text = self.template
        for setting in self.settings:
            text = text.replace("{" + setting + "}", name(setting))
        return text
