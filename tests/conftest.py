"""Shared fixtures: one tiny toy world per test session, used through the same `toy:` paths as the recipes."""
from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def tiny_toy_world(tmp_path_factory):
    """The 'tiny' preset of the embedded default, built once; `toy:` paths and subprocesses resolve to it."""
    from vlkit.toyworld import build_toy_world

    # tokenized records stay within the session (vlkit/data/tokenized.py): tests never read another session's
    os.environ["VLKIT_TOKENIZED_DIR"] = str(tmp_path_factory.mktemp("tokenized"))
    # VLKIT_TEST_TOY_DIR keeps the tiny world between local test sessions (CI builds it fresh)
    root = os.environ.get("VLKIT_TEST_TOY_DIR") or tmp_path_factory.mktemp("toyworld")
    os.environ["VLKIT_TOY_DIR"] = str(root)
    os.environ["VLKIT_TOY_PRESET"] = "tiny"
    return build_toy_world(root, preset="tiny")
