"""The evaluation's wall clock, split into parts that add up to it.

Summing each sample's own waits (records' generation_s, execution_s) counts shared time once per sample: 256
trajectories waiting on one batch for a second are 256 s of "generation" in one second of wall time. Here the
sampling phase is cut instead into consecutive intervals by what was in progress during each:

- generation: at least one generation request out (the sampler is working for someone);
- execution: no generation out, but code running (the sampler idle while the sandbox works: a stall);
- queueing: neither (trajectories between steps: Ray transfers, scheduling, the job's own loop).

With setup (before the first sample: Ray, actors, model loading) and finishing (after the last one, up to the
report) the parts add up to the wall time exactly.
"""

from __future__ import annotations

import time

PHASES = ("setup", "generation", "execution", "queueing", "finishing")


class WallClock:
    def __init__(self):
        self.started = time.perf_counter()
        self.parts = dict.fromkeys(PHASES, 0.0)
        self._sampling_started: float | None = None
        self._sampling_ended: float | None = None
        self._last = self.started
        self._in_progress = {"generation": 0, "execution": 0}  # requests out, per part

    def _advance(self) -> None:
        now = time.perf_counter()
        busy = self._in_progress
        part = "generation" if busy["generation"] else "execution" if busy["execution"] else "queueing"
        self.parts[part] += now - self._last
        self._last = now

    def start_sampling(self) -> None:
        self._sampling_started = self._last = time.perf_counter()
        self.parts["setup"] = self._sampling_started - self.started

    def end_sampling(self) -> None:
        self._advance()
        self._sampling_ended = self._last

    # begin/end pairs, not context managers: they wrap every request of every sample, and a generator-based
    # context manager costs more than the bookkeeping itself.
    def begin(self, part: str) -> None:
        self._advance()
        self._in_progress[part] += 1

    def end(self, part: str) -> None:
        self._advance()
        self._in_progress[part] -= 1

    def breakdown(self) -> dict:
        """Seconds per part (setup .. finishing, summing to wall_s) and wall_s, as of now."""
        now = time.perf_counter()
        parts = dict(self.parts)
        if self._sampling_started is None:  # nothing to sample (all resumed): setup runs to the report
            parts["setup"] = now - self.started
        else:
            parts["finishing"] = now - (self._sampling_ended or now)
        return {**{k: round(v, 3) for k, v in parts.items()}, "wall_s": round(now - self.started, 3)}


class TimedSampler:
    """A sampler whose requests are counted as generation on the wall clock."""

    def __init__(self, sampler, clock: WallClock):
        self.sampler = sampler
        self.clock = clock
        self.uses_token_ids = sampler.uses_token_ids
        self.chat = getattr(sampler, "chat", False)

    async def generate(self, request):
        self.clock.begin("generation")
        try:
            return await self.sampler.generate(request)
        finally:
            self.clock.end("generation")

    def stats(self) -> dict:
        return self.sampler.stats()


class TimedExecutor:
    """An executor whose runs are counted as execution on the wall clock."""

    def __init__(self, executor, clock: WallClock):
        self.executor = executor
        self.clock = clock

    async def run(self, code: str, history: list[str]):
        self.clock.begin("execution")
        try:
            return await self.executor.run(code, history)
        finally:
            self.clock.end("execution")

    def stats(self) -> dict:
        return self.executor.stats()
