"""The synchronous client: an AsyncClient driven from a loop on a background thread."""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pdserve.client.aio import DEFAULT_TARGET, AsyncClient, ResponseStream
from pdserve.client.messages import Chunk, Completion
from pdserve.client.retry import RetryPolicy
from pdserve.common.security import TLS


class Client:
    """Synchronous client: an AsyncClient on an event loop in a background
    thread, so it works in plain scripts, notebooks with a running loop, and
    from several threads at once."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = None,
        metadata: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
        api_key: str | None = None,
        tls: TLS | bool | None = None,
        meter_provider: Any = None,
        retry: RetryPolicy | None = RetryPolicy(),
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="pdserve-client", daemon=True)
        self._thread.start()

        async def make() -> AsyncClient:  # the channel must be created on its loop
            return AsyncClient(
                target,
                timeout=timeout,
                metadata=metadata,
                api_key=api_key,
                tls=tls,
                meter_provider=meter_provider,
                retry=retry,
            )

        try:
            self._client = self._run(make())
        except BaseException:  # e.g. a TLS file that is not there: no thread left behind
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()
            raise
        # Dropped without close(): its channel closed and its thread ended, not left running.
        weakref.finalize(self, _abandon, self._loop, self._client)

    def _run(self, coro: Any) -> Any:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # e.g. KeyboardInterrupt while waiting: cancels the RPC too
            raise

    def generate(self, prompt: str | Sequence[int] | None = None, **params: Any) -> SyncResponseStream:
        """As AsyncClient.generate, as a plain iterator and context manager."""
        return SyncResponseStream(self, self._client.generate(prompt, **params))

    stream = generate

    def complete(self, prompt: str | Sequence[int] | None = None, **params: Any) -> Completion:
        return self._run(self._client.complete(prompt, **params))

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._run(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _abandon(loop: asyncio.AbstractEventLoop, client: AsyncClient) -> None:
    """A dropped Client's end, scheduled, never awaited here: GC may run on the loop's own thread."""
    if loop.is_closed():  # closed by close()
        return

    async def end() -> None:
        await client.close()
        loop.stop()

    loop.call_soon_threadsafe(lambda: loop.create_task(end()))


class SyncResponseStream:
    """Iterator of Chunks; `close()`, leaving `with`, or dropping it cancels the call."""

    def __init__(self, client: Client, stream: ResponseStream) -> None:
        self._loop = client._loop
        self._run = client._run
        self._stream = stream

    def __iter__(self) -> SyncResponseStream:
        return self

    def __next__(self) -> Chunk:
        try:
            return self._run(self._stream.__anext__())
        except StopAsyncIteration:
            raise StopIteration from None

    def close(self) -> None:
        if not self._loop.is_closed():
            self._run(self._stream.aclose())

    def __enter__(self) -> SyncResponseStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Never block here (GC may run on the loop's own thread): schedule the
        # cancel, which also makes the stream's last reference die on its loop.
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stream.cancel)
