"""Stopping multi-worker trials without leaking their workers (the ``ray_train_trial`` path of ``platform.trials``).

Single-worker trials run in their Tune actor and need none of this: Tune stops them like any function trainable.

A multi-worker trial drives a Ray Train run. When Tune stops a trial it kills the trial's actor, and with it the Ray
Train controller the actor owns, before the controller can remove its workers' placement group; Ray Train's own
clean-up actor (``PlacementGroupCleaner``, detached, one per run) polls the State API, which needs the full
dashboard (``ray[default]``) that a ``ray[tune,train]`` install lacks. Without help every stopped trial would hold
its workers' CPUs until the driver exits, and the sweep would stall. So :class:`GracefulASHA` first asks
:class:`TrialControllersActor` (one named actor per sweep driver, where every trial's :class:`TrialControllerCallback`
registers its controller and placement group) to abort the trial's Ray Train run the way Ctrl-C would — the
controller then stops its cleaner and removes its group itself — and only then lets Tune stop the trial. The
controllers actor also watches the controllers and removes the placement group of any that die without shutting
down.

Private Ray API: ``ray.train.v2._internal.execution.callback``'s ``ControllerCallback`` / ``WorkerGroupCallback`` are
the only hooks that see a run's controller and placement group (checked against Ray 2.60); nothing public exposes them.
"""

from __future__ import annotations

import logging
from typing import Any

import ray
from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler

logger = logging.getLogger(__name__)

CONTROLLERS_ACTOR_NAME = "coop-trial-controllers"
REAPER_INTERVAL_S = 2.0


def was_stopped_by_scheduler(trial_id: str) -> bool:
    """Whether ``GracefulASHA`` aborted this trial's Ray Train run (so its ``fit()`` error is expected)."""
    try:
        actor = ray.get_actor(CONTROLLERS_ACTOR_NAME)
        return bool(ray.get(actor.was_stopped.remote(trial_id), timeout=30))
    except Exception:
        return False


class TrialReportCallback(TuneReportCallback):
    """``TuneReportCallback`` minus the worker's ``done`` flag (the trial ends when its trainer returns)."""

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        super().after_report(run_context, [{k: v for k, v in m.items() if k != "done"} for m in metrics], checkpoint)


@ray.remote(num_cpus=0)
class TrialControllersActor:
    """The sweep's book of trial controllers (one named actor per sweep driver): stop them, reap their groups."""

    def __init__(self, interval_s: float = REAPER_INTERVAL_S) -> None:
        self._interval_s = interval_s
        self._live: dict[str, tuple[Any, list[Any]]] = {}  # trial id -> (controller handle, placement groups)
        self._stopped: set[str] = set()
        self._task: Any = None
        self.counts = {"registered": 0, "released": 0, "stopped": 0, "reaped": 0}

    async def register(self, trial_id: str, controller: Any, placement_group: Any) -> None:
        self._live.setdefault(trial_id, (controller, []))[1].append(placement_group)
        self.counts["registered"] += 1
        if self._task is None:
            import asyncio

            self._task = asyncio.get_running_loop().create_task(self._watch())  # keep a reference: not collected

    async def release(self, trial_id: str) -> None:
        """The trial's controller shuts down by itself: forget it."""
        if self._live.pop(trial_id, None) is not None:
            self.counts["released"] += 1

    async def stop(self, trial_id: str) -> bool:
        """Abort the trial's Ray Train run (workers and placement group go first); False if it is not running."""
        from ray.exceptions import RayActorError

        self._stopped.add(trial_id)
        entry = self._live.pop(trial_id, None)
        if entry is None:
            return False
        controller, groups = entry
        self.counts["stopped"] += 1
        try:
            await controller.abort.remote()
        except RayActorError:
            pass  # abort() ends with the controller exiting
        self._remove(groups)
        return True

    async def was_stopped(self, trial_id: str) -> bool:
        return trial_id in self._stopped

    async def stats(self) -> dict[str, int]:
        """Controllers registered, released (clean shutdown), stopped (aborted) and placement groups reaped."""
        return dict(self.counts)

    def _remove(self, groups: list[Any]) -> None:
        from ray.util.placement_group import placement_group_table, remove_placement_group

        for group in groups:
            if placement_group_table(group).get("state") in ("REMOVED", None):
                continue
            try:
                remove_placement_group(group)
                self.counts["reaped"] += 1
            except Exception as err:  # removed meanwhile
                logger.debug("placement group %s: %s", group.id, err)

    async def _watch(self) -> None:
        """Safety net: remove the placement groups of controllers that died without shutting down."""
        import asyncio

        from ray.exceptions import ActorDiedError

        while True:
            await asyncio.sleep(self._interval_s)
            for trial_id, (controller, groups) in list(self._live.items()):
                try:
                    await asyncio.wait_for(controller.__ray_ready__.remote(), 30)
                    continue  # alive
                except ActorDiedError:
                    pass
                except Exception as err:  # busy or unreachable for now: look again next round
                    logger.debug("trial %s: controller not answering (%s)", trial_id, type(err).__name__)
                    continue
                if self._live.pop(trial_id, None) is not None:
                    try:
                        self._remove(groups)
                    except Exception:  # never let the watch loop die
                        logger.exception("trial %s: cannot remove its placement groups", trial_id)


class TrialControllerCallback(ControllerCallback, WorkerGroupCallback):
    """Ray Train callback: registers a trial's controller and placement group with the sweep's controllers actor."""

    def __init__(self, trial_id: str, controllers_name: str = CONTROLLERS_ACTOR_NAME) -> None:
        self.trial_id = trial_id
        self.controllers_name = controllers_name
        self._controllers: Any = None

    def after_controller_start(self, train_run_context: Any) -> None:
        try:
            self._controllers = ray.get_actor(self.controllers_name)
        except ValueError:
            logger.warning("no trial controllers actor %r: a stopped trial may hold its workers' CPUs",
                           self.controllers_name)

    def after_worker_group_start(self, worker_group: Any) -> None:
        if self._controllers is None:
            return
        group = worker_group.get_worker_group_state().placement_group_handle.placement_group
        controller = ray.get_runtime_context().current_actor
        ray.get(self._controllers.register.remote(self.trial_id, controller, group))

    async def before_controller_shutdown(self) -> None:
        if self._controllers is not None:
            self._controllers.release.remote(self.trial_id)
            self._controllers = None


class GracefulASHA(ASHAScheduler):
    """ASHA whose stop decisions first abort the trial's Ray Train run, so its workers are released cleanly.

    At the last epoch ASHA would also say STOP; there the trial is left to return by itself instead.
    """

    def __init__(self, *, time_attr: str, max_t: int, controllers_name: str = CONTROLLERS_ACTOR_NAME,
                 **kwargs: Any) -> None:
        super().__init__(time_attr=time_attr, max_t=max_t, **kwargs)
        self.time_attr = time_attr  # our own copies: ASHAScheduler keeps these in private fields
        self.max_t = max_t
        self.controllers_name = controllers_name

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        if decision != self.STOP:
            return decision
        if result.get(self.time_attr, 0) >= self.max_t:
            return self.CONTINUE  # finished: the trainer returns on its own
        try:
            controllers = ray.get_actor(self.controllers_name)
            ray.get(controllers.stop.remote(trial.trial_id), timeout=120)
        except Exception as err:  # the controllers actor's watch loop still reaps the placement group
            logger.warning("trial %s: clean stop failed (%s); Tune stops it", trial.trial_id, err)
        return decision
