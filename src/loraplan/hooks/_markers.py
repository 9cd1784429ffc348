"""The pluggy markers of the ``loraplan`` project."""

from __future__ import annotations

import pluggy

PROJECT = "loraplan"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)
