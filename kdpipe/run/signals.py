"""SIGINT and SIGTERM as errors.Interrupted, raised where an exception unwinds cleanly.

Python runs a signal handler between two bytecodes of the main thread, wherever that is. Raised inside a weakref
callback during garbage collection, an exception is printed as "Exception ignored" and dropped (seen here: 1 SIGINT
in 9 sent to a distill stage, which then ran to its end); raised inside SQLAlchemy while MLflow writes, it can
leave the store's connection mid-transaction, so that ending the run KILLED fails next. So the handler raises only
outside those places; inside them it notes the signal and sends it again RETRY_S later (at most RETRIES times,
then it raises wherever it is). The training loop calls `check()` every step: a signal whose exception was
swallowed anyway is raised again there.
"""

from __future__ import annotations

import gc
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from kdpipe.errors import Interrupted

CAUGHT = (signal.SIGINT, signal.SIGTERM)
RETRY_S, RETRIES = 0.05, 100  # a signal waits at most ~5 s for a safe place (an MLflow model upload can take that)
UNSAFE_PACKAGES = ("sqlalchemy", "mlflow", "alembic", "sqlite3")  # MLflow's store: never cut it mid-write

_state: dict = {"active": False, "signum": None, "raised": False, "retries": 0, "in_gc": False}


@contextmanager
def interrupts() -> Iterator[None]:
    """While the body runs in the main thread, SIGINT and SIGTERM raise errors.Interrupted (once: later signals are
    ignored while the stage unwinds, ends its MLflow run KILLED and says where it stopped). The previous handlers
    are back afterwards. Elsewhere than the main thread (which alone takes signals) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _state.update(active=True, signum=None, raised=False, retries=0, in_gc=False)
    previous = {each: signal.signal(each, _handler) for each in CAUGHT}
    gc.callbacks.append(_track_gc)
    try:
        yield
    finally:
        gc.callbacks.remove(_track_gc)
        _state.update(active=False, raised=False)  # a retry still on its way finds nobody to interrupt
        for each, handler in previous.items():
            signal.signal(each, handler)


def check() -> None:
    """Raise errors.Interrupted again if a signal's exception was raised but swallowed (the stage still runs)."""
    if _state["raised"]:
        raise Interrupted(_state["signum"])


def _handler(signum: int, frame) -> None:
    if _state["raised"]:
        return  # unwinding already: a second Ctrl-C must not cut the end of the run short
    _state["signum"] = signum
    if _unsafe(frame) and _state["retries"] < RETRIES:
        _state["retries"] += 1
        timer = threading.Timer(RETRY_S, _resend, (signum,))
        timer.daemon = True
        timer.start()
        return
    _state["raised"] = True
    raise Interrupted(signum)


def _resend(signum: int) -> None:
    if _state["active"]:
        os.kill(os.getpid(), signum)


def _unsafe(frame) -> bool:
    """Is the main thread collecting garbage, finalising an object or inside MLflow's store code?"""
    if _state["in_gc"]:
        return True
    while frame is not None:
        path = frame.f_code.co_filename
        if frame.f_code.co_name == "__del__" or any(f"{os.sep}{p}{os.sep}" in path for p in UNSAFE_PACKAGES):
            return True
        frame = frame.f_back
    return False


def _track_gc(phase: str, info: dict) -> None:
    _state["in_gc"] = phase == "start"
