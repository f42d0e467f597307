"""vlkit-honeybee: an example third-party vlkit plugin.

Components (registered through entry points in ``pyproject.toml``, not by importing this package):

* projector ``c_abstractor``    -- Honeybee's locality-preserving C-Abstractor (kakaobrain/honeybee).
* token strategy ``pixel_shuffle`` -- nanoVLM / Idefics3 space-to-depth token reduction.
* encoder ``tiny_cnn``          -- a small random-init CNN, for demos and tests.

The package only relies on vlkit's public plugin contract (``vlkit.EncoderOutput``
and the factory keyword arguments); it never imports vlkit internals.
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
