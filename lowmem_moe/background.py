"""Run one function in a background thread and collect its result later."""

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class BackgroundCall(Generic[T]):
    """A call of ``function(*args)`` that starts in a daemon thread when the object is created.

    ``result`` waits for the call and returns its value, or raises the
    exception it raised, in the calling thread. The thread is a daemon so
    that an interrupted merge exits without waiting for it.
    """

    def __init__(self, name: str, function: Callable[..., T], *args):
        self._value: T | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(function, args), name=name, daemon=True)
        self._thread.start()

    def _run(self, function: Callable[..., T], args: tuple) -> None:
        try:
            self._value = function(*args)
        except BaseException as error:  # handed to the thread that calls result()
            self._error = error

    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self) -> T:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value
