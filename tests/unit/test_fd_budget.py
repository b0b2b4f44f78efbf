"""How crishim serve shares RLIMIT_NOFILE (crishim.app.fd_budget): pure arithmetic."""

import pytest

from crishim.app import MIN_FD_BUDGET, OWN_FDS, fd_budget
from crishim.config import ConfigError, load


def test_the_default_limit_of_a_node_keeps_the_configured_reserve():
    cfg = load()
    fds = fd_budget(cfg, 1 << 20)
    assert fds.max_unadmitted == cfg.max_unadmitted
    assert fds.reserved == max(cfg.reserved_fds,
                               cfg.max_unadmitted + cfg.max_cri_connections + OWN_FDS)
    assert fds.budget == (1 << 20) - fds.reserved
    assert fds.per_session == min(cfg.max_connections_per_session,
                                  min(cfg.max_connections, fds.budget) // 2)


def test_connections_without_a_token_take_at_most_a_quarter_of_a_low_limit():
    """The default 256 unadmitted connections under a limit of 300 left 2 descriptors for
    sessions."""
    cfg = load(overrides={"max_cri_connections": "16"})
    fds = fd_budget(cfg, 400)
    assert fds.max_unadmitted == 100
    assert fds.reserved == max(cfg.reserved_fds, 100 + 16 + OWN_FDS)
    assert fds.budget == 400 - fds.reserved >= MIN_FD_BUDGET


def test_no_session_may_hold_more_than_half_of_the_budget():
    fds = fd_budget(load(overrides={"max_connections_per_session": "1000000"}), 4096)
    assert fds.per_session == fds.budget // 2


def test_a_limit_that_leaves_sessions_nothing_refuses_to_start():
    with pytest.raises(ConfigError, match="reserved_fds: .* lower reserved_fds"):
        fd_budget(load(overrides={"reserved_fds": "1000"}), 1010)
