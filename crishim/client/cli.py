"""Client-side commands: port-forward and check (filled in by the client issue)."""

from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction) -> None:
    return None
