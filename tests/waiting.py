"""Waiting for a condition in a test: poll with a deadline (never a bare sleep as synchronisation)."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import Any


async def until(cond: Callable[[], Any], what: str, timeout: float = 20.0, *, interval: float = 0.02,
                retry_on: tuple[type[BaseException], ...] = (), context: Callable[[], str] | None = None) -> Any:
    """Poll ``cond()`` (plain or async) until it is truthy and return its value; fail after ``timeout``.

    ``retry_on``: exceptions that mean "not yet" (e.g. NetqError while a farm elects an arbiter).
    ``context``: more to print on failure (node logs)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            value = cond()
            if inspect.isawaitable(value):
                value = await value
        except retry_on:
            value = None
        if value:
            return value
        if loop.time() > deadline:
            extra = f"\n{context()}" if context is not None else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what}{extra}")
        await asyncio.sleep(interval)


async def printer_reaches(driver: Any, check: Callable[[Any], bool], what: str, timeout: float = 30.0) -> Any:
    """Poll a printer driver's status until ``check(status)``; return that status (fail with the last one)."""
    last: list[Any] = []

    async def reached() -> Any:
        status = await driver.status()
        last[:] = [status]
        return status if check(status) else None

    return await until(reached, what, timeout, interval=0.05, context=lambda: f"last status {last[0] if last else None}")
