"""LogBudget: lines within a rate, the rest counted and the count written later."""

import asyncio
import logging

from crishim.budget import LogBudget


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "t"]


def test_lines_past_the_burst_are_counted_and_the_count_written_at_flush(caplog):
    caplog.set_level(logging.INFO, logger="t")
    budget = LogBudget(logging.getLogger("t"), 1, "%d more lines not logged")
    for i in range(25):
        budget.log(logging.INFO, "line %d", i)
    assert _lines(caplog) == [f"line {i}" for i in range(10)]  # a burst of 10 x rate
    assert budget.suppressed == 15
    budget.flush()
    assert _lines(caplog)[-1] == "15 more lines not logged (log_lines_per_second)"
    budget.flush()  # nothing more to say
    assert len(_lines(caplog)) == 11


def test_the_count_is_written_a_second_later_without_a_flush(caplog):
    caplog.set_level(logging.INFO, logger="t")

    async def go() -> None:
        budget = LogBudget(logging.getLogger("t"), 1, "%d not logged")
        for i in range(12):
            budget.log(logging.INFO, "line %d", i)
        await asyncio.sleep(1.3)

    asyncio.run(go())
    assert _lines(caplog)[-1] == "2 not logged (log_lines_per_second)"


def test_rate_0_logs_every_line_and_disabled_levels_cost_nothing(caplog):
    caplog.set_level(logging.INFO, logger="t")
    budget = LogBudget(logging.getLogger("t"), 0, "%d")
    for _ in range(5000):
        budget.log(logging.INFO, "x")
        budget.log(logging.DEBUG, "not at this level")  # neither logged nor counted
    assert len(_lines(caplog)) == 5000 and budget.suppressed == 0
    limited = LogBudget(logging.getLogger("t"), 1, "%d")
    for _ in range(100):
        limited.log(logging.DEBUG, "not at this level")
    assert limited.suppressed == 0
