"""Run one function in a background thread and collect its result later."""

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Cancelled(Exception):
    """Raised inside a background call that was asked to stop early."""


class BackgroundCall(Generic[T]):
    """A call of ``function(*args)`` that starts in a daemon thread when the object is created.

    ``result`` waits for the call and returns its value, or raises the
    exception it raised, in the calling thread. A function that accepts a
    ``cancel`` event should check it between steps and raise Cancelled once
    it is set; ``stop`` sets it.
    """

    def __init__(self, name: str, function: Callable[..., T], *args, cancel: threading.Event | None = None):
        self._value: T | None = None
        self._error: BaseException | None = None
        self._cancel = cancel
        self._thread = threading.Thread(target=self._run, args=(function, args), name=name, daemon=True)
        self._thread.start()

    def _run(self, function: Callable[..., T], args: tuple) -> None:
        try:
            self._value = function(*args)
        except BaseException as error:  # handed to the thread that calls result()
            self._error = error

    def raise_if_failed(self) -> None:
        """Raise the call's exception if it has already ended with one, without waiting."""
        if not self._thread.is_alive() and self._error is not None:
            raise self._error

    def result(self) -> T:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value

    def stop(self) -> None:
        """Ask the call to end early and wait until it has, ignoring its outcome.

        An interpreter that exits while another thread is inside torch can
        abort with "terminate called without an active exception", so a
        failing merge stops its background calls before it raises.
        """
        if self._cancel is not None:
            self._cancel.set()
        self._thread.join()
