"""``make demo``'s stop path: one signal stops the stack, a second must not cut that short."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest

from demo.run import install_stop_signals


@pytest.fixture
def restore_signals() -> Iterator[None]:
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for signum, handler in previous.items():
        signal.signal(signum, handler)


@pytest.mark.usefixtures("restore_signals")
@pytest.mark.parametrize("first", [signal.SIGINT, signal.SIGTERM])
def test_the_first_signal_stops_and_later_ones_do_not_interrupt_the_stop(first: int) -> None:
    install_stop_signals()
    stopped_cleanly = False
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), first)  # delivered before kill() returns: raised right here
    try:
        # What `timeout make demo` does: SIGTERM to the group, then make forwards one more.
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # and an impatient Ctrl-C
        stopped_cleanly = True
    except KeyboardInterrupt:
        pass
    assert stopped_cleanly, "a second signal raised inside the stop path"
