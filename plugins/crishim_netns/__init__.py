"""Lab runtime: sandbox ids are named network namespaces or an explicit id -> path map.

A sandbox id is a named netns (netns_dir/<id>) or an entry of
the config's explicit `sandboxes` map (id -> netns path; "host" for the host's own)."""

from __future__ import annotations

from crishim.config import Config
from crishim.sandboxes import NamedNetnsRuntime


def factory(config: Config) -> NamedNetnsRuntime:
    return NamedNetnsRuntime(config)
