"""Asyncio front end of the dynamic generator: one task drives `iterate()` and routes each result
to the queue of the job it belongs to."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncIterator

from .dynamic import ExLlamaV2DynamicGenerator, ExLlamaV2DynamicJob

log = logging.getLogger(__name__)


class ExLlamaV2DynamicGeneratorAsync:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Same arguments as ExLlamaV2DynamicGenerator; must be created inside a running event loop."""
        self.generator = ExLlamaV2DynamicGenerator(*args, **kwargs)
        self.jobs: dict[ExLlamaV2DynamicJob, ExLlamaV2DynamicJobAsync] = {}
        self.condition = asyncio.Condition()
        self.iteration_task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            async with self.condition:
                await self.condition.wait_for(lambda: bool(self.jobs))
            try:
                results = self.generator.iterate()
            except Exception as e:                   # hand the failure to every waiting job
                log.exception("dynamic generator iteration failed")
                for job in list(self.jobs.values()):
                    job.queue.put_nowait(e)
                self.generator.clear_queue()
                self.jobs.clear()
                continue
            for r in results:
                job = self.jobs.get(r["job"])
                if job is None:
                    continue
                job.queue.put_nowait(r)
                if r["eos"]:
                    del self.jobs[r["job"]]
            await asyncio.sleep(0)

    def enqueue(self, job: "ExLlamaV2DynamicJobAsync") -> None:
        self.generator.enqueue(job.job)
        self.jobs[job.job] = job

        async def wake() -> None:
            async with self.condition:
                self.condition.notify_all()

        asyncio.ensure_future(wake())

    async def cancel(self, job: "ExLlamaV2DynamicJobAsync") -> None:
        self.generator.cancel(job.job)
        self.jobs.pop(job.job, None)

    async def close(self) -> None:
        self.iteration_task.cancel()
        try:
            await self.iteration_task
        except asyncio.CancelledError:
            pass
        self.generator.clear_queue()
        self.jobs.clear()


class ExLlamaV2DynamicJobAsync:
    def __init__(self, generator: ExLlamaV2DynamicGeneratorAsync, *args: Any, **kwargs: Any) -> None:
        """Same arguments as ExLlamaV2DynamicJob; the job is queued at once. Iterate it with
        `async for result in job` until the result with eos=True."""
        self.generator = generator
        self.job = ExLlamaV2DynamicJob(*args, **kwargs)
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        generator.enqueue(self)

    async def __aiter__(self) -> AsyncIterator[dict]:
        while True:
            r = await self.queue.get()
            if isinstance(r, Exception):
                raise r
            yield r
            if r["eos"]:
                return

    async def cancel(self) -> None:
        await self.generator.cancel(self)
        self.cancelled = True
