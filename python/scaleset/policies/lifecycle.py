"""Instance lifecycle with executors: the operations that carry plans out, and what failures do.

In ``Immediate`` mode (the default, and the in-process API's) a plan takes effect as it is made: every
instance is ``Succeeded`` at once. In ``Executors`` mode every create, delete, reimage and restart the
engine makes becomes an :class:`Operation` that an executor (a cloud API, libvirt, local processes)
carries out and reports back on, and instances are ``Creating`` or ``Updating`` until it does.

What a failed create does (reference §4 and §5; chosen where Azure is silent, see docs/behaviour.md):

- A capacity error (``AllocationFailed``, ``ZonalAllocationFailed``, ``SkuNotAvailable``,
  ``OverconstrainedAllocationRequest``, ``SpotPriceGreaterThanProvidedMaxPrice``) marks its pool (zone x
  size x priority) unavailable for :data:`UNAVAILABLE_TTL_S` (Karpenter's unavailable-offerings cache), and
  the instance is placed again by the scale set's own rules without that pool: best-effort zone balance
  and instance mix fall back to another zone or size, strict zone balance refuses what would unbalance.
- A quota error (``OperationNotAllowed``) places nothing new until the backoff passes.
- Any other failure retries the same operation, up to :data:`MAX_ATTEMPTS`; a create that still fails
  is placed again (without skipping its pool); a reimage or restart that still fails leaves the instance
  ``Failed`` (where automatic repairs find it). A failed create must leave nothing behind (the
  executor's contract), so nothing is deleted for it.

What could not be placed is the scale set's shortfall, retried with exponential backoff per scale set
(:data:`BACKOFF_BASE_S` doubling to :data:`BACKOFF_CAP_S`). Desired capacity is the instances the engine
holds plus the shortfall. Every decision is returned as an :class:`~scaleset.policies.common.Action`
with its reason. Leases (who is carrying out which operation) are the server's, not this state's: they
do not survive a restart, and an operation whose lease lapses is simply handed out again. Operations on
one instance are carried out one at a time, oldest first (:meth:`Lifecycle.ready`): a scale set deleted
and created again reuses instance names, and its old deletes must finish before its new creates start.

The ledger also holds what happens to Spot instances (a price above ``max_price`` schedules a
``Preempt`` in the manner of Azure's Scheduled Events; Try & restore brings back capacity evictions) and
lifecycle hooks (launch and terminate actions that hold instances until completed or timed out).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from scaleset.engine import Change, duration_seconds
from scaleset.errors import CapacityError, NotFoundError, invalid_input
from scaleset.policies.common import Action

if TYPE_CHECKING:
    from scaleset.engine import Engine
    from scaleset.model import LifecycleHook

__all__ = [
    "BACKOFF_BASE_S",
    "BACKOFF_CAP_S",
    "CAPACITY_ERRORS",
    "MAX_ATTEMPTS",
    "MODES",
    "QUOTA_ERRORS",
    "UNAVAILABLE_TTL_S",
    "FleetReport",
    "FleetStatus",
    "Lifecycle",
    "LifecycleAction",
    "Operation",
    "Restore",
    "ScheduledEvent",
]

MODES = ("Immediate", "Executors")
OPERATION_KINDS = ("Create", "Delete", "Deallocate", "Reimage", "Restart")
_DONE = {
    "Create": "InstanceCreated",
    "Deallocate": "InstanceDeallocated",
    "Reimage": "InstanceReimaged",
    "Restart": "InstanceRestarted",
}
#: How far ahead a Spot price eviction is announced (Azure: Scheduled Events "up to 30 seconds" before).
NOTICE_S = 30.0
#: How often Try & restore tries again to bring back Spot instances evicted for capacity.
RESTORE_INTERVAL_S = 60.0
#: Azure's allocation error codes: the pool cannot take the instance now.
CAPACITY_ERRORS = frozenset(
    {
        "AllocationFailed",
        "ZonalAllocationFailed",
        "SkuNotAvailable",
        "OverconstrainedAllocationRequest",
        "SpotPriceGreaterThanProvidedMaxPrice",
    }
)
#: A core quota is exhausted: no pool will do until somebody raises it or frees cores.
QUOTA_ERRORS = frozenset({"OperationNotAllowed", "QuotaExceeded"})
#: How long a pool that failed an allocation is skipped (Karpenter's unavailable offerings: 3 minutes).
UNAVAILABLE_TTL_S = 180.0
BACKOFF_BASE_S = 5.0
BACKOFF_CAP_S = 300.0
#: Tries of one operation that failed for another reason than capacity or quota.
MAX_ATTEMPTS = 3


def backoff(failures: int) -> float:
    """Seconds to wait after ``failures`` failures in a row: 5, 10, 20 ... capped at 300."""
    return float(min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** max(0, min(failures, 32) - 1)))


@dataclass
class Operation:
    """One thing an executor must do to one instance."""

    operation_id: int
    kind: str  # Create | Delete | Deallocate | Reimage | Restart
    scale_set: str
    instance_id: int
    zone: str | None
    fault_domain: int
    vm_size: str
    priority: str
    model_version: int
    created_at: float
    attempt: int = 1
    #: Not handed out before this time (a retry's backoff).
    not_before: float = 0.0
    #: Held by terminating lifecycle hooks: not handed out until their actions complete.
    held: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LifecycleAction:
    """An instance held by one lifecycle hook until the action completes or ``deadline`` passes."""

    scale_set: str
    instance_id: int
    hook: str
    transition: str  # Launching | Terminating
    deadline: float
    heartbeat_s: float
    default_result: str  # Continue | Abandon
    #: Terminating: the delete operation held.
    operation_id: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ScheduledEvent:
    """A notice in the manner of Azure's Scheduled Events: Spot instances to be evicted (``Preempt``) not
    before ``not_before``, unless acknowledged earlier."""

    event_id: int
    scale_set: str
    instance_ids: tuple[int, ...]
    not_before: float
    description: str
    event_type: str = "Preempt"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "instance_ids": list(self.instance_ids)}


@dataclass
class Restore:
    """Try & restore of one scale set: Spot instances evicted for capacity, restored until ``deadline``."""

    count: int
    deadline: float
    next_try: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FleetStatus:
    """How far a scale set's infrastructure is from its desired state."""

    #: Instances that could not be placed yet (retried at ``retry_at``).
    shortfall: int = 0
    #: Failures in a row (a successful create resets it): the backoff's exponent.
    failures: int = 0
    retry_at: float | None = None
    last_error_code: str = ""
    last_error_message: str = ""
    last_error_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class FleetReport:
    """A scale set's infrastructure against its desired state (``Controller.fleet_report``,
    ``Client.fleet_report``)."""

    scale_set: str
    execution_mode: str
    #: The instances it should have: the engine's plus the shortfall.
    desired_capacity: int
    #: Instances by provisioning state.
    provisioning_states: dict[str, int]
    shortfall: int
    consecutive_failures: int
    retry_at: float | None
    last_error_code: str
    last_error_message: str
    pending_operation_count: int
    #: The oldest pending operations (at most 1,000).
    pending_operations: tuple[Operation, ...]
    #: (zone, vm_size, priority, until) of every pool skipped for now (region-wide).
    unavailable_pools: tuple[tuple[str | None, str, str, float], ...]
    #: Instance id -> (address, provider id) of every created instance, as its executor reported them.
    addresses: dict[int, tuple[str, str]] = field(default_factory=dict)
    #: Evictions announced and not yet carried out.
    scheduled_events: tuple[ScheduledEvent, ...] = ()
    #: Try & restore in progress: (instances to restore, deadline), or None.
    restoring: tuple[int, float] | None = None
    #: Instances held by lifecycle hooks.
    lifecycle_actions: tuple[LifecycleAction, ...] = ()
    #: The scale set's revision (filled in by the server; 0 in process).
    revision: int = 0


