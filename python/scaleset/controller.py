"""The in-process controller: an engine, its policies, and the typed commands that change them.

:class:`Controller` is what a Python program uses without a server: every mutation is a command from
:mod:`scaleset.commands`, run at an explicit time, exactly as the server runs (and replays) them. Reads go
straight to the engine facade.

Time is always passed in. Each method takes ``now`` (seconds since the epoch); without it a change
happens at the controller's current time, which is the latest time it was given (0.0 until then). The
controller never reads a clock, so the same calls give the same results.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from scaleset import commands as cmd
from scaleset.engine import Engine
from scaleset.model import (
    AutoscaleDecision,
    AutoscaleSetting,
    Eviction,
    Instance,
    Plan,
    Region,
    ScaleSet,
    ScaleSetSpec,
)
from scaleset.policies import Action, PolicyRunner, RollingUpgrade, ZoneBalanceOperation
from scaleset.policies.lifecycle import FleetReport, Operation

if TYPE_CHECKING:
    from scaleset.rebalance import RebalancePlan

__all__ = ["Controller"]


class Controller:
    """Scale sets in one region, with their time-driven policies (rolling upgrades, automatic repairs,
    automatic zone balance).

    Args:
        region: zones, fault domains per zone, zones down, and capacity pools.
        instance_limit: replaces Azure's per-scale-set instance limits (1,000 / 600 / 200 / 100) with this
            ceiling, for private fleets. ``None`` enforces Azure's limits.
    """

    def __init__(self, region: Region, *, instance_limit: int | None = None) -> None:
        self.engine = Engine(region, instance_limit=instance_limit)
        self.policies = PolicyRunner()
        #: The controller's time: the latest ``now`` it was given.
        self.now = 0.0

    @classmethod
    def from_state(cls, state: dict[str, Any], *, instance_limit: int | None = None) -> Controller:
        """Rebuilds a controller saved by :meth:`export_state`."""
        controller = cls.__new__(cls)
        controller.engine = Engine.from_state(state, instance_limit=instance_limit)
        controller.policies = PolicyRunner.restore(state.get("policies", {}))
        controller.policies.lifecycle.attach(controller.engine)
        controller.now = float(state.get("now", 0.0))
        return controller

    def export_state(self, *, scale_sets: bool = True) -> dict[str, Any]:
        """The engine's and the policies' state as plain data, for snapshots. Without ``scale_sets``, the
        scale sets and their policies' state are left out (saved one by one: :meth:`export_scale_set`);
        the policy state of a name with no scale set (an autoscale setting outliving its scale set, as an
        Azure autoscale resource does) stays in."""
        without = () if scale_sets else frozenset(self.engine.scale_set_names())
        return {
            **self.engine.export_state(scale_sets=scale_sets),
            "policies": self.policies.export(without=without),
            "now": self.now,
        }

    def export_scale_set(self, name: str) -> dict[str, Any]:
        """One scale set with its policies' state, for a snapshot part (:meth:`restore_scale_set`)."""
        return {**self.engine.export_scale_set(name), "policies": self.policies.export_scale_set(name)}

    def restore_scale_set(self, saved: dict[str, Any]) -> None:
        """Puts back one scale set :meth:`export_scale_set` saved (a part without policies, as older
        versions wrote, keeps what the snapshot's document holds)."""
        self.engine.restore_scale_set(saved)
        self.policies.restore_scale_set(saved["spec"]["name"], saved.get("policies", {}))

    def execute(self, command: cmd.Command, now: float | None = None) -> Any:
        """Validates and applies one command at ``now`` (default: the controller's time)."""
        if now is not None and now > self.now:
            self.now = now
        command.validate()
        at = self.now if now is None else now
        try:
            return command.apply(self.engine, self.policies, at)
        finally:
            if self.engine.journal:  # what the command changed, for executors to carry out
                self.policies.lifecycle.absorb(self.engine, at)

    # ----- executors ------------------------------------------------------------------------------

    def set_execution_mode(self, mode: str, *, now: float | None = None) -> list[Action]:
        """``Executors``: every create, delete, reimage and restart becomes an operation for executors, and
        instances are Creating or Updating until one reports. ``Immediate`` (the default): plans take
        effect as made; switching back completes whatever was pending."""
        return self.execute(cmd.SetExecutionMode(mode), now)  # type: ignore[no-any-return]

    def report_operation(
        self,
        name: str,
        operation_id: int,
        succeeded: bool,
        error_code: str = "",
        error_message: str = "",
        *,
        address: str = "",
        provider_id: str = "",
        now: float | None = None,
    ) -> list[Action] | None:
        """An executor's outcome of one operation (what it led to; None if it was no longer pending). A failed create is placed again by the scale set's
        rules (see :mod:`scaleset.policies.lifecycle`); a second report of the same operation does nothing."""
        command = cmd.ReportOperation(
            name, operation_id, succeeded, error_code, error_message, address, provider_id
        )
        return self.execute(command, now)  # type: ignore[no-any-return]

    def acknowledge_scheduled_event(
        self, name: str, event_id: int, *, now: float | None = None
    ) -> list[Action] | None:
        """Carries out a scheduled Spot eviction now (an executor drained its instances); None if the event
        is no longer pending."""
        return self.execute(cmd.AcknowledgeScheduledEvent(name, event_id), now)  # type: ignore[no-any-return]

    def complete_lifecycle_action(
        self, name: str, instance_id: int, hook: str, result: str = "Continue", *, now: float | None = None
    ) -> list[Action] | None:
        """Ends an instance's wait on lifecycle hook ``hook``: ``Continue`` (a launched instance counts, a
        terminating one is deleted) or ``Abandon`` (a launched one is deleted and replaced). None if no
        such action waits."""
        command = cmd.CompleteLifecycleAction(name, instance_id, hook, result)
        return self.execute(command, now)  # type: ignore[no-any-return]

    def record_lifecycle_action_heartbeat(
        self, name: str, instance_id: int, hook: str, *, now: float | None = None
    ) -> bool:
        """Restarts the timeout of an instance's wait on ``hook``; False if no such action waits."""
        return self.execute(cmd.RecordLifecycleActionHeartbeat(name, instance_id, hook), now)  # type: ignore[no-any-return]

    def pending_operations(self, name: str | None = None) -> list[Operation]:
        """Operations waiting for an executor (of ``name``, or all), oldest first."""
        return self.policies.lifecycle.pending(name)

    def desired_capacity(self, name: str) -> int:
        """The instances ``name`` should have: its instances plus what could not be placed yet."""
        return self.policies.lifecycle.desired_capacity(self.engine, name)

    def fleet_report(self, name: str) -> FleetReport:
        """How far ``name``'s infrastructure is from its desired state: desired capacity, instances by
        provisioning state, the shortfall and its backoff, the last error, pending operations."""
        return self.policies.lifecycle.report(self.engine, name)

    @property
    def execution_mode(self) -> str:
        return self.policies.lifecycle.mode

    # ----- scale sets -----------------------------------------------------------------------------

    def create_scale_set(self, spec: ScaleSetSpec, capacity: int = 0, *, now: float | None = None) -> Plan:
        """Validates and stores a scale set, then scales it to ``capacity``; returns the placing plan.
        Nothing is stored if validation or placement fails."""
        return self.execute(cmd.CreateScaleSet(spec, capacity), now)  # type: ignore[no-any-return]

    def update_scale_set(self, spec: ScaleSetSpec, *, now: float | None = None) -> ScaleSetSpec:
        """Replaces a scale set's model; unset optional fields keep their stored values. A changed VM model
        bumps ``model_version`` and, per ``upgrade_policy.mode``, upgrades instances."""
        return self.execute(cmd.UpdateScaleSet(spec), now)  # type: ignore[no-any-return]

    def delete_scale_set(self, name: str, *, now: float | None = None) -> None:
        """Deletes a scale set and its instances (protection does not block deleting the whole set)."""
        self.execute(cmd.DeleteScaleSet(name), now)

    def set_capacity(
        self, name: str, capacity: int, dry_run: bool = False, *, now: float | None = None
    ) -> Plan:
        """Scales out or in to ``capacity`` instances. With ``dry_run`` nothing changes."""
        return self.execute(cmd.SetCapacity(name, capacity, dry_run), now)  # type: ignore[no-any-return]

    # ----- instances ------------------------------------------------------------------------------

    def import_instances(self, name: str, instances: Iterable[Instance], *, now: float | None = None) -> None:
        """Adopts existing instances with their ids, zones, fault domains, sizes, priorities and states."""
        self.execute(cmd.ImportInstances(name, tuple(instances)), now)

    def delete_instances(self, name: str, instance_ids: Iterable[int], *, now: float | None = None) -> Plan:
        """Deletes chosen instances, protected ones included (as Azure allows for user deletes)."""
        return self.execute(cmd.DeleteInstances(name, tuple(instance_ids)), now)  # type: ignore[no-any-return]

    def evict(self, name: str, instance_ids: Iterable[int], *, now: float | None = None) -> Eviction:
        """Spot eviction per the scale set's ``eviction_policy`` (Delete removes, Deallocate keeps)."""
        return self.execute(cmd.EvictInstances(name, tuple(instance_ids)), now)  # type: ignore[no-any-return]

    def set_protection(
        self,
        name: str,
        instance_ids: Iterable[int],
        protect_from_scale_in: bool,
        protect_from_scale_set_actions: bool = False,
        *,
        now: float | None = None,
    ) -> None:
        """Sets both protection flags on the given instances (Azure's instance protection policy)."""
        self.execute(
            cmd.SetProtection(
                name, tuple(instance_ids), bool(protect_from_scale_in), bool(protect_from_scale_set_actions)
            ),
            now,
        )

    def report_health(
        self, name: str, instance_ids: Iterable[int], health: str, *, now: float | None = None
    ) -> None:
        """Records Application Health: ``Healthy``, ``Unhealthy``, ``Unknown`` or ``Initializing``."""
        self.execute(cmd.ReportHealth(name, ((tuple(instance_ids), health),)), now)

    # ----- rebalancing ----------------------------------------------------------------------------

    def rebalance(
        self,
        name: str,
        max_replacements: int | None = None,
        max_surge: int = 1,
        time_limit_s: float | None = None,
        dry_run: bool = True,
        *,
        max_replacements_percent: float | None = None,
        num_workers: int = 1,
        random_seed: int = 0,
        now: float | None = None,
    ) -> RebalancePlan:
        """Plans (and with ``dry_run=False`` applies) the fewest replacements that bring ``name`` back to
        its target shape: zones and fault domains balanced, the Spot mix exact, sizes per the model,
        every pool within capacity. Protected and deallocated instances never move.

        Args:
            max_replacements: the most instances this plan may replace (``None``: no limit).
            max_replacements_percent: the same as a percentage of the capacity (the smaller limit wins).
            max_surge: the most extra instances running at once; each wave creates that many, then
                deletes as many.
            time_limit_s: the solver's time limit; when it ends the proof early, the best plan found is
                returned with ``status == "FEASIBLE"`` and its bound. ``None``: 1 s, and 1 s more per
                250,000 instances (the plan's ``time_limit_s`` says which limit the solve had).
            num_workers: CP-SAT workers. One (the default) is deterministic.
        """
        command = cmd.Rebalance(
            name,
            max_replacements,
            max_replacements_percent,
            max_surge,
            time_limit_s,
            dry_run,
            num_workers,
            random_seed,
        )
        return self.execute(command, now)  # type: ignore[no-any-return]

    # ----- time-driven policies -------------------------------------------------------------------

    def advance(self, now: float, name: str | None = None) -> list[Action]:
        """Advances the time-driven policies of every scale set, or of ``name``, to ``now`` (seconds since
        the epoch). Returns what was done; the same state and ``now`` give the same actions."""
        return self.execute(cmd.Advance(name or ""), now)  # type: ignore[no-any-return]

    def start_rolling_upgrade(self, name: str, *, now: float | None = None) -> RollingUpgrade:
        """Starts a rolling upgrade of ``name``'s out-of-date instances (any upgrade mode); the batches run
        as :meth:`advance` moves time on. Fails with ``RollingUpgradeInProgress`` if one is running."""
        return self.execute(cmd.StartRollingUpgrade(name), now)  # type: ignore[no-any-return]

    def cancel_rolling_upgrade(self, name: str, *, now: float | None = None) -> RollingUpgrade:
        """Stops the rolling upgrade in progress; instances already upgraded keep the new model."""
        return self.execute(cmd.CancelRollingUpgrade(name), now)  # type: ignore[no-any-return]

    def upgrade_instances(self, name: str, instance_ids: Iterable[int], *, now: float | None = None) -> None:
        """Manual upgrade: moves the given instances to the latest model in place (health Initializing)."""
        self.execute(cmd.UpgradeInstances(name, tuple(instance_ids)), now)

    def set_repairs_service_state(self, name: str, state: str, *, now: float | None = None) -> None:
        """Resumes (``Running``) or suspends (``Suspended``) automatic repairs of ``name``."""
        self.execute(cmd.SetRepairsServiceState(name, state), now)

    def get_rolling_upgrade(self, name: str) -> RollingUpgrade | None:
        """The latest rolling upgrade of ``name`` (a copy), or None if there has been none."""
        self.engine.capacity(name)  # NotFound for an unknown scale set
        return self.policies.get_rolling_upgrade(name)

    def repairs_service_state(self, name: str) -> str:
        """``Running`` or ``Suspended`` (after repeated failed repairs)."""
        self.engine.capacity(name)
        return self.policies.repairs_service_state(name)

    def zone_balance_operation(self, name: str) -> ZoneBalanceOperation | None:
        """The automatic zone balance operation in progress on ``name``, if any."""
        return self.policies.zone_balance_operation(name)

    # ----- autoscale -----------------------------------------------------------------------------

    def set_autoscale_setting(
        self, name: str, setting: AutoscaleSetting, *, now: float | None = None
    ) -> AutoscaleSetting:
        """Creates or replaces ``name``'s autoscale setting; :meth:`advance` applies its decisions."""
        return self.execute(cmd.SetAutoscaleSetting(name, setting), now)  # type: ignore[no-any-return]

    def get_autoscale_setting(self, name: str) -> AutoscaleSetting | None:
        """``name``'s autoscale setting, or None."""
        self.engine.capacity(name)
        return self.policies.get_autoscale_setting(name)

    def delete_autoscale_setting(self, name: str, *, now: float | None = None) -> None:
        """Removes ``name``'s autoscale setting: its capacity stays where it is."""
        self.execute(cmd.DeleteAutoscaleSetting(name), now)

    def report_metrics(
        self,
        name: str,
        metric: str,
        samples: Iterable[tuple[float, float]],
        *,
        now: float | None = None,
    ) -> None:
        """Pushes samples of ``metric`` for ``name``: (time in seconds since the epoch, value) pairs, one per
        instance and time or one per time for the whole scale set."""
        pairs = list(samples)
        series = ((metric, tuple(t for t, _ in pairs), tuple(v for _, v in pairs)),)
        self.execute(cmd.ReportMetrics(name, series), now)

    def evaluate_autoscale(self, name: str, now: float | None = None) -> AutoscaleDecision:
        """What autoscale would decide for ``name`` at ``now`` (a dry run): the profile, the rule, the
        metric values, and every bound, cooldown and flapping adjustment, in words."""
        return self.policies.evaluate_autoscale(self.engine, name, self.now if now is None else now)

    def autoscale_forecast(self, name: str, metric: str, at: float) -> float | None:
        """Predictive autoscale's forecast of ``name``'s total ``metric`` load at ``at``."""
        self.engine.capacity(name)
        return self.policies.autoscale_forecast(name, metric, at)

    def autoscale_queries(self) -> dict[str, list[tuple[str, str]]]:
        """Every scale set's (metric name, PromQL query) pairs from its autoscale triggers."""
        return self.policies.autoscale_queries()

    def autoscale_history(self, name: str) -> list[AutoscaleDecision]:
        """``name``'s recorded autoscale decisions (scales, skips, forecasts), oldest first."""
        self.engine.capacity(name)
        return self.policies.autoscale_history(name)

    # ----- region ---------------------------------------------------------------------------------

    def set_zone_available(self, zone: str, available: bool, *, now: float | None = None) -> None:
        """Marks a zone down (outage) or up again."""
        self.execute(cmd.SetZoneAvailability(zone, bool(available)), now)

    def set_core_quota(self, family: str, cores: int | None, *, now: float | None = None) -> None:
        """Sets a quota family's vCPU quota (``None``: none): ``standardDSv5Family`` for Standard_D2s_v5
        Regular, ``lowPriorityCores`` for all Spot. A plan beyond it fails with OperationNotAllowed."""
        self.execute(cmd.SetCoreQuota(family, cores), now)

    def set_pool_capacity(
        self,
        zone: str | None,
        vm_size: str,
        priority: str,
        available: int | None,
        price: float | None = None,
        *,
        restricted: bool | None = None,
        now: float | None = None,
    ) -> list[Action]:
        """Sets how many more instances a pool can take (``None``: unlimited), optionally its price, and
        whether the size is offered there (``restricted``). Returns the Spot evictions a price above
        scale sets' max price scheduled."""
        command = cmd.SetPoolCapacity(zone, vm_size, priority, available, price, restricted)
        return self.execute(command, now)  # type: ignore[no-any-return]

    # ----- reads (the engine's) -------------------------------------------------------------------

    def get_scale_set(self, name: str) -> ScaleSet:
        """The stored spec (with Azure's defaults filled in) and every instance."""
        return self.engine.get_scale_set(name)

    def get_spec(self, name: str) -> ScaleSetSpec:
        """The stored spec alone (cheap for large scale sets)."""
        return self.engine.get_spec(name)

    def scale_set_names(self) -> list[str]:
        """Every scale set's name, sorted."""
        return self.engine.scale_set_names()

    def list_scale_sets(self) -> list[ScaleSetSpec]:
        """Every scale set's stored spec, sorted by name."""
        return self.engine.list_scale_sets()

    def capacity(self, name: str) -> int:
        """How many instances ``name`` holds."""
        return self.engine.capacity(name)

    def instance_columns(self, name: str) -> dict[str, list[Any]]:
        """The instances as columns (one list per :class:`~scaleset.model.Instance` field)."""
        return self.engine.instance_columns(name)

    def describe_region(self) -> Region:
        """The region as it stands now: zones, zones down, and every configured pool."""
        return self.engine.describe_region()
