"""The scheduler: one runner subprocess per (engine, model, mode), started on demand
(or, with a cluster placement, several replicas of it on different nodes).

Every decision (reuse, admit, evict, queue) is taken synchronously between two
awaits, so the event loop itself serialises them and no lock is needed. Loads
run in their own task: a client that goes away while its model loads does not
abort the load other clients wait for.

This module uses asyncio rather than anyio: loads, idle timers and process
watchers are tasks that outlive the request that started them, which anyio
only offers through a task group owned by one task, and the server runs on
asyncio (hypercorn + Quart) anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import shlex
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dmr.durations import format_duration
from dmr.errors import (
    ConflictError,
    DmrError,
    InsufficientMemoryError,
    InvalidRequestError,
    RunnerError,
    ServiceBusyError,
)
from dmr.records import Mode
from dmr.reference import display_name
from dmr.scheduler.admission import (
    Resident,
    bytes_needed,
    choose_device,
    device_key,
    format_bytes,
    memory_budget,
    plan_admission,
)
from dmr.scheduler.configuration import ModelConfiguration
from dmr.scheduler.cpu_share import CpuShare
from dmr.scheduler.engine_resolver import EngineResolver
from dmr.scheduler.keepalive import idle_deadline_seconds
from dmr.scheduler.model_configs import ConfiguredModel
from dmr.scheduler.runner import Runner, RunnerHandle, RunnerKey, RunnerTable, Unloaded
from dmr.scheduler.runner_process import RunnerProcess
from dmr.scheduler.wait_queue import Priority, QueuedModel, Waiter, WaitQueue, request_priority
from dmr.scheduler.wait_times import SecondsHistogram, WaitTimes

if TYPE_CHECKING:
    from dmr.records import (
        AcceleratorInfo,
        EngineSpec,
        MemoryEstimate,
        ModelFormat,
        PlacedRunner,
        RunnerCommand,
        RunnerConfig,
        RunnerLaunch,
        RunnerPlacement,
    )
    from dmr.scheduler.admission import Admission
    from dmr.settings import Settings
    from dmr.store import Store, StoredModel

__all__ = ["Scheduler"]

log = logging.getLogger(__name__)

# How long `configure` waits for the model's loads to end before judging it busy.
_SETTLE_LOADS_SECONDS = 300.0

# Seconds a client refused for a full queue is told to wait before retrying.
RETRY_AFTER_SECONDS = 5

# A conversation goes back to the replica its prompt hashes to (whose prompt cache
# holds it) unless that replica has this many more requests than the least busy one.
AFFINITY_SLACK = 1

# The request's prompt prefix, computed only when there are replicas to choose from.
Affinity = Callable[[], str | None]


@dataclass(frozen=True)
class _Wanted:
    """What one request asks admission for; kept beside its `Waiter` while it waits."""

    key: RunnerKey
    model: str  # as the client named it
    stored: StoredModel
    spec: EngineSpec
    keep_alive: float | None
    device: tuple[str, int]
    priority: Priority
    affinity: Affinity | None = None


@dataclass(frozen=True)
class _Placement:
    """Where a new runner can go, and what admission decided for it there."""

    device: AcceleratorInfo
    launch: RunnerLaunch
    estimate: MemoryEstimate
    needed: int
    plan: Admission
    room: int  # budget left on the device once it is in


class Scheduler:
    def __init__(
        self,
        *,
        settings: Settings,
        store: Store,
        engines: Mapping[str, EngineSpec],
        devices: Sequence[AcceleratorInfo],
        formats: Iterable[ModelFormat],
        placement: RunnerPlacement | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.engines = dict(engines)
        self.devices = list(devices)
        # Puts runners on a cluster's nodes while connected (the Ray plugin).
        self.placement = placement
        # Engine choice for a model, from the formats the plugin manager collected.
        self.resolver = EngineResolver(self.engines, formats)
        # Remembered `_configure` settings, kept in the store across restarts.
        self.configuration = ModelConfiguration(
            settings=settings, store=store, resolver=self.resolver, devices=self.devices
        )
        self._runners = RunnerTable()
        self.cpu_share = CpuShare(self._runners.values, enabled=settings.cpu_share)
        self._stopping: set[asyncio.Task[None]] = set()
        self._queue = WaitQueue()
        self._pending: dict[Waiter, _Wanted] = {}
        self._serve_scheduled = False
        self._recheck: asyncio.TimerHandle | None = None
        # Seconds each request waited for memory, by model: read by the metrics route.
        self.waits = WaitTimes()
        # Seconds from admission to ready for each runner that loaded, the evicted
        # runners' stop included: read by the metrics route.
        self.switch_seconds = SecondsHistogram()
        self._closed = False
        # loads, load_failures, evictions, idle_unloads, crashes, rejected_busy,
        # rejected_memory: read by the metrics route.
        self.counters: Counter[str] = Counter()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._closed = False
        self.configuration.load()
        if self.placement is not None:
            await self.placement.start()  # raises a clear DmrError when unreachable
            self.placement.watch(self._nodes_changed)

    async def aclose(self) -> None:
        """Stop every runner (SIGTERM, then SIGKILL after a grace period)."""
        self._closed = True
        runners = list(self._runners.values())
        self._runners.clear()
        self._signal_capacity()
        await self.cpu_share.aclose()
        await asyncio.gather(*(runner.stop() for runner in runners), return_exceptions=True)
        if self._stopping:
            await asyncio.gather(*self._stopping, return_exceptions=True)
        if self.placement is not None:
            await self.placement.aclose()

    # ------------------------------------------------------------------ requests

    @asynccontextmanager
    async def acquire(
        self,
        model: str,
        mode: Mode | str,
        *,
        backend: str | None = None,
        keep_alive: float | None = None,
        priority: Priority | None = None,
        affinity: Affinity | None = None,
    ) -> AsyncIterator[RunnerHandle]:
        """A ready runner for `model` in `mode`, held until the block ends.

        A request that must wait for memory waits its turn (`WaitQueue`), for at most
        `Settings.queue_timeout` seconds when interactive. `priority` defaults to the
        task's `request_priority`. `affinity` gives the request's prompt prefix, so
        that a model's replicas each see the same conversations.
        """
        if priority is None:
            priority = request_priority.get()
        runner = await self._obtain(model, Mode(mode), backend, keep_alive, priority, affinity)
        try:
            yield runner.handle
        finally:
            self._release(runner)

    async def preload(
        self,
        model: str,
        mode: Mode | str = Mode.COMPLETION,
        *,
        backend: str | None = None,
        keep_alive: float | None = None,
    ) -> None:
        async with self.acquire(model, mode, backend=backend, keep_alive=keep_alive):
            pass

    async def _obtain(
        self,
        model: str,
        mode: Mode,
        backend: str | None,
        keep_alive: float | None,
        priority: Priority,
        affinity: Affinity | None = None,
    ) -> Runner:
        stored = self._resolve(model)
        spec = self.engine_for(stored, mode, backend)
        key: RunnerKey = (spec.name, stored.id, mode)
        if self._closed:
            raise ServiceBusyError("the server is shutting down", RETRY_AFTER_SECONDS)
        device = device_key(choose_device(self.placement_devices(), spec.device_kinds))
        wanted = _Wanted(key, model, stored, spec, keep_alive, device, priority, affinity)
        runner = None
        if not self._must_queue(key, device, priority):
            runner = self._admit(wanted)
        if runner is None:
            runner = await self._wait_for_turn(wanted)
        try:
            await runner.ready.wait()
        except BaseException:
            self._release(runner)
            raise
        if runner.error is not None:
            self._release(runner)
            raise runner.error
        return runner

    def _joinable(self) -> set[RunnerKey]:
        return {runner.key for runner in self._runners if not runner.exited}

    def _must_queue(self, key: RunnerKey, device: tuple[str, int], priority: Priority) -> bool:
        """Whether a new request waits behind the queue instead of trying admission now:
        someone is owed a turn against its runner, or waits for memory it would take."""
        if not self._queue:
            return False
        if key in self._joinable():
            owed = self._queue.turn_owed(key, device, priority, self.settings.fair_wait)
            self._note_turn_owed(owed)
            return owed is not None
        return self._queue.wants_memory_on(device, priority, self._joinable())

    async def _wait_for_turn(self, wanted: _Wanted) -> Runner:
        model, priority = wanted.model, wanted.priority
        if len(self._queue) >= self.settings.max_queue:
            self.counters["rejected_busy"] += 1
            raise ServiceBusyError(
                f"every runner is busy and {len(self._queue)} requests already wait "
                "for memory; retry later",
                RETRY_AFTER_SECONDS,
            )
        waiter = self._queue.add(wanted.key, model, wanted.device, priority)
        self._pending[waiter] = wanted
        log.info("%s waits for memory (%d queued)", model, len(self._queue))
        timeout = self.settings.queue_timeout if priority is Priority.INTERACTIVE else None
        try:
            done, _ = await asyncio.wait({waiter.admitted}, timeout=timeout or None)
        except BaseException:
            self._leave_queue(waiter)
            raise
        if not done:
            self._leave_queue(waiter)
            self.counters["queue_timeouts"] += 1
            log.warning("%s gave up after %.3fs waiting for memory", model, waiter.waited())
            raise ServiceBusyError(
                f"{model} waited {format_duration(waiter.waited())} for memory without its "
                f"turn coming (DMR_QUEUE_TIMEOUT_SECONDS={self.settings.queue_timeout:g}); "
                "retry later",
                RETRY_AFTER_SECONDS,
            )
        runner = waiter.admitted.result()  # raises what admission raised
        waited = waiter.waited()
        self.waits.observe(display_name(model), waited)
        # bench/model_switching.py reads these lines for its wait figures.
        log.info("%s waited %.3fs for memory", model, waited)
        return runner

    def _note_turn_owed(self, owed: Waiter | None) -> None:
        # Counted once per waiter: each is at most one forced switch.
        if owed is not None and not owed.held_back:
            owed.held_back = True
            self.counters["turns_owed"] += 1

    def _leave_queue(self, waiter: Waiter) -> None:
        """Take a waiter that stops waiting (deadline, client gone) out of the queue; a
        runner it was already given is released."""
        self._queue.remove(waiter)
        self._pending.pop(waiter, None)
        future = waiter.admitted
        if future.done() and not future.cancelled() and future.exception() is None:
            self._release(future.result())
        elif not future.done():
            future.cancel()
        self._signal_capacity()  # waiters it held back may go now

    def _serve_queue(self) -> None:
        """Admit waiters in order: memory on a device goes to the first that needs it,
        and a request owed its turn holds back later joiners of other runners."""
        self._serve_scheduled = False
        memory_held: set[tuple[str, int]] = set()
        for waiter in self._queue:
            wanted = self._pending[waiter]
            if self._closed:
                error: DmrError = ServiceBusyError(
                    "the server is shutting down", RETRY_AFTER_SECONDS
                )
                self._settle(waiter, error=error)
                continue
            if waiter.key in self._joinable():
                owed = self._queue.turn_owed(
                    waiter.key, waiter.device, waiter.priority, self.settings.fair_wait,
                    before=waiter,
                )  # fmt: skip
                if owed is not None:
                    self._note_turn_owed(owed)
                    continue
            elif waiter.device in memory_held:
                continue
            try:
                runner = self._admit(wanted)
            except DmrError as refused:
                self._settle(waiter, error=refused)
                continue
            if runner is None:
                memory_held.add(waiter.device)
                continue
            self._settle(waiter, runner=runner)

    def _settle(
        self, waiter: Waiter, *, runner: Runner | None = None, error: DmrError | None = None
    ) -> None:
        self._queue.remove(waiter)
        self._pending.pop(waiter, None)
        if error is not None:
            waiter.admitted.set_exception(error)
        elif runner is not None:
            waiter.admitted.set_result(runner)

    def _admit(self, wanted: _Wanted) -> Runner | None:
        """The runner to use (existing or just started), or None to wait for memory."""
        for stale in self._runners.replicas(wanted.key):
            if stale.exited and not stale.loading:
                self._unregister(stale, reason="crashes")  # the watcher has not seen it yet
        config = self.config_for(wanted.stored.id)
        replicas = self._runners.replicas(wanted.key)
        if replicas:
            runner = self._balance(replicas, wanted.affinity)
            if runner.in_use >= self.settings.max_runner_requests:
                self.counters["rejected_busy"] += 1
                raise ServiceBusyError(
                    f"{wanted.model}'s runner already holds {runner.in_use} requests "
                    f"(DMR_MAX_RUNNER_REQUESTS={self.settings.max_runner_requests}); retry later",
                    RETRY_AFTER_SECONDS,
                )
            runner.in_use += 1
            if runner.in_use == 1:
                self.cpu_share.refresh()
            runner.cancel_idle_timer()
            runner.unload_when_idle = False
            if wanted.keep_alive is not None:
                runner.keep_alive = wanted.keep_alive
        else:
            may_evict = self._evictable_for(wanted.priority)
            placement = self._place(wanted, config, avoid=set(), may_evict=may_evict)
            if placement is None:
                return None
            runner = self._start_runner(wanted, config, placement, in_use=1)
        self._add_replicas(wanted, config)
        return runner

    def _place(
        self,
        wanted: _Wanted,
        config: RunnerConfig,
        *,
        avoid: set[tuple[str, int]],
        may_evict: Callable[[Resident], bool] | None,
    ) -> _Placement | None:
        """The device (a cluster node, or this machine's device) a new runner of
        `wanted` goes to: one where it fits as things are, the most room left first,
        else the one that evicts the fewest runners; None to wait for memory. A
        model that fits no device even alone is refused."""
        devices = [d for d in self._candidates(wanted.spec) if device_key(d) not in avoid]
        fitting: list[_Placement] = []
        never: list[tuple[AcceleratorInfo, int, int]] = []
        for device in devices:
            launch = self.configuration.launch(
                wanted.model, wanted.stored, wanted.key[2], config, device
            )
            estimate = self._estimate(wanted, launch)
            needed = bytes_needed(device, estimate)
            budget = self.budget(device)
            residents = [r for r in self._runners if r.device_key == device_key(device)]
            plan = plan_admission(needed, budget, residents, may_evict=may_evict)
            if plan.fits:
                room = budget - needed - sum(r.memory for r in residents if r not in plan.evict)
                fitting.append(_Placement(device, launch, estimate, needed, plan, room))
            elif plan.never_fits:
                never.append((device, needed, budget))
        if fitting:
            return min(fitting, key=lambda option: (len(option.plan.evict), -option.room))
        if never and len(never) == len(devices):
            self.counters["rejected_memory"] += 1
            raise _never_fits(wanted.model, never)
        return None

    def _estimate(self, wanted: _Wanted, launch: RunnerLaunch) -> MemoryEstimate:
        try:
            return wanted.spec.engine.estimate_memory(launch)
        except ValueError as error:
            raise InvalidRequestError(str(error)) from error
        except Exception as error:
            raise RunnerError(
                f"{wanted.spec.name} could not estimate {wanted.model}'s memory: {error}"
            ) from error

    def _start_runner(
        self, wanted: _Wanted, config: RunnerConfig, placement: _Placement, *, in_use: int
    ) -> Runner:
        # The socket directory is made only once the runner is admitted: queued
        # requests run `_place` again at every release.
        socket_dir = Path(tempfile.mkdtemp(prefix="dmr-runner-"))
        launch = replace(placement.launch, socket_path=socket_dir / "runner.sock")
        for victim in placement.plan.evict:
            assert isinstance(victim, Runner)
            log.info("evicting idle %s to make room for %s", _describe(victim), wanted.model)
            self._unregister(victim, reason="evictions")
        runner = Runner(
            key=wanted.key,
            spec=wanted.spec,
            launch=launch,
            memory=placement.needed,
            keep_alive=wanted.keep_alive if wanted.keep_alive is not None else config.keep_alive,
            socket_dir=socket_dir,
        )
        runner.in_use = in_use
        self._runners.add(runner)
        runner.load_task = asyncio.create_task(
            self._load(runner, placement.estimate), name=f"load {_describe(runner)}"
        )
        return runner

    def _add_replicas(self, wanted: _Wanted, config: RunnerConfig) -> None:
        """Start the replicas `config` asks for that are missing, each on a node with
        none of them, where it fits without evicting anything; the others wait for
        the next request (a node joins, memory frees)."""
        replicas = self._runners.replicas(wanted.key)
        missing = (config.replicas or 1) - len(replicas)
        avoid = {runner.device_key for runner in replicas}
        for _ in range(missing):
            try:
                placement = self._place(wanted, config, avoid=avoid, may_evict=_never_evict)
            except DmrError:
                return  # fits no other node: the replicas there are enough
            if placement is None:
                return
            spare = self._start_runner(wanted, config, placement, in_use=0)
            avoid.add(spare.device_key)

    def _nodes_changed(self) -> None:
        """A node joined or was lost: waiting requests may fit now, and replicas that
        are missing are placed again where there is room."""
        self._signal_capacity()
        self._replenish()

    def _replenish(self) -> None:
        """Start the missing replicas of every model that still has one running."""
        for key in self._runners.runner_keys():
            replicas = [r for r in self._runners.replicas(key) if not r.exited]
            config = self.config_for(key[1])
            stored = self.store.find(key[1])
            if not replicas or (config.replicas or 1) <= len(replicas) or stored is None:
                continue
            first = replicas[0]
            wanted = _Wanted(
                key, first.launch.model_name, stored, first.spec, None, first.device_key,
                Priority.INTERACTIVE,
            )  # fmt: skip
            self._add_replicas(wanted, config)

    def _balance(self, replicas: list[Runner], affinity: Affinity | None) -> Runner:
        """The replica a request joins: the one its prompt prefix hashes to while that
        one is not much busier than the least busy, else the least busy; ready ones
        before loading ones."""
        ready = [runner for runner in replicas if not runner.loading] or replicas
        if len(ready) == 1:
            return ready[0]
        least = min(runner.in_use for runner in ready)
        prefix = affinity() if affinity is not None else None
        if prefix:
            preferred = max(ready, key=lambda runner: _rendezvous(prefix, runner))
            if preferred.in_use < least + AFFINITY_SLACK:
                return preferred
        return min(ready, key=lambda runner: (runner.in_use, runner.last_used))

    def placement_devices(self) -> list[AcceleratorInfo]:
        """Where runners may go: the cluster's live nodes while the placement is
        connected and has any, else this machine's devices."""
        if self.placement is not None and self.placement.connected:
            nodes = self.placement.devices()
            if nodes:
                return nodes
        return self.devices

    def _candidates(self, spec: EngineSpec) -> list[AcceleratorInfo]:
        devices = self.placement_devices()
        chosen = choose_device(devices, spec.device_kinds)  # raises for no usable kind
        if chosen.node is None:
            return [chosen]  # this machine: the GPU with most free memory, else the CPU
        usable = [d for d in devices if spec.device_kinds is None or d.kind in spec.device_kinds]
        return [d for d in usable if d.is_gpu] or usable

    def _evictable_for(self, priority: Priority) -> Callable[[Resident], bool] | None:
        """Batch work evicts only runners idle for `batch_evict_after` seconds: a model
        between two of a chat's turns is still in use. When one such runner would
        qualify later, the queue is walked again then."""
        if priority is Priority.INTERACTIVE:
            return None
        grace = self.settings.batch_evict_after
        now = time.monotonic()

        def old_enough(resident: Resident) -> bool:
            idle = now - resident.last_used
            if idle < grace and resident.evictable:
                self._recheck_at(now + grace - idle)
            return idle >= grace

        return old_enough

    def _recheck_at(self, when: float) -> None:
        """Walk the queue again at monotonic time `when` (one timer, the earliest)."""
        timer = self._recheck
        if timer is not None and not timer.cancelled() and timer.when() <= when:
            return
        if timer is not None:
            timer.cancel()
        loop = asyncio.get_running_loop()
        self._recheck = loop.call_at(loop.time() + (when - time.monotonic()), self._rechecked)

    def _rechecked(self) -> None:
        self._recheck = None
        self._signal_capacity()

    def _release(self, runner: Runner) -> None:
        runner.in_use -= 1
        if runner.in_use == 0:
            self.cpu_share.refresh()
        runner.touch()
        if runner.in_use == 0 and self._runners.holds(runner) and not runner.loading:
            self._schedule_idle(runner)
        self._signal_capacity()

    # ------------------------------------------------------------------ loading

    async def _load(self, runner: Runner, estimate: MemoryEstimate) -> None:
        name = _describe(runner)
        # A switch as clients feel it: the evicted runners' stop, then this load.
        admitted = time.monotonic()
        try:
            # Evicted runners must be gone before this one claims their memory.
            if self._stopping:
                await asyncio.gather(*list(self._stopping), return_exceptions=True)
            started = time.monotonic()
            command = await self._start_process(runner, name, estimate)
            runner.cpu_share = command.cpu_share
            assert runner.process is not None
            await runner.process.wait_healthy(runner.handle.client, command.startup_timeout)
            runner.watch_task = asyncio.create_task(self._watch(runner), name=f"watch {name}")
            self.counters["loads"] += 1
            self.cpu_share.refresh()  # it computes from now on, for its waiting requests
            log.info("%s ready in %.1fs", name, time.monotonic() - started)
            self.switch_seconds.observe(time.monotonic() - admitted)
        except BaseException as error:
            self.counters["load_failures"] += 1
            if isinstance(error, DmrError):
                runner.error = error
            elif isinstance(error, asyncio.CancelledError):
                runner.error = RunnerError(runner.stop_reason or f"loading {name} was cancelled")
            else:
                runner.error = RunnerError(f"{name} failed to start: {error}")
            log.error("%s", runner.error.message)
            self._runners.discard(runner)
            # Also removes the socket directory and closes the handle's client; by the
            # time this task runs, this load task has finished.
            self._track_stop(runner.stop())
            self._signal_capacity()
            if not isinstance(error, Exception):
                raise
        finally:
            runner.loading = False
            runner.ready.set()
            if runner.error is None and runner.in_use == 0:
                self._schedule_idle(runner)

    async def _start_process(
        self, runner: Runner, name: str, estimate: MemoryEstimate
    ) -> RunnerCommand:
        """Start the runner's process: here, or on its cluster node through the
        placement (which builds the command there, where the model's files are)."""
        where = f"{format_bytes(estimate.total)} on {runner.device.name}"
        if runner.device.node is not None and self.placement is not None:
            placed: PlacedRunner = self.placement.place(
                runner.spec.name,
                runner.launch,
                name=name,
                memory=runner.memory,
                log_path=self._log_path(runner),
            )
            runner.process = placed
            log.info("placing %s (estimated %s)", name, where)
            command = await placed.start()
            await runner.handle.use_tcp(placed.address)
            runner.handle.node = runner.device.node
            return command
        try:
            command = runner.spec.engine.runner_command(runner.launch)
        except ValueError as error:
            raise InvalidRequestError(str(error)) from error
        process = RunnerProcess(command, name=name, log_path=self._log_path(runner))
        runner.process = process
        log.info("starting %s (estimated %s): %s", name, where, shlex.join(command.argv))
        await process.start()
        return command

    async def _watch(self, runner: Runner) -> None:
        """Notice a runner that dies on its own: evict it and say why."""
        assert runner.process is not None
        await runner.process.wait()
        if runner.process.stopping:
            return
        log.error("runner crashed: %s", runner.process.failure_message(10))
        runner.handle.abort_streams()  # a lost node's connections may never close
        if self._runners.holds(runner):
            self._unregister(runner, reason="crashes")
            self._replenish()

    # ------------------------------------------------------------------ unloading

    def _schedule_idle(self, runner: Runner) -> None:
        runner.cancel_idle_timer()
        if runner.unload_when_idle:
            self._unregister(runner, reason="idle_unloads")
            return
        seconds = idle_deadline_seconds(runner.keep_alive, self.settings.idle_timeout)
        if seconds is None:
            return
        if seconds <= 0:
            self._unregister(runner, reason="idle_unloads")
            return
        runner.idle_task = asyncio.create_task(self._expire(runner, seconds))

    async def _expire(self, runner: Runner, seconds: float) -> None:
        await asyncio.sleep(seconds)
        if runner.in_use == 0 and self._runners.holds(runner):
            runner.idle_task = None  # do not cancel ourselves while stopping
            log.info("unloading %s after %s idle", _describe(runner), format_duration(seconds))
            self._unregister(runner, reason="idle_unloads")

    def _unregister(self, runner: Runner, *, reason: str) -> None:
        """Forget a runner now and stop its process in the background."""
        self._runners.discard(runner)
        self.counters[reason] += 1
        self._track_stop(runner.stop())
        self._signal_capacity()
        if runner.in_use:
            self.cpu_share.refresh()

    def _track_stop(self, stopping: Any) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(stopping)
        self._stopping.add(task)

        def done(finished: asyncio.Task[None]) -> None:
            self._stopping.discard(finished)
            self._signal_capacity()

        task.add_done_callback(done)

    def _signal_capacity(self) -> None:
        # Served on the next loop turn, never in the middle of an admission that
        # is evicting runners: the queue must see the finished decision.
        if self._queue and not self._serve_scheduled:
            self._serve_scheduled = True
            asyncio.get_running_loop().call_soon(self._serve_queue)

    async def unload(
        self,
        *,
        all: bool = False,
        backend: str | None = None,
        models: Iterable[str] = (),
        cancel_busy: bool = True,
    ) -> Unloaded:
        """Unload matching runners now. A busy one's requests are cancelled: its process
        stops, and their clients get an error saying the model was unloaded; a model
        reported unloaded is never still loaded. With `cancel_busy` False (Ollama's
        `keep_alive: 0`), busy runners go when their requests end, and are not counted."""
        wanted_ids: set[str] = set()
        wanted_names = set(models)
        for name in wanted_names:
            stored = self.store.find(name)
            if stored is not None:
                wanted_ids.add(stored.id)
        matched = []
        for runner in list(self._runners.values()):
            if backend and runner.spec.name != backend:
                continue
            if not all and (wanted_names or not backend):
                in_models = runner.key[1] in wanted_ids or runner.handle.model_name in wanted_names
                if not in_models:
                    continue
            matched.append(runner)
        stops = []
        cancelled = 0
        for runner in matched:
            if not runner.evictable and not cancel_busy:
                runner.unload_when_idle = True
                continue
            if not runner.evictable:
                cancelled += runner.in_use
                runner.stop_reason = (
                    f"{runner.handle.model_name} was unloaded (dmr unload) while this "
                    "request was running"
                )
                log.warning(
                    "unloading %s: its %d request(s) in flight are cancelled",
                    _describe(runner),
                    runner.in_use,
                )
            self._runners.discard(runner)
            self.counters["unloads"] += 1
            stops.append(runner.stop())
        if stops:
            await asyncio.gather(*stops, return_exceptions=True)
        self._signal_capacity()
        return Unloaded(runners=len(stops), cancelled_requests=cancelled)

    # ------------------------------------------------------------------ configuration

    async def configure(
        self,
        model: str,
        mode: Mode | str | None,
        backend: str | None,
        config: RunnerConfig,
        *,
        persist: bool = True,
    ) -> None:
        """Remember `config` for `model` (in the store, so it outlives a restart, unless
        `persist` is False); an idle runner of it is unloaded so the next load uses it, a
        busy one is a `ConflictError`."""
        mode = Mode(mode) if mode else Mode.COMPLETION
        stored, spec = self.configuration.check(model, mode, backend, config)
        await self._settle_loads(stored.id)
        mine = [r for r in self._runners.values() if r.key[1] == stored.id]
        busy = [r for r in mine if not r.evictable]
        if busy:
            raise ConflictError(
                f"{model} is in use by a running request; configure it once it is idle"
            )
        configured = ConfiguredModel(model_name=model, backend=spec.name, mode=mode, config=config)
        self.configuration.remember(stored.id, configured, persist=persist)
        stops = []
        for runner in mine:
            self._runners.discard(runner)
            stops.append(runner.stop())
        if stops:
            await asyncio.gather(*stops, return_exceptions=True)
            self._signal_capacity()

    async def _settle_loads(self, model_id: str) -> None:
        """Let the model's runners that are loading finish first: a load (often the
        preload an earlier `_configure` started) is not a running request, and
        configuring twice in a row (`compose up` again) must not be refused for it."""
        loading = [r for r in self._runners.values() if r.key[1] == model_id and r.loading]
        if not loading:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_SETTLE_LOADS_SECONDS):
                await asyncio.gather(*(r.ready.wait() for r in loading))
        # A preload releases its runner a few loop turns after the load ends.
        for _ in range(50):
            if not any(r.in_use for r in loading if self._runners.holds(r)):
                break
            await asyncio.sleep(0.02)

    def config_for(self, model_id: str) -> RunnerConfig:
        return self.configuration.config_for(model_id)

    def configs(self, model: str | None = None) -> list[dict[str, Any]]:
        """`GET /engines/_configure` items: each value in effect, and its `sources`."""
        return self.configuration.describe(model)

    # ------------------------------------------------------------------ status

    def ps(self) -> list[dict[str, Any]]:
        """`GET /engines/ps` items (DMR's fields, plus the memory dmr accounts and the
        requests waiting for memory to use each runner)."""
        waiting = {(q.backend, q.model_id, q.mode): q.waiting for q in self._queue.by_runner()}
        return [
            {
                "backend_name": runner.spec.name,
                "model_name": runner.handle.model_name,
                "model_id": runner.key[1],
                "mode": runner.key[2].value,
                "last_used": datetime.fromtimestamp(runner.last_used_wall, UTC).isoformat(),
                "in_use": runner.in_use > 0,
                "loading": runner.loading,
                "keep_alive": _keep_alive_text(
                    runner.keep_alive
                    if runner.keep_alive is not None
                    else self.settings.idle_timeout or -1
                ),
                "memory": runner.memory,
                "device": runner.device.name,
                # The cluster node's ID (None on this machine), and its address.
                "node": runner.device.node,
                "node_address": runner.device.details.get("address"),
                "pid": runner.process.pid if runner.process else None,
                "waiting": waiting.get(runner.key, 0),
            }
            for runner in sorted(self._runners.values(), key=lambda r: -r.last_used)
        ]

    def runners(self) -> list[RunnerHandle]:
        """Handles of the ready runners (for metrics and logs)."""
        return [runner.handle for runner in self._runners.values() if not runner.loading]

    def budget(self, device: AcceleratorInfo) -> int:
        return memory_budget(device, self.settings.memory_budget)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def queue(self) -> list[QueuedModel]:
        """Requests waiting for memory, per (engine, model, mode)."""
        return self._queue.by_runner()

    # ------------------------------------------------------------------ helpers

    def _resolve(self, model: str) -> StoredModel:
        return self.store.get(model)  # raises ModelNotFoundError (404) for an unknown name

    def formats(self) -> dict[str, ModelFormat]:
        return self.resolver.formats

    def model_format(self, stored: StoredModel) -> str:
        return self.resolver.model_format(stored)

    def engine_for(self, stored: StoredModel, mode: Mode, backend: str | None) -> EngineSpec:
        return self.resolver.engine_for(stored, mode, backend)

    def _log_path(self, runner: Runner) -> Path | None:
        if self.settings.log_dir is None:
            return None
        backend, model_id, mode = runner.key
        short = model_id.removeprefix("sha256:")[:12]
        return self.settings.log_dir / f"runner-{backend}-{short}-{mode.value}.log"


