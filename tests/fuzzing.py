"""Shared pieces of the fuzz tests: a tally of how each case ended, and the settings every fuzz test uses.

Each case must end in one of the project's UserErrors or in a result the test checks as correct; any
other exception escapes and fails the test (hypothesis then shrinks it to a minimal file). The tally
is printed (`pytest -s`) and asserted, so a run that silently tested nothing fails too.
`LLAVA_FUZZ_EXAMPLES=5000 pytest tests/test_fuzz_*.py -s` runs a longer campaign.
"""

from __future__ import annotations

import collections
import os
import time

from hypothesis import HealthCheck, settings

from llava_jax.errors import UserError

EXAMPLES = int(os.environ.get("LLAVA_FUZZ_EXAMPLES", "300"))
CASE_SECONDS = 5.0  # the bound on one case: reading a damaged file must not take longer

FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])  # fmt: skip


class Tally:
    """Counts cases by outcome ('ok' or the UserError class name) and checks each one's time."""

    def __init__(self, name: str):
        self.name = name
        self.outcomes: collections.Counter = collections.Counter()
        self.slowest = 0.0

    def run(self, case) -> object:
        """Runs case(); a UserError counts as handled, anything else escapes. Returns case()'s result or the error."""
        start = time.perf_counter()
        try:
            result = case()
            self.outcomes["ok"] += 1
        except UserError as e:
            self.outcomes[type(e).__name__ + (f":{e.reason}" if hasattr(e, "reason") else "")] += 1
            result = e
        elapsed = time.perf_counter() - start
        self.slowest = max(self.slowest, elapsed)
        assert elapsed < CASE_SECONDS, f"{self.name}: one case took {elapsed:.2f} s"
        return result

    def report(self, minimum: int) -> None:
        total = sum(self.outcomes.values())
        print(f"\nfuzz {self.name}: {total} cases, none escaped; {dict(self.outcomes)}; slowest {self.slowest:.3f} s")
        assert total >= minimum, f"{self.name}: only {total} cases ran"
