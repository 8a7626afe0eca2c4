"""The callback sender: posts terminal tasks to their callback URLs.

Runs on every Task Manager replica; the Redis outbox hands each due callback
to one sender at a time (`adapters/redis_callbacks.py`). Requests go only to
URLs on the allow-list (checked at upload and again before each attempt), do
not follow redirects (no bouncing to internal addresses), and time out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import aiohttp
from google.protobuf import json_format

from services.common.errors import KbmeshError
from services.task_manager.adapters.redis_callbacks import RedisCallbackOutbox
from services.task_manager.adapters.redis_store import RedisTaskStore
from services.task_manager.convert import task_to_proto
from services.task_manager.domain.callbacks import (
    EVENT_HEADER,
    SIGNATURE_HEADER,
    TASK_ID_HEADER,
    delivered_status,
    retry_delay,
    sign,
)
from services.task_manager.domain.model import CallbackAttempt, EventType, Task
from services.task_manager.domain.upload import validate_callback_url
from services.task_manager.settings import CallbackSettings

log = logging.getLogger(__name__)
_MAX_CONFLICTS = 10


def now_ms() -> int:
    return int(time.time() * 1000)


def task_json(task: Task) -> bytes:
    """The task as REST clients see it (proto field names, defaults included)."""
    return json_format.MessageToJson(
        task_to_proto(task),
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
        indent=None,
    ).encode()


class CallbackSender:
    def __init__(
        self,
        tasks: RedisTaskStore,
        outbox: RedisCallbackOutbox,
        settings: CallbackSettings,
        allow_list: tuple[str, ...],
    ) -> None:
        self._tasks = tasks
        self._outbox = outbox
        self._settings = settings
        self._allow_list = allow_list
        self._secret = settings.secret.get_secret_value().encode()
        self._stopping = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._slots = asyncio.Semaphore(settings.max_concurrent)

    def start(self) -> None:
        self._runner = asyncio.create_task(self._run(), name="callback-sender")

    async def stop(self) -> None:
        self._stopping.set()
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner

    async def _run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self._settings.timeout_seconds)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            in_flight: set[asyncio.Task[None]] = set()
            while not self._stopping.is_set():
                try:
                    claimed = await self._outbox.claim(
                        now_ms(), int(self._settings.claim_seconds * 1000), 50
                    )
                except (KbmeshError, OSError):
                    log.warning("callback outbox unreachable", exc_info=True)
                    claimed = []
                except Exception:
                    log.exception("callback outbox claim failed")
                    claimed = []
                for task_id in claimed:
                    await self._slots.acquire()
                    job = asyncio.create_task(self._deliver_guarded(http, task_id))
                    in_flight.add(job)
                    job.add_done_callback(in_flight.discard)
                if not claimed:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(
                            self._stopping.wait(), self._settings.poll_interval_seconds
                        )

    async def _deliver_guarded(self, http: aiohttp.ClientSession, task_id: str) -> None:
        try:
            await self.deliver(http, task_id)
        except Exception:
            # The claim lapses and another attempt follows: nothing is lost.
            log.exception("callback delivery failed", extra={"task_id": task_id})
        finally:
            self._slots.release()

    async def deliver(self, http: aiohttp.ClientSession, task_id: str) -> None:
        task = await self._tasks.get_task(task_id)
        if task is None or not task.callback_url:
            await self._outbox.finish(task_id)
            return
        body = task_json(task)
        status, error, refused = 0, "", False
        try:
            validate_callback_url(task.callback_url, self._allow_list)
            async with http.post(
                task.callback_url,
                data=body,
                allow_redirects=False,
                headers={
                    "Content-Type": "application/json",
                    SIGNATURE_HEADER: sign(self._secret, body),
                    TASK_ID_HEADER: task.id,
                    EVENT_HEADER: f"task.{task.state.value.lower()}",
                },
            ) as response:
                status = response.status
                await response.read()
        except KbmeshError as exc:
            # The allow-list changed since the upload: this URL is refused for good.
            error, refused = exc.message, True
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}"[:500]
        attempt = CallbackAttempt(
            time_ms=now_ms(), http_status=status, error=error, delivered=delivered_status(status)
        )
        attempts = await self._record(task, attempt)
        log.info(
            "callback attempted",
            extra={
                "task_id": task.id,
                "http_status": status,
                "error": error,
                "delivered": attempt.delivered,
                "attempt": attempts,
            },
        )
        if attempt.delivered or refused or attempts >= self._settings.max_attempts:
            await self._outbox.finish(task_id)
            return
        delay = retry_delay(
            attempts, self._settings.backoff_base_seconds, self._settings.backoff_cap_seconds
        )
        await self._outbox.reschedule(task_id, now_ms() + int(delay * 1000))

    async def _record(self, task: Task, attempt: CallbackAttempt) -> int:
        """Appends the attempt to the task (and a CALLBACK event); returns the count."""
        for _ in range(_MAX_CONFLICTS):
            attempts = (*task.callback_attempts, attempt)
            done = await self._tasks.transition(
                task,
                EventType.CALLBACK,
                {"callback_attempts": attempts},
                guard=("callback_attempts",),
            )
            if done.status == "ok":
                return len(attempts)
            task = done.task
        return len(task.callback_attempts) + 1
