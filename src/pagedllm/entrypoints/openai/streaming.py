"""Server-sent events: the `data:` framing of chunks, and the merge of several output streams."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from pydantic import BaseModel

T = TypeVar("T")

SSE_DONE = "data: [DONE]\n\n"


def sse(payload: BaseModel) -> str:
    return f"data: {payload.model_dump_json()}\n\n"


async def merge_async_iterators(
    iterators: list[AsyncIterator[T]],
) -> AsyncIterator[tuple[int, T]]:
    """Yields (index, item) from several async iterators as items arrive.

    Closing or cancelling the merge closes every source, so requests are aborted at once.
    """
    if len(iterators) == 1:
        try:
            async for item in iterators[0]:
                yield 0, item
        finally:
            await _close(iterators[0])
        return
    queue: asyncio.Queue[tuple[int, Any] | None] = asyncio.Queue()
    _end = object()

    async def drain(index: int, iterator: AsyncIterator[T]) -> None:
        try:
            async for item in iterator:
                await queue.put((index, item))
            await queue.put((index, _end))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer
            await queue.put((index, exc))

    tasks = [asyncio.create_task(drain(i, it)) for i, it in enumerate(iterators)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is _end:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        # NOTE: cancelling a task closes its source generator inside the task, which aborts
        # the request; no await is needed here, so this also works inside a cancelled scope.
        for task in tasks:
            task.cancel()


async def _close(iterator: AsyncIterator[Any]) -> None:
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()