@dataclass
class Lifecycle:
    """The operations ledger of every scale set of one engine, the unavailable-capacity cache, and each
    scale set's shortfall and backoff. Plain data (:meth:`export`, :meth:`restore`) for snapshots."""

    mode: str = "Immediate"
    operations: dict[int, Operation] = field(default_factory=dict)
    next_operation_id: int = 1
    status: dict[str, FleetStatus] = field(default_factory=dict)
    #: Pool (zone, vm_size, priority) -> until when placement skips it.
    unavailable: dict[tuple[str | None, str, str], float] = field(default_factory=dict)
    #: Scale set -> instance id -> (address, provider id), as executors reported them.
    addresses: dict[str, dict[int, tuple[str, str]]] = field(default_factory=dict)
    #: Scheduled evictions by event id, and Try & restore by scale set.
    events: dict[int, ScheduledEvent] = field(default_factory=dict)
    next_event_id: int = 1
    restores: dict[str, Restore] = field(default_factory=dict)
    #: Lifecycle actions pending, by (scale set, instance id, hook name).
    waits: dict[tuple[str, int, str], LifecycleAction] = field(default_factory=dict)
    #: Each scale set's lifecycle hooks (read from its spec once per change of the spec).
    _hooks: dict[str, tuple[LifecycleHook, ...]] = field(default_factory=dict, repr=False)
    #: Instances whose delete skips the terminating hooks (an abandoned launch never served).
    _unhooked: set[tuple[str, int]] = field(default_factory=set, repr=False)
    _by_instance: dict[tuple[str, int], list[int]] = field(default_factory=dict, repr=False)

    # ----- mode -----------------------------------------------------------------------------------------

    def attach(self, engine: Engine) -> None:
        """Points ``engine`` at this state: it journals changes in Executors mode, and skips the pools in
        the unavailable cache."""
        engine.journal = [] if self.mode == "Executors" else None
        for (zone, size, priority), _ in sorted(self.unavailable.items(), key=lambda kv: str(kv[0])):
            engine.set_pool_blocked(zone, size, priority, True)

    def set_mode(self, engine: Engine, mode: str, now: float) -> list[Action]:
        """Switches between ``Immediate`` and ``Executors``. Leaving Executors mode completes every
        pending operation as done (nobody would carry it out)."""
        if mode not in MODES:
            raise invalid_input(
                f"execution mode must be one of {', '.join(MODES)}, not {mode!r}.", field="mode"
            )
        actions: list[Action] = []
        if mode == "Immediate" and self.operations:
            for op in list(self.operations.values()):
                actions += self.complete(engine, op.operation_id, True, now=now) or []
        self.mode = mode
        self.attach(engine)
        return actions

    # ----- what the engine did ----------------------------------------------------------------------------

    def absorb(self, engine: Engine, now: float) -> None:
        """Turns the engine's journal into operations and marks their instances Creating or Updating."""
        journal, engine.journal = engine.journal, [] if self.mode == "Executors" else None
        if not journal:
            return
        versions: dict[str, int] = {}
        marks: dict[tuple[str, str], list[int]] = {}
        for change in journal:
            name = change.scale_set
            if change.kind == "Delete":
                self._cancel(name, change.instance_id)
                self.addresses.get(name, {}).pop(change.instance_id, None)
                self._drop_waits(name, change.instance_id)
                op = self._add(change, 0, now)
                self._hold(engine, op, now)
                continue
            if name not in versions:
                try:
                    versions[name] = engine.get_spec(name).model_version
                except NotFoundError:
                    continue
            if change.kind != "Create":
                self._cancel(name, change.instance_id, kinds=("Reimage", "Restart"))
            self._add(change, versions[name], now)
            state = "Creating" if change.kind == "Create" else "Updating"
            marks.setdefault((name, state), []).append(change.instance_id)
        for (name, state), ids in marks.items():
            self._mark(engine, name, ids, state)

    def _add(self, change: Change, model_version: int, now: float) -> Operation:
        op = Operation(
            self.next_operation_id,
            change.kind,
            change.scale_set,
            change.instance_id,
            change.zone,
            change.fault_domain,
            change.vm_size,
            change.priority,
            model_version,
            now,
        )
        self.next_operation_id += 1
        self.operations[op.operation_id] = op
        self._by_instance.setdefault((op.scale_set, op.instance_id), []).append(op.operation_id)
        return op

    def _cancel(self, name: str, instance_id: int, kinds: tuple[str, ...] = OPERATION_KINDS) -> None:
        """Drops pending operations on an instance that no longer matter (it is being deleted, or a newer
        reimage or restart supersedes them). A create already under way is the executor's to finish; the
        delete that follows removes what it made."""
        ids = self._by_instance.get((name, instance_id))
        if not ids:
            return
        for op_id in [i for i in ids if self.operations[i].kind in kinds]:
            self._forget(self.operations[op_id])

    def ready(self, op: Operation) -> bool:
        """Whether the ledger lets ``op`` be handed out: not held by a hook, and no older operation on the
        same instance pending (one at a time per instance, oldest first). Its backoff is the caller's."""
        return not op.held and min(self._by_instance[(op.scale_set, op.instance_id)]) == op.operation_id

    def _forget(self, op: Operation) -> None:
        del self.operations[op.operation_id]
        key = (op.scale_set, op.instance_id)
        ids = self._by_instance[key]
        ids.remove(op.operation_id)
        if not ids:
            del self._by_instance[key]

    def deleted(self, name: str) -> None:
        """A deleted scale set: its pending creates, reimages and restarts are cancelled (the deletes its
        deletion queued stay: every instance it had must go)."""
        for op in [o for o in self.operations.values() if o.scale_set == name and o.kind != "Delete"]:
            self._forget(op)
        self.status.pop(name, None)
        self.addresses.pop(name, None)
        self.restores.pop(name, None)
        self._hooks.pop(name, None)
        for event_id in [i for i, e in self.events.items() if e.scale_set == name]:
            del self.events[event_id]
        for key in [k for k in self.waits if k[0] == name]:  # deleting the set does not wait for hooks
            self._release(self.waits.pop(key))

    def spec_changed(self, name: str) -> None:
        """``name``'s spec may have changed: its lifecycle hooks are read again when next needed."""
        self._hooks.pop(name, None)

    # ----- lifecycle hooks ---------------------------------------------------------------------------------

    def _hooks_of(self, engine: Engine, name: str, transition: str) -> list[LifecycleHook]:
        hooks = self._hooks.get(name)
        if hooks is None:
            try:
                hooks = tuple(engine.get_spec(name).lifecycle_hooks)
            except NotFoundError:
                return []
            self._hooks[name] = hooks
        return [h for h in hooks if h.transition == transition]

    def _wait(
        self, held: tuple[str, int, int], hooks: list[LifecycleHook], transition: str, now: float
    ) -> None:
        """Holds (scale set, instance id, the delete operation or 0) on each of ``hooks``."""
        name, instance_id, operation_id = held
        for hook in hooks:
            seconds = duration_seconds(hook.heartbeat_timeout, "lifecycle_hooks.heartbeat_timeout")
            self.waits[(name, instance_id, hook.name)] = LifecycleAction(
                name,
                instance_id,
                hook.name,
                transition,
                now + seconds,
                seconds,
                hook.default_result,
                operation_id,
            )

    def _hold(self, engine: Engine, op: Operation, now: float) -> None:
        """A delete waits for the scale set's terminating hooks (if any) before executors get it."""
        if (op.scale_set, op.instance_id) in self._unhooked:
            self._unhooked.discard((op.scale_set, op.instance_id))
            return
        hooks = self._hooks_of(engine, op.scale_set, "Terminating")
        if hooks:
            op.held = True
            self._wait((op.scale_set, op.instance_id, op.operation_id), hooks, "Terminating", now)

    def _drop_waits(self, name: str, instance_id: int) -> None:
        for key in [k for k in self.waits if k[0] == name and k[1] == instance_id]:
            if self.waits[key].transition == "Launching":
                del self.waits[key]

    def _release(self, action: LifecycleAction) -> None:
        op = self.operations.get(action.operation_id)
        if op is not None and not any(w.operation_id == op.operation_id for w in self.waits.values()):
            op.held = False

    def complete_action(
        self,
        engine: Engine,
        name: str,
        instance_id: int,
        hook: str,
        result: str,
        now: float,
        *,
        timed_out: bool = False,
    ) -> list[Action] | None:
        """Completes one lifecycle action: ``Continue`` or ``Abandon``. None if no such action waits."""
        action = self.waits.pop((name, instance_id, hook), None)
        if action is None:
            return None
        how = f"timed out ({action.default_result})" if timed_out else result
        kind = "LifecycleActionTimedOut" if timed_out else "LifecycleActionCompleted"
        text = f"instance {instance_id}: {action.transition.lower()} hook '{hook}' {how}"
        if action.transition == "Terminating":
            self._release(action)
            return [Action(name, kind, (instance_id,), f"{text}; deleting it")]
        if result == "Abandon":
            for key in [k for k in self.waits if k[0] == name and k[1] == instance_id]:
                del self.waits[key]
            self._unhooked.add((name, instance_id))
            try:
                engine.delete_instances(name, [instance_id])  # journaled: the executor deletes the VM
            except NotFoundError:
                self._unhooked.discard((name, instance_id))
                return [Action(name, kind, (instance_id,), text)]
            status = self.status.setdefault(name, FleetStatus())
            status.shortfall += 1
            return [
                Action(name, kind, (instance_id,), f"{text}; deleting it"),
                self._place_shortfall(engine, name, status, now, "replacing the abandoned launch"),
            ]
        if not any(k[0] == name and k[1] == instance_id for k in self.waits):
            self._mark(engine, name, [instance_id], "Succeeded")
            text += "; it is in service"
        return [Action(name, kind, (instance_id,), text)]

    def heartbeat(self, name: str, instance_id: int, hook: str, now: float) -> bool:
        """Restarts a lifecycle action's timeout; False if no such action waits."""
        action = self.waits.get((name, instance_id, hook))
        if action is None:
            return False
        action.deadline = now + action.heartbeat_s
        return True

    def capacity_set(self, name: str) -> None:
        """A user (or autoscale) chose a new capacity: what was missing, or evicted, no longer is."""
        status = self.status.get(name)
        if status is not None:
            status.shortfall, status.retry_at = 0, None
        self.restores.pop(name, None)

    # ----- Spot: price evictions with notice, Try & restore -----------------------------------------------

    def price_changed(
        self, engine: Engine, zone: str | None, vm_size: str, priority: str, price: float | None, now: float
    ) -> list[Action]:
        """A Spot pool's price rose: every running Spot instance in it whose scale set's max price is now
        below the price gets a Preempt notice, evicted at its ``not_before`` (or when acknowledged)."""
        if priority != "Spot" or price is None:
            return []
        noticed = {(e.scale_set, i) for e in self.events.values() for i in e.instance_ids}
        actions: list[Action] = []
        for name in engine.scale_set_names():
            max_price = engine.get_spec(name).max_price
            if max_price is None or max_price < 0 or price <= max_price:
                continue  # -1 (or unset): never evicted for price
            cols = engine.instance_columns(name)
            ids = tuple(
                i
                for i, z, size, p, power in zip(
                    cols["instance_id"],
                    cols["zone"],
                    cols["vm_size"],
                    cols["priority"],
                    cols["power_state"],
                    strict=True,
                )
                if z == zone
                and size == vm_size
                and p == "Spot"
                and power == "running"
                and (name, i) not in noticed
            )
            if not ids:
                continue
            event = ScheduledEvent(
                self.next_event_id,
                name,
                ids,
                now + NOTICE_S,
                f"the Spot price of {vm_size} in {zone or 'the region'} ({price:g} USD) rose above the max price "
                f"({max_price:g} USD)",
            )
            self.next_event_id += 1
            self.events[event.event_id] = event
            actions.append(
                Action(
                    name,
                    "EvictionScheduled",
                    ids,
                    f"Preempt (event {event.event_id}) of {len(ids)} instance(s) not before {event.not_before:.0f}: "
                    f"{event.description}",
                )
            )
        return actions

    def acknowledge(self, engine: Engine, name: str, event_id: int, now: float) -> list[Action] | None:
        """An executor is ready for a scheduled eviction: it happens now. None if no such event is pending."""
        event = self.events.get(event_id)
        if event is None or event.scale_set != name:
            return None
        return self._preempt(engine, event, now, "acknowledged")

    def _preempt(self, engine: Engine, event: ScheduledEvent, now: float, why: str) -> list[Action]:
        del self.events[event.event_id]
        name = event.scale_set
        cols = engine.instance_columns(name)
        where = {i: k for k, i in enumerate(cols["instance_id"])}
        ids = [i for i in event.instance_ids if i in where and cols["power_state"][where[i]] == "running"]
        if not ids:
            return []
        eviction = engine.evict(name, ids)
        if self.mode == "Executors":  # the executor carries the eviction out
            for kind, gone in (("Delete", eviction.deleted), ("Deallocate", eviction.deallocated)):
                for i in gone:
                    k = where[i]
                    change = Change(
                        kind,
                        name,
                        i,
                        cols["zone"][k],
                        cols["fault_domain"][k],
                        cols["vm_size"][k],
                        cols["priority"][k],
                    )
                    self._cancel(name, i)
                    self._add(change, 0, now)
            if eviction.deallocated:
                self._mark(engine, name, list(eviction.deallocated), "Updating")
        return [
            Action(
                name,
                "InstancesEvicted",
                tuple(ids),
                f"Preempt (event {event.event_id}, {why}): {len(eviction.deleted)} deleted, "
                f"{len(eviction.deallocated)} deallocated; {event.description}",
            )
        ]

    def evicted(self, engine: Engine, name: str, count: int, now: float, *, autoscaled: bool) -> None:
        """Spot instances of ``name`` were evicted for capacity (and deleted): with Try & restore on (and no
        autoscale, which then owns the count) they are restored on a schedule until the timeout."""
        policy = engine.get_spec(name).spot_restore_policy
        if policy is None or not policy.enabled or autoscaled or count == 0:
            return
        timeout = duration_seconds(policy.restore_timeout, "spot_restore_policy.restore_timeout")
        restore = self.restores.get(name)
        total = count + (restore.count if restore is not None else 0)
        self.restores[name] = Restore(total, now + timeout, now + RESTORE_INTERVAL_S)

    def _restore(self, engine: Engine, name: str, restore: Restore, now: float) -> Action:
        if now >= restore.deadline:
            del self.restores[name]
            return Action(
                name,
                "SpotRestoreTimedOut",
                (),
                f"Try & restore gave up on {restore.count} evicted Spot instance(s)",
            )
        try:
            plan = engine.set_capacity(name, engine.capacity(name) + restore.count)
        except CapacityError as e:
            restore.next_try = now + RESTORE_INTERVAL_S
            return Action(
                name,
                "SpotRestoreDeferred",
                (),
                f"Try & restore: {restore.count} instance(s) cannot be placed yet ({e.code}); next try at {restore.next_try:.0f}",
            )
        del self.restores[name]
        ids = tuple(c.instance_id for c in plan.creates)
        return Action(
            name, "SpotRestored", ids, f"Try & restore brought back {len(ids)} evicted Spot instance(s)"
        )

    # ----- what executors report ---------------------------------------------------------------------------

    def complete(
        self,
        engine: Engine,
        operation_id: int,
        succeeded: bool,
        code: str = "",
        message: str = "",
        address: str = "",
        provider_id: str = "",
        *,
        now: float,
    ) -> list[Action] | None:
        """Applies an executor's outcome and returns what it led to; ``None`` (and no change) for an
        operation that is no longer pending (reported before, or cancelled)."""
        op = self.operations.get(operation_id)
        if op is None:
            return None
        self._forget(op)
        name, i = op.scale_set, op.instance_id
        where = f"instance {i} ({op.zone or 'regional'}, {op.vm_size}, {op.priority})"
        if succeeded:
            if op.kind == "Delete":
                return [Action(name, "InstanceDeleted", (i,), f"{where} deleted")]
            if not self._set_state(engine, op, "Succeeded"):
                return []
            if op.kind == "Create":
                self.addresses.setdefault(name, {})[i] = (address, provider_id)
                status = self.status.get(name)
                if status is not None:
                    status.failures = 0
                if hooks := self._hooks_of(engine, name, "Launching"):
                    self._mark(engine, name, [i], "Creating")  # not in service until its hooks complete
                    self._wait((name, i, 0), hooks, "Launching", now)
                    names = ", ".join(h.name for h in hooks)
                    return [
                        Action(
                            name,
                            "LifecycleActionPending",
                            (i,),
                            f"{where}: created; waits for launch hook(s) {names}",
                        )
                    ]
            at = f" at {address}" if address else ""
            return [Action(name, _DONE[op.kind], (i,), f"{where}: {op.kind.lower()} succeeded{at}")]
        error = f"{code or 'Failed'}: {message}" if message else code or "Failed"
        if op.kind in ("Delete", "Deallocate") or (
            op.kind == "Create" and code not in CAPACITY_ERRORS | QUOTA_ERRORS and op.attempt < MAX_ATTEMPTS
        ):
            return [self._retry(op, now, f"{where}: {op.kind.lower()} failed ({error})")]
        if op.kind != "Create":
            self._set_state(engine, op, "Failed")
            return [Action(name, "OperationFailed", (i,), f"{where}: {op.kind.lower()} failed ({error})")]
        return self._replace(engine, op, code or "Failed", message, now)

    @staticmethod
    def _mark(engine: Engine, name: str, ids: list[int], state: str) -> None:
        try:
            engine.set_provisioning_state(name, ids, state)
        except NotFoundError:
            pass  # created and deleted by the same command

    def _set_state(self, engine: Engine, op: Operation, state: str) -> bool:
        try:
            engine.set_provisioning_state(op.scale_set, [op.instance_id], state)
        except NotFoundError:
            return False  # deleted meanwhile (with its scale set, or by a scale-in): its delete follows
        return True

    def _retry(self, op: Operation, now: float, reason: str) -> Action:
        op.attempt += 1
        op.not_before = now + backoff(op.attempt - 1)
        self.operations[op.operation_id] = op
        self._by_instance.setdefault((op.scale_set, op.instance_id), []).append(op.operation_id)
        return Action(
            op.scale_set,
            "OperationRetried",
            (op.instance_id,),
            f"{reason}; try {op.attempt} after {op.not_before - now:g} s",
        )

    def _replace(self, engine: Engine, op: Operation, code: str, message: str, now: float) -> list[Action]:
        """A create that failed for good: the instance goes (it never existed, so nothing is deleted), its
        pool is skipped for a while if it was out of capacity, and the scale set places it again."""
        name, i = op.scale_set, op.instance_id
        journal, engine.journal = engine.journal, None
        try:
            engine.delete_instances(name, [i])
        except NotFoundError:
            return []  # deleted meanwhile: nothing to place again
        finally:
            engine.journal = journal
        reason = f"instance {i} ({op.zone or 'regional'}, {op.vm_size}, {op.priority}) could not be created ({code}"
        reason += f": {message})" if message else ")"
        if code in CAPACITY_ERRORS:
            pool = (op.zone, op.vm_size, op.priority)
            if pool not in self.unavailable:
                engine.set_pool_blocked(*pool, True)
            self.unavailable[pool] = now + UNAVAILABLE_TTL_S
            reason += f"; pool {op.zone or 'regional'}/{op.vm_size}/{op.priority} skipped for {UNAVAILABLE_TTL_S:g} s"
        status = self.status.setdefault(name, FleetStatus())
        status.failures += 1
        status.last_error_code, status.last_error_message, status.last_error_at = code, message, now
        status.shortfall += 1
        if code in QUOTA_ERRORS:
            status.retry_at = now + backoff(status.failures)
            return [
                Action(
                    name,
                    "ReplacementDeferred",
                    (i,),
                    f"{reason}; placing again after {status.retry_at - now:g} s",
                )
            ]
        return [self._place_shortfall(engine, name, status, now, reason)]

    # ----- time ------------------------------------------------------------------------------------------

    def step(self, engine: Engine, name: str, now: float) -> list[Action]:
        """Pools whose time in the unavailable cache is over are used again; a shortfall whose backoff has
        passed is placed again."""
        actions: list[Action] = []
        for pool, until in sorted(self.unavailable.items(), key=lambda kv: (kv[1], str(kv[0]))):
            if until <= now:
                del self.unavailable[pool]
                engine.set_pool_blocked(*pool, False)
                zone, size, priority = pool
                actions.append(
                    Action(
                        name,
                        "PoolAvailableAgain",
                        (),
                        f"pool {zone or 'regional'}/{size}/{priority} is tried again",
                    )
                )
        status = self.status.get(name)
        if status is not None and status.shortfall and (status.retry_at is None or status.retry_at <= now):
            actions.append(self._place_shortfall(engine, name, status, now, "retrying"))
        due = sorted((k for k, w in self.waits.items() if k[0] == name and w.deadline <= now))
        for key in due:
            action = self.waits[key]
            actions += (
                self.complete_action(engine, name, key[1], key[2], action.default_result, now, timed_out=True)
                or []
            )
        for event in [e for e in self.events.values() if e.scale_set == name and e.not_before <= now]:
            actions += self._preempt(engine, event, now, "its time came")
        restore = self.restores.get(name)
        if restore is not None and now >= min(restore.next_try, restore.deadline):
            actions.append(self._restore(engine, name, restore, now))
        return actions

    def _place_shortfall(
        self, engine: Engine, name: str, status: FleetStatus, now: float, reason: str
    ) -> Action:
        try:
            plan = engine.set_capacity(name, engine.capacity(name) + status.shortfall)
        except CapacityError as e:
            status.retry_at = now + backoff(status.failures)
            status.failures += 1
            status.last_error_code, status.last_error_message, status.last_error_at = e.code, str(e), now
            return Action(
                name,
                "ReplacementDeferred",
                (),
                f"{reason}; {status.shortfall} instance(s) cannot be placed now ({e.code}); next try after {status.retry_at - now:g} s",
            )
        placed = tuple(c.instance_id for c in plan.creates)
        where = ", ".join(
            f"{c.instance_id} in {c.zone or 'regional'} ({c.vm_size}, {c.priority})" for c in plan.creates
        )
        status.shortfall, status.retry_at = 0, None
        return Action(name, "InstancesReplaced", placed, f"{reason}; placed again: {where}")

    # ----- reads -----------------------------------------------------------------------------------------

    def desired_capacity(self, engine: Engine, name: str) -> int:
        """The instances ``name`` should have: those the engine holds plus what could not be placed yet."""
        status = self.status.get(name)
        return engine.capacity(name) + (status.shortfall if status is not None else 0)

    def report(self, engine: Engine, name: str, pending_limit: int = 1000) -> FleetReport:
        """``name``'s infrastructure against its desired state."""
        status = self.status.get(name, FleetStatus())
        states: dict[str, int] = {}
        for state in engine.instance_columns(name)["provisioning_state"]:
            states[state] = states.get(state, 0) + 1
        pending = self.pending(name)
        return FleetReport(
            scale_set=name,
            execution_mode=self.mode,
            desired_capacity=self.desired_capacity(engine, name),
            provisioning_states=dict(sorted(states.items())),
            shortfall=status.shortfall,
            consecutive_failures=status.failures,
            retry_at=status.retry_at,
            last_error_code=status.last_error_code,
            last_error_message=status.last_error_message,
            pending_operation_count=len(pending),
            pending_operations=tuple(pending[:pending_limit]),
            unavailable_pools=tuple(
                (zone, size, priority, until)
                for (zone, size, priority), until in sorted(
                    self.unavailable.items(), key=lambda kv: str(kv[0])
                )
            ),
            addresses=dict(sorted(self.addresses.get(name, {}).items())),
            scheduled_events=tuple(e for _, e in sorted(self.events.items()) if e.scale_set == name),
            restoring=(restore.count, restore.deadline) if (restore := self.restores.get(name)) else None,
            lifecycle_actions=tuple(w for k, w in sorted(self.waits.items()) if k[0] == name),
        )

    def pending(self, name: str | None = None) -> list[Operation]:
        """Pending operations (of ``name``, or all), oldest first."""
        ops = self.operations.values()
        return sorted((o for o in ops if name is None or o.scale_set == name), key=lambda o: o.operation_id)

    # ----- snapshots -------------------------------------------------------------------------------------

    def export(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "operations": [o.to_dict() for o in self.pending()],
            "next_operation_id": self.next_operation_id,
            "status": {n: s.to_dict() for n, s in self.status.items()},
            "unavailable": [[*pool, until] for pool, until in self.unavailable.items()],
            "addresses": {n: {str(i): list(a) for i, a in m.items()} for n, m in self.addresses.items()},
            "events": [e.to_dict() for _, e in sorted(self.events.items())],
            "next_event_id": self.next_event_id,
            "restores": {n: r.to_dict() for n, r in self.restores.items()},
            "waits": [w.to_dict() for _, w in sorted(self.waits.items())],
        }

    @classmethod
    def restore(cls, data: dict[str, Any]) -> Lifecycle:
        state = cls(
            mode=data.get("mode", "Immediate"),
            next_operation_id=data.get("next_operation_id", 1),
            status={n: FleetStatus(**s) for n, s in data.get("status", {}).items()},
            unavailable={(z, s, p): until for z, s, p, until in data.get("unavailable", [])},
            addresses={
                n: {int(i): (a[0], a[1]) for i, a in m.items()} for n, m in data.get("addresses", {}).items()
            },
            next_event_id=data.get("next_event_id", 1),
            restores={n: Restore(**r) for n, r in data.get("restores", {}).items()},
        )
        for w in data.get("waits", []):
            action = LifecycleAction(**w)
            state.waits[(action.scale_set, action.instance_id, action.hook)] = action
        for e in data.get("events", []):
            event = ScheduledEvent(**{**e, "instance_ids": tuple(e["instance_ids"])})
            state.events[event.event_id] = event
        for o in data.get("operations", []):
            op = Operation(**o)
            state.operations[op.operation_id] = op
            state._by_instance.setdefault((op.scale_set, op.instance_id), []).append(op.operation_id)
        return state
