"""Limits on what one request may make a service allocate or do, and the error that refuses it.

A service checks each limit before it allocates anything for the request,
from what the request declares (a spec's shapes, an upload's header, a
batch's row count), so a hostile size is refused at the cost of reading it.
The error names the limit and the setting that raises it; servicers answer
it with RESOURCE_EXHAUSTED (it is an OverflowError). A request that is
wrong whatever the limits are (a negative size) is a ValueError instead.
"""

from __future__ import annotations


class LimitExceeded(OverflowError):
    """A request over one of the service's limits; the message names the limit's variable."""


def check_limit(what: str, value: int | float, limit: int | float, variable: str, unit: str = "") -> None:
    """Raise LimitExceeded unless `value` <= `limit`.

    `what` says what was measured ("spec_json", "the model's parameters"),
    `variable` the environment variable that sets the limit.
    """
    if value > limit:
        unit = f" {unit}" if unit else ""
        raise LimitExceeded(f"{what} is {value:,}{unit}; the limit is {limit:,}{unit} (set by {variable})")