def _never_evict(resident: Resident) -> bool:
    return False


def _rendezvous(prefix: str, runner: Runner) -> int:
    """Highest-random-weight hashing: a prefix keeps its replica while the set of
    replicas stays the same, and only the lost replica's prefixes move."""
    digest = hashlib.blake2b(f"{prefix}|{runner.device_key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def _never_fits(model: str, refusals: list[tuple[AcceleratorInfo, int, int]]) -> DmrError:
    device, needed, budget = max(refusals, key=lambda refusal: refusal[2])
    if device.node is None:
        return InsufficientMemoryError(
            f"{model} needs {format_bytes(needed)} ({needed} bytes) on {device.name} "
            f"but the memory budget is {format_bytes(budget)} ({budget} bytes); "
            "try a smaller context size or a smaller quantization"
        )
    return InsufficientMemoryError(
        f"{model} needs {format_bytes(needed)} ({needed} bytes) and fits no node of the "
        f"cluster: the largest, {device.name}, has {format_bytes(budget)} ({budget} bytes); "
        "add a node with more memory, or try a smaller context size or quantization"
    )


def _describe(runner: Runner) -> str:
    return f"{runner.spec.name} runner for {runner.handle.model_name} ({runner.key[2].value})"


def _keep_alive_text(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return format_duration(seconds)
