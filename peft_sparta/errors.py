"""Errors that SpaRTA raises besides PEFT's own."""

from __future__ import annotations


class SpaRTALoadError(ValueError):
    """A SpaRTA adapter could not be loaded; the model was left as it was before the call."""
