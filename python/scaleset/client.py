"""Typed Python clients for a scaleset server: :class:`Client` (blocking) and :class:`AsyncClient` (asyncio).

Both have the same methods, defined once: each builds its request and says how to read the reply, and the
two clients only differ in how they send it. They speak the in-process :class:`~scaleset.Controller`'s
types where the wire carries them (:class:`~scaleset.model.Plan`, :class:`~scaleset.model.Instance`,
:class:`~scaleset.model.Region`, :class:`~scaleset.model.Eviction`, autoscale settings and decisions, and
the same instance columns as ``Controller.instance_columns``), plus :class:`ScaleSetInfo` for what only a
server has (revision and etag); rebalance plans and rolling upgrades are the Controller's types too. Errors are the same :mod:`scaleset.errors` classes (kind from the gRPC status, ``code`` from the
``ErrorInfo`` detail, ``field`` where there is one), plus :class:`~scaleset.errors.AccessDeniedError` and
:class:`~scaleset.errors.InternalError`.

Every mutation carries a ``request_id`` (generated unless given) and every call has a deadline
(``timeout``). Calls that fail with UNAVAILABLE, or with a ``google.rpc.RetryInfo`` (rate limited, too
many watchers), are retried with the same request, after the delay the server asked for or an
exponential backoff, so a retry never applies twice.
"""

from __future__ import annotations

import asyncio
import functools
import time
import typing
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Concatenate, Generic, NamedTuple, ParamSpec, TypeVar, cast

import grpc
from google.rpc import error_details_pb2, status_pb2

from scaleset import convert
from scaleset.errors import (
    AccessDeniedError,
    CapacityError,
    ConflictError,
    InternalError,
    InvalidInputError,
    NotFoundError,
    ScaleSetError,
    UnavailableError,
    error,
)
from scaleset.model import (
    INSTANCE_COLUMNS,
    AutoscaleDecision,
    AutoscaleSetting,
    Eviction,
    Instance,
    Plan,
    RebalancePlan,
    Region,
    ScaleSetSpec,
)
from scaleset.policies.lifecycle import FleetReport, Operation, ScheduledEvent
from scaleset.policies.upgrade import RollingUpgrade
from scaleset.v1 import scaleset_pb2 as pb
from scaleset.v1 import scaleset_pb2_grpc as pb_grpc

__all__ = ["AsyncClient", "Client", "ScaleSetInfo", "WatchedEvent", "error_of"]

P = ParamSpec("P")
T = TypeVar("T")

_ERROR_BY_STATUS: dict[grpc.StatusCode, type[ScaleSetError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInputError,
    grpc.StatusCode.FAILED_PRECONDITION: ConflictError,
    grpc.StatusCode.ALREADY_EXISTS: ConflictError,
    grpc.StatusCode.ABORTED: ConflictError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: CapacityError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: UnavailableError,
    # A server that stops (a failover) cancels the calls it was serving; the same call is retried.
    grpc.StatusCode.CANCELLED: UnavailableError,
    grpc.StatusCode.UNAUTHENTICATED: AccessDeniedError,
    grpc.StatusCode.PERMISSION_DENIED: AccessDeniedError,
}
#: Replies up to 64 MB (a 100,000-instance plan is about 32 MB), as the server sends; keepalive pings
#: (which the server permits) notice a dead connection on an idle channel.
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
]


@dataclass(frozen=True, slots=True)
class ScaleSetInfo:
    """A scale set as the server stores it: its spec, capacity, and revision/etag for preconditions."""

    spec: ScaleSetSpec
    capacity: int
    revision: int
    etag: str
    #: The instances it should have: capacity plus what could not be placed yet (with executors).
    desired_capacity: int = 0


@dataclass(frozen=True, slots=True)
class WatchedEvent:
    sequence: int
    scale_set: str
    revision: int
    type: str
    summary: str
    time_unix_ms: int
    plan: Plan | None
    #: On a cluster, in a watch of every scale set: pass it to :meth:`Client.watch` to resume after this
    #: event ("" elsewhere: resume with ``after``).
    resume_token: str = ""


# ----- errors -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Failure:
    """A failed call as the server described it."""

    code: grpc.StatusCode
    message: str
    reason: str
    metadata: dict[str, str]
    retry_after: float | None

    @classmethod
    def of(cls, err: grpc.RpcError) -> _Failure:
        code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
        message = err.details() if hasattr(err, "details") else str(err)
        reason, metadata, retry_after = code.name, {}, None
        trailers = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
        for key, value in trailers or ():
            if key != "grpc-status-details-bin":
                continue
            for detail in status_pb2.Status.FromString(value).details:
                info, retry = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
                if detail.Unpack(info):
                    reason, metadata = info.reason, dict(info.metadata)
                elif detail.Unpack(retry):
                    retry_after = retry.retry_delay.ToTimedelta().total_seconds()
        return cls(code, message or "", reason, metadata, retry_after)

    @property
    def retryable(self) -> bool:
        """Unavailable, or the server said when to come back; the same request (and request_id) is safe."""
        return (
            self.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
            or self.retry_after is not None
        )

    def exception(self) -> ScaleSetError:
        metadata = dict(self.metadata)
        field = metadata.pop("field", None)
        kind = _ERROR_BY_STATUS.get(self.code, InternalError)
        return error(kind, self.message, self.reason, field=field, metadata=metadata)


def error_of(err: grpc.RpcError) -> ScaleSetError:
    """The error a failed call stands for, as the clients raise it: its kind from the status, its stable
    code, field and metadata from the ErrorInfo detail."""
    return _Failure.of(err).exception()


# ----- operations: each method's request and the reading of its reply, defined once for both clients ----


@dataclass(frozen=True, slots=True)
class _Call(Generic[T]):
    """One RPC: the service and method, the request (built once, so retries resend it as it was) and how
    to read the reply."""

    service: str
    method: str
    request: Any
    read: Callable[[Any], T]


@dataclass(frozen=True, slots=True)
class _Pages(Generic[T]):
    """A paged listing: the request for a page token, and how to read all the pages."""

    service: str
    method: str
    request: Callable[[str], Any]
    read: Callable[[list[Any]], T]
    enough: Callable[[list[Any]], bool] = lambda pages: False


def _request_id(request_id: str | None) -> str:
    return request_id if request_id is not None else str(uuid.uuid4())


def _info(msg: pb.ScaleSet) -> ScaleSetInfo:
    return ScaleSetInfo(
        convert.spec_from_proto(msg.spec), msg.capacity, msg.revision, msg.etag, msg.desired_capacity
    )


def _upgrade(msg: pb.RollingUpgradeStatus) -> RollingUpgrade:
    upgrade = convert.rolling_upgrade_from_proto(msg)
    if upgrade is None:  # a start or cancel always has one
        raise error(InternalError, "the server answered a rolling upgrade call without one.", "InternalError")
    return upgrade


def _columns(pages: list[pb.ListInstancesResponse], name: str) -> dict[str, Sequence[Any]]:
    """The pages' instances as the engine's columns (one sequence per Instance field), without row
    objects: one page's columns are decoded as they are read; several pages are joined into lists."""
    if len(pages) == 1:
        return convert.listing_columns(pages[0].instances, name)
    out: dict[str, list[Any]] = {k: [] for k in INSTANCE_COLUMNS}
    for page in pages:
        for key, values in convert.listing_columns(page.instances, name).items():
            out[key].extend(values)
    return dict(out)


class _Operations:
    """The API, as request builders. Both clients turn each of these into a method of the same name."""

    # ----- scale sets ---------------------------------------------------------------------------------

    @staticmethod
    def create_scale_set(
        spec: ScaleSetSpec, capacity: int = 0, *, request_id: str | None = None
    ) -> _Call[Plan]:
        """Creates a scale set with ``capacity`` instances; the plan of their placement (as in process)."""
        request = pb.CreateScaleSetRequest(
            scale_set=convert.spec_to_proto(spec), capacity=capacity, request_id=_request_id(request_id)
        )
        return _Call("ScaleSets", "CreateScaleSet", request, lambda r: convert.plan_from_proto(r.plan))

    @staticmethod
    def get_scale_set(name: str) -> _Call[ScaleSetInfo]:
        return _Call("ScaleSets", "GetScaleSet", pb.GetScaleSetRequest(name=name), _info)

    @staticmethod
    def list_scale_sets(page_size: int = 100) -> _Pages[list[ScaleSetInfo]]:
        return _Pages(
            "ScaleSets",
            "ListScaleSets",
            lambda token: pb.ListScaleSetsRequest(page_size=page_size, page_token=token),
            lambda pages: [_info(s) for page in pages for s in page.scale_sets],
        )

    @staticmethod
    def update_scale_set(
        spec: ScaleSetSpec, *, update_mask: Sequence[str] = (), etag: str = "", request_id: str | None = None
    ) -> _Call[ScaleSetInfo]:
        """Like ``Controller.update_scale_set``, the spec replaces the stored one unless ``update_mask``
        names the paths that change."""
        request = pb.UpdateScaleSetRequest(
            scale_set=convert.spec_to_proto(spec), etag=etag, request_id=_request_id(request_id)
        )
        request.update_mask.paths.extend(update_mask or ["*"])
        return _Call("ScaleSets", "UpdateScaleSet", request, _info)

    @staticmethod
    def delete_scale_set(name: str, *, etag: str = "", request_id: str | None = None) -> _Call[None]:
        request = pb.DeleteScaleSetRequest(name=name, etag=etag, request_id=_request_id(request_id))
        return _Call("ScaleSets", "DeleteScaleSet", request, lambda r: None)

    @staticmethod
    def set_capacity(
        name: str,
        capacity: int,
        *,
        dry_run: bool = False,
        etag: str = "",
        request_id: str | None = None,
        summary_only: bool = False,
    ) -> _Call[Plan]:
        request = pb.SetCapacityRequest(
            name=name,
            capacity=capacity,
            dry_run=dry_run,
            etag=etag,
            request_id=_request_id(request_id),
            view=pb.PLAN_VIEW_SUMMARY if summary_only else pb.PLAN_VIEW_FULL,
        )
        return _Call("ScaleSets", "SetCapacity", request, lambda r: convert.plan_from_proto(r.plan))

    # ----- instances ----------------------------------------------------------------------------------

    @staticmethod
    def import_instances(
        name: str, instances: Iterable[Instance], *, request_id: str | None = None
    ) -> _Call[None]:
        request = pb.ImportInstancesRequest(
            name=name,
            instances=[convert.instance_to_proto(i) for i in instances],
            request_id=_request_id(request_id),
        )
        return _Call("ScaleSets", "ImportInstances", request, lambda r: None)

    @staticmethod
    def list_instances(name: str, page_size: int = 1000) -> _Pages[list[Instance]]:
        """Every instance as an :class:`~scaleset.model.Instance` (see :meth:`instance_columns` for the
        faster columnar form)."""
        return _Pages(
            "ScaleSets",
            "ListInstances",
            lambda token: pb.ListInstancesRequest(name=name, page_size=page_size, page_token=token),
            lambda pages: [i for page in pages for i in convert.columns_from_proto(page.instances, name)],
        )

    @staticmethod
    def instance_columns(name: str, page_size: int = 10_000) -> _Pages[dict[str, Sequence[Any]]]:
        """The instances as columns, one read-only sequence per Instance field, equal to
        ``Controller.instance_columns``'s lists (``name`` is None for default names): no object per row
        until it is read."""
        return _Pages(
            "ScaleSets",
            "ListInstances",
            lambda token: pb.ListInstancesRequest(name=name, page_size=page_size, page_token=token),
            lambda pages: _columns(pages, name),
        )

    @staticmethod
    def delete_instances(
        name: str, instance_ids: Iterable[int], *, request_id: str | None = None
    ) -> _Call[Plan]:
        request = pb.DeleteInstancesRequest(
            name=name, instance_ids=list(instance_ids), request_id=_request_id(request_id)
        )
        return _Call("ScaleSets", "DeleteInstances", request, lambda r: convert.plan_from_proto(r.plan))

    @staticmethod
    def evict(name: str, instance_ids: Iterable[int], *, request_id: str | None = None) -> _Call[Eviction]:
        request = pb.EvictInstancesRequest(
            name=name, instance_ids=list(instance_ids), request_id=_request_id(request_id)
        )
        return _Call(
            "ScaleSets",
            "EvictInstances",
            request,
            lambda r: Eviction(deleted=tuple(r.deleted), deallocated=tuple(r.deallocated)),
        )

    @staticmethod
    def set_protection(
        name: str,
        instance_ids: Iterable[int],
        protect_from_scale_in: bool,
        protect_from_scale_set_actions: bool = False,
        *,
        request_id: str | None = None,
    ) -> _Call[None]:
        request = pb.SetInstanceProtectionRequest(
            name=name,
            instance_ids=list(instance_ids),
            protect_from_scale_in=protect_from_scale_in,
            protect_from_scale_set_actions=protect_from_scale_set_actions,
            request_id=_request_id(request_id),
        )
        return _Call("ScaleSets", "SetInstanceProtection", request, lambda r: None)

    @staticmethod
    def report_health(
        name: str, instance_ids: Iterable[int], health: str, *, request_id: str | None = None
    ) -> _Call[None]:
        request = pb.ReportInstanceHealthRequest(name=name, request_id=_request_id(request_id))
        request.reports.add(instance_ids=list(instance_ids), health=convert.HEALTH_TO_PB[health])
        return _Call("ScaleSets", "ReportInstanceHealth", request, lambda r: None)

    @staticmethod
    def rebalance(
        name: str,
        max_replacements: int | None = None,
        max_surge: int = 1,
        time_limit_s: float | None = None,
        dry_run: bool = True,
        *,
        max_replacements_percent: float | None = None,
        etag: str = "",
        request_id: str | None = None,
    ) -> _Call[RebalancePlan]:
        """The rebalance plan, as ``Controller.rebalance`` returns it (a dry run unless ``dry_run`` is False)."""
        request = pb.RebalanceRequest(
            name=name,
            max_surge=max_surge,
            time_limit_s=time_limit_s or 0.0,
            dry_run=dry_run,
            etag=etag,
            request_id=_request_id(request_id),
        )
        if max_replacements is not None:
            request.max_replacements = max_replacements
        if max_replacements_percent is not None:
            request.max_replacements_percent = max_replacements_percent
        return _Call("ScaleSets", "Rebalance", request, lambda r: convert.rebalance_plan_from_proto(r.plan))

    # ----- upgrades and repairs -----------------------------------------------------------------------

    @staticmethod
    def start_rolling_upgrade(
        name: str, *, etag: str = "", request_id: str | None = None
    ) -> _Call[RollingUpgrade]:
        """Starts a rolling upgrade to the current model; the upgrade as ``Controller`` returns it."""
        request = pb.StartRollingUpgradeRequest(name=name, etag=etag, request_id=_request_id(request_id))
        return _Call("ScaleSets", "StartRollingUpgrade", request, _upgrade)

    @staticmethod
    def get_rolling_upgrade(name: str) -> _Call[RollingUpgrade | None]:
        """The current or last rolling upgrade; None when none has run."""
        request = pb.GetRollingUpgradeRequest(name=name)
        return _Call("ScaleSets", "GetRollingUpgrade", request, convert.rolling_upgrade_from_proto)

    @staticmethod
    def cancel_rolling_upgrade(name: str, *, request_id: str | None = None) -> _Call[RollingUpgrade]:
        request = pb.CancelRollingUpgradeRequest(name=name, request_id=_request_id(request_id))
        return _Call("ScaleSets", "CancelRollingUpgrade", request, _upgrade)

    @staticmethod
    def upgrade_instances(
        name: str, instance_ids: Iterable[int], *, request_id: str | None = None
    ) -> _Call[None]:
        request = pb.UpgradeInstancesRequest(
            name=name, instance_ids=list(instance_ids), request_id=_request_id(request_id)
        )
        return _Call("ScaleSets", "UpgradeInstances", request, lambda r: None)

    @staticmethod
    def set_repairs_service_state(name: str, state: str, *, request_id: str | None = None) -> _Call[None]:
        number = convert.enum_number(pb.RepairsServiceState.DESCRIPTOR, state, "state")
        request = pb.SetRepairsServiceStateRequest(
            name=name, state=cast("pb.RepairsServiceState", number), request_id=_request_id(request_id)
        )
        return _Call("ScaleSets", "SetRepairsServiceState", request, lambda r: None)

    # ----- autoscale ----------------------------------------------------------------------------------

    @staticmethod
    def set_autoscale_setting(
        name: str, setting: AutoscaleSetting, *, etag: str = "", request_id: str | None = None
    ) -> _Call[AutoscaleSetting]:
        request = pb.SetAutoscaleSettingRequest(
            name=name,
            setting=convert.autoscale_setting_to_proto(setting),
            etag=etag,
            request_id=_request_id(request_id),
        )
        return _Call(
            "Autoscale",
            "SetAutoscaleSetting",
            request,
            lambda r: convert.autoscale_setting_from_proto(r.setting),
        )

    @staticmethod
    def get_autoscale_setting(name: str) -> _Call[AutoscaleSetting]:
        return _Call(
            "Autoscale",
            "GetAutoscaleSetting",
            pb.GetAutoscaleSettingRequest(name=name),
            lambda r: convert.autoscale_setting_from_proto(r.setting),
        )

    @staticmethod
    def delete_autoscale_setting(name: str, *, request_id: str | None = None) -> _Call[None]:
        request = pb.DeleteAutoscaleSettingRequest(name=name, request_id=_request_id(request_id))
        return _Call("Autoscale", "DeleteAutoscaleSetting", request, lambda r: None)

    @staticmethod
    def report_metrics(
        name: str, metric: str, samples: Iterable[tuple[float, float]], *, request_id: str | None = None
    ) -> _Call[int]:
        """Pushes (time in seconds, value) samples of ``metric``; returns how many were accepted."""
        series = pb.MetricSeries(
            metric_name=metric,
            samples=[pb.MetricSample(time_unix_ms=round(t * 1000), value=v) for t, v in samples],
        )
        request = pb.ReportMetricsRequest(name=name, series=[series], request_id=_request_id(request_id))
        return _Call("Autoscale", "ReportMetrics", request, lambda r: int(r.accepted_samples))

    @staticmethod
    def evaluate_autoscale(name: str) -> _Call[AutoscaleDecision]:
        """What autoscale would decide now on the server's clock, and why."""
        return _Call(
            "Autoscale",
            "EvaluateAutoscale",
            pb.EvaluateAutoscaleRequest(name=name),
            convert.decision_from_proto,
        )

    @staticmethod
    def autoscale_history(name: str, limit: int = 200) -> _Pages[list[AutoscaleDecision]]:
        """Recorded decisions, newest first."""
        return _Pages(
            "Autoscale",
            "ListAutoscaleHistory",
            lambda token: pb.ListAutoscaleHistoryRequest(
                name=name, page_size=min(200, limit), page_token=token
            ),
            lambda pages: [convert.decision_from_proto(d) for page in pages for d in page.decisions][:limit],
            enough=lambda pages: sum(len(page.decisions) for page in pages) >= limit,
        )

    # ----- region -------------------------------------------------------------------------------------

    @staticmethod
    def describe_region() -> _Call[Region]:
        return _Call("Regions", "GetRegion", pb.GetRegionRequest(), convert.region_from_proto)

    @staticmethod
    def set_zone_available(zone: str, available: bool, *, request_id: str | None = None) -> _Call[Region]:
        request = pb.SetZoneAvailabilityRequest(
            zone=zone, available=available, request_id=_request_id(request_id)
        )
        return _Call("Regions", "SetZoneAvailability", request, convert.region_from_proto)

    @staticmethod
    def set_core_quota(family: str, cores: int | None, *, request_id: str | None = None) -> _Call[Region]:
        """Sets (``None``: removes) a quota family's vCPU quota; returns the region."""
        request = pb.SetCoreQuotaRequest(family=family, request_id=_request_id(request_id))
        if cores is not None:
            request.cores = cores
        return _Call("Regions", "SetCoreQuota", request, convert.region_from_proto)

    @staticmethod
    def set_pool_capacity(
        zone: str | None,
        vm_size: str,
        priority: str,
        available: int | None,
        price: float | None = None,
        *,
        restricted: bool | None = None,
        request_id: str | None = None,
    ) -> _Call[Region]:
        pool = pb.Pool(zone=zone or "", vm_size=vm_size, priority=convert.PRIORITY_TO_PB[priority])
        if available is not None:
            pool.available = available
        if price is not None:
            pool.price = price
        if restricted is not None:
            pool.restricted = restricted
        request = pb.SetPoolCapacityRequest(pool=pool, request_id=_request_id(request_id))
        return _Call("Regions", "SetPoolCapacity", request, convert.region_from_proto)

    # ----- executors -------------------------------------------------------------------------------

    @staticmethod
    def report_operation(
        operation_id: int,
        succeeded: bool,
        error_code: str = "",
        error_message: str = "",
        *,
        executor_id: str = "",
        address: str = "",
        provider_id: str = "",
        in_progress: bool = False,
    ) -> _Call[bool]:
        """An executor's outcome of one operation (or, with ``in_progress``, a renewal of its lease).
        True if it was applied; False if the operation was no longer pending (reported before, or
        cancelled). Safe to retry: an outcome is applied once."""
        outcome = (
            pb.OPERATION_OUTCOME_IN_PROGRESS
            if in_progress
            else pb.OPERATION_OUTCOME_SUCCEEDED
            if succeeded
            else pb.OPERATION_OUTCOME_FAILED
        )
        request = pb.ReportOperationRequest(
            executor_id=executor_id,
            operation_id=operation_id,
            outcome=outcome,
            error_code=error_code,
            error_message=error_message,
            address=address,
            provider_id=provider_id,
        )
        return _Call("Executors", "ReportOperation", request, lambda r: bool(r.applied))

    @staticmethod
    def acknowledge_scheduled_event(name: str, event_id: int) -> _Call[bool]:
        """Carries out a scheduled eviction now (its instances are drained). False if it was no longer
        pending."""
        request = pb.AcknowledgeScheduledEventRequest(name=name, event_id=event_id)
        return _Call("Executors", "AcknowledgeScheduledEvent", request, lambda r: bool(r.applied))

    @staticmethod
    def complete_lifecycle_action(
        name: str, instance_id: int, hook: str, result: str = "Continue"
    ) -> _Call[bool]:
        """Ends an instance's wait on lifecycle hook ``hook`` (``Continue`` or ``Abandon``); False if no
        such action waited."""
        request = pb.CompleteLifecycleActionRequest(
            name=name,
            instance_id=instance_id,
            hook=hook,
            result=typing.cast(
                "pb.LifecycleHookDefaultResult",
                convert.enum_number(pb.LifecycleHookDefaultResult.DESCRIPTOR, result, "result"),
            ),
        )
        return _Call("Executors", "CompleteLifecycleAction", request, lambda r: bool(r.applied))

    @staticmethod
    def record_lifecycle_action_heartbeat(name: str, instance_id: int, hook: str) -> _Call[bool]:
        """Restarts the timeout of an instance's wait on ``hook``; False if no such action waited."""
        request = pb.RecordLifecycleActionHeartbeatRequest(name=name, instance_id=instance_id, hook=hook)
        return _Call("Executors", "RecordLifecycleActionHeartbeat", request, lambda r: bool(r.applied))

    @staticmethod
    def fleet_report(name: str) -> _Call[FleetReport]:
        """How far ``name``'s infrastructure is from its desired state, with its pending operations."""
        request = pb.GetFleetStatusRequest(name=name)
        return _Call("Executors", "GetFleetStatus", request, convert.fleet_report_from_proto)

    @staticmethod
    def echo(payload: bytes = b"") -> _Call[bytes]:
        return _Call("Diagnostics", "Echo", pb.EchoRequest(payload=payload), lambda r: bytes(r.payload))


def _event(e: pb.Event) -> WatchedEvent:
    plan = convert.plan_from_proto(e.plan) if e.HasField("plan") else None
    return WatchedEvent(
        e.sequence, e.scale_set, e.revision, e.type, e.summary, e.time_unix_ms, plan, e.resume_token
    )


def _resume_after(request: pb.WatchEventsRequest, e: pb.Event) -> None:
    """Moves a watch's request past ``e``: opened again, it resumes after that event."""
    if e.resume_token:  # a cluster's watch of every scale set
        request.after, request.resume_token = 0, e.resume_token
    else:
        request.after = e.revision if request.scale_set else e.sequence


def _watch_goes_on(err: grpc.RpcError) -> bool:
    """Whether a watch that failed with ``err`` opens again (the server let it go as too slow to read),
    ends (cancelled), or raises the error."""
    failure = _Failure.of(err)
    if failure.reason == "SlowConsumer":
        return True
    if failure.code == grpc.StatusCode.CANCELLED:
        return False
    raise failure.exception() from None


_STUBS = {
    "ScaleSets": pb_grpc.ScaleSetsStub,
    "Regions": pb_grpc.RegionsStub,
    "Autoscale": pb_grpc.AutoscaleStub,
    "Diagnostics": pb_grpc.DiagnosticsStub,
    "Executors": pb_grpc.ExecutorsStub,
}


def _lease_request(executor_id: str, zones: Iterable[str], max_in_flight: int, lease_seconds: int) -> Any:
    return pb.LeaseOperationsRequest(
        executor_id=executor_id, zones=list(zones), max_in_flight=max_in_flight, lease_seconds=lease_seconds
    )


class Leased(NamedTuple):
    """One message of an executor's lease stream."""

    operations: list[Operation]
    cancelled_operation_ids: list[int]
    scheduled_events: list[ScheduledEvent]


def _leased(message: Any) -> Leased:
    return Leased(
        [convert.operation_from_proto(o) for o in message.operations],
        list(message.cancelled_operation_ids),
        [convert.scheduled_event_from_proto(e) for e in message.scheduled_events],
    )


class _Connection:
    """What both clients share: the channel (with its options, credentials and stubs), the token,
    deadlines and retries. ``_channels`` is the module that makes the channel: ``grpc`` or ``grpc.aio``;
    the arguments are documented on :class:`Client`."""

    _channels: Any = grpc

    def __init__(
        self,
        target: str = "localhost:50051",
        *,
        timeout: float = 30.0,
        retries: int = 3,
        token: str | None = None,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
    ) -> None:
        self._timeout = timeout
        self._retries = retries
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        if root_certificates is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)
            self._channel = self._channels.secure_channel(target, credentials, options=_CHANNEL_OPTIONS)
        else:
            self._channel = self._channels.insecure_channel(target, options=_CHANNEL_OPTIONS)
        self._stubs = {name: stub(self._channel) for name, stub in _STUBS.items()}

    def _backoff(self, failure: _Failure, attempt: int, delay: float) -> float | None:
        """How long to wait before retrying, or None to give up."""
        if not failure.retryable or attempt >= self._retries:
            return None
        return max(delay, failure.retry_after or 0.0)


def _sync(build: Callable[P, _Call[T]]) -> Callable[Concatenate[Client, P], T]:
    @functools.wraps(build)
    def method(self: Client, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._invoke(build(*args, **kwargs))

    return method


def _sync_pages(build: Callable[P, _Pages[T]]) -> Callable[Concatenate[Client, P], T]:
    @functools.wraps(build)
    def method(self: Client, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._collect(build(*args, **kwargs))

    return method


def _async(build: Callable[P, _Call[T]]) -> Callable[Concatenate[AsyncClient, P], Awaitable[T]]:
    @functools.wraps(build)
    async def method(self: AsyncClient, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return await self._invoke(build(*args, **kwargs))

    return method


def _async_pages(build: Callable[P, _Pages[T]]) -> Callable[Concatenate[AsyncClient, P], Awaitable[T]]:
    @functools.wraps(build)
    async def method(self: AsyncClient, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return await self._collect(build(*args, **kwargs))

    return method


class LeaseStream:
    """The operations leased to one executor stream: iterate for (new operations, cancelled operation
    ids) until :meth:`cancel` (from any thread) or the server ends it."""

    def __init__(self, call: Any) -> None:
        self._call = call

    def __iter__(self) -> Iterator[Leased]:
        try:
            for message in self._call:
                yield _leased(message)
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.CANCELLED:
                raise _Failure.of(err).exception() from None

    def cancel(self) -> None:
        self._call.cancel()


class Client(_Connection):
    """Blocking client. ``Client("localhost:50051")``; use as a context manager or call :meth:`close`.

    Args:
        timeout: the deadline of each call, in seconds.
        retries: how often a retryable failure is retried (with the same request and request_id).
        token: a bearer token (static or JWT) for a server with authentication.
        root_certificates: PEM of the CA that signed the server's certificate: connects with TLS.
        private_key, certificate_chain: the client's own PEM key and certificate, for mutual TLS.
    """

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _invoke(self, call: _Call[T]) -> T:
        method = getattr(self._stubs[call.service], call.method)
        delay = 0.1
        for attempt in range(self._retries + 1):
            try:
                return call.read(method(call.request, timeout=self._timeout, metadata=self._metadata))
            except grpc.RpcError as err:
                failure = _Failure.of(err)
                wait = self._backoff(failure, attempt, delay)
                if wait is None:
                    raise failure.exception() from None
                time.sleep(wait)
                delay *= 2
        raise AssertionError("unreachable")

    def _collect(self, pages: _Pages[T]) -> T:
        replies: list[Any] = []
        token = ""
        while True:
            reply = self._invoke(_Call(pages.service, pages.method, pages.request(token), lambda r: r))
            replies.append(reply)
            token = reply.next_page_token
            if not token or pages.enough(replies):
                return pages.read(replies)

    def watch(self, scale_set: str = "", after: int = 0, resume_token: str = "") -> Iterator[WatchedEvent]:
        """Events after ``after`` (a revision of ``scale_set``, or a global sequence), then live ones; on a
        cluster, a watch of every scale set resumes after the event whose ``resume_token`` is given. A
        stream the server ends because it was read too slowly (``SlowConsumer``) is opened again after the
        last event received."""
        request = pb.WatchEventsRequest(scale_set=scale_set, after=after, resume_token=resume_token)
        while True:
            try:
                for message in self._stubs["ScaleSets"].WatchEvents(request, metadata=self._metadata):
                    for e in message.events:
                        _resume_after(request, e)
                        yield _event(e)
                return
            except grpc.RpcError as err:
                if not _watch_goes_on(err):
                    return

    def lease_operations(
        self, executor_id: str, zones: Iterable[str] = (), max_in_flight: int = 16, lease_seconds: int = 60
    ) -> LeaseStream:
        """Operations leased to this executor as they come: iterate for (new operations, cancelled
        operation ids); :meth:`LeaseStream.cancel` ends it. See :mod:`scaleset.dispatch` for leases."""
        call = self._stubs["Executors"].LeaseOperations(
            _lease_request(executor_id, zones, max_in_flight, lease_seconds), metadata=self._metadata
        )
        return LeaseStream(call)

    create_scale_set = _sync(_Operations.create_scale_set)
    get_scale_set = _sync(_Operations.get_scale_set)
    list_scale_sets = _sync_pages(_Operations.list_scale_sets)
    update_scale_set = _sync(_Operations.update_scale_set)
    delete_scale_set = _sync(_Operations.delete_scale_set)
    set_capacity = _sync(_Operations.set_capacity)
    import_instances = _sync(_Operations.import_instances)
    list_instances = _sync_pages(_Operations.list_instances)
    instance_columns = _sync_pages(_Operations.instance_columns)
    delete_instances = _sync(_Operations.delete_instances)
    evict = _sync(_Operations.evict)
    set_protection = _sync(_Operations.set_protection)
    report_health = _sync(_Operations.report_health)
    rebalance = _sync(_Operations.rebalance)
    start_rolling_upgrade = _sync(_Operations.start_rolling_upgrade)
    get_rolling_upgrade = _sync(_Operations.get_rolling_upgrade)
    cancel_rolling_upgrade = _sync(_Operations.cancel_rolling_upgrade)
    upgrade_instances = _sync(_Operations.upgrade_instances)
    set_repairs_service_state = _sync(_Operations.set_repairs_service_state)
    set_autoscale_setting = _sync(_Operations.set_autoscale_setting)
    get_autoscale_setting = _sync(_Operations.get_autoscale_setting)
    delete_autoscale_setting = _sync(_Operations.delete_autoscale_setting)
    report_metrics = _sync(_Operations.report_metrics)
    evaluate_autoscale = _sync(_Operations.evaluate_autoscale)
    autoscale_history = _sync_pages(_Operations.autoscale_history)
    describe_region = _sync(_Operations.describe_region)
    set_zone_available = _sync(_Operations.set_zone_available)
    set_pool_capacity = _sync(_Operations.set_pool_capacity)
    set_core_quota = _sync(_Operations.set_core_quota)
    echo = _sync(_Operations.echo)
    report_operation = _sync(_Operations.report_operation)
    acknowledge_scheduled_event = _sync(_Operations.acknowledge_scheduled_event)
    complete_lifecycle_action = _sync(_Operations.complete_lifecycle_action)
    record_lifecycle_action_heartbeat = _sync(_Operations.record_lifecycle_action_heartbeat)
    fleet_report = _sync(_Operations.fleet_report)


class AsyncClient(_Connection):
    """The asyncio client: the same methods as :class:`Client`, awaited (``watch`` is an async iterator).
    ``async with AsyncClient("localhost:50051") as c: plan = await c.set_capacity("web", 10)``."""

    _channels = grpc.aio

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _invoke(self, call: _Call[T]) -> T:
        method = getattr(self._stubs[call.service], call.method)
        delay = 0.1
        for attempt in range(self._retries + 1):
            try:
                return call.read(await method(call.request, timeout=self._timeout, metadata=self._metadata))
            except grpc.RpcError as err:
                failure = _Failure.of(err)
                wait = self._backoff(failure, attempt, delay)
                if wait is None:
                    raise failure.exception() from None
                await asyncio.sleep(wait)
                delay *= 2
        raise AssertionError("unreachable")

    async def _collect(self, pages: _Pages[T]) -> T:
        replies: list[Any] = []
        token = ""
        while True:
            reply = await self._invoke(_Call(pages.service, pages.method, pages.request(token), lambda r: r))
            replies.append(reply)
            token = reply.next_page_token
            if not token or pages.enough(replies):
                return pages.read(replies)

    async def watch(
        self, scale_set: str = "", after: int = 0, resume_token: str = ""
    ) -> AsyncIterator[WatchedEvent]:
        """Events after ``after`` (a revision of ``scale_set``, or a global sequence), then live ones; on a
        cluster, a watch of every scale set resumes after the event whose ``resume_token`` is given. A
        stream the server ends because it was read too slowly (``SlowConsumer``) is opened again after the
        last event received."""
        request = pb.WatchEventsRequest(scale_set=scale_set, after=after, resume_token=resume_token)
        while True:
            try:
                async for message in self._stubs["ScaleSets"].WatchEvents(request, metadata=self._metadata):
                    for e in message.events:
                        _resume_after(request, e)
                        yield _event(e)
                return
            except grpc.RpcError as err:
                if not _watch_goes_on(err):
                    return

    create_scale_set = _async(_Operations.create_scale_set)
    get_scale_set = _async(_Operations.get_scale_set)
    list_scale_sets = _async_pages(_Operations.list_scale_sets)
    update_scale_set = _async(_Operations.update_scale_set)
    delete_scale_set = _async(_Operations.delete_scale_set)
    set_capacity = _async(_Operations.set_capacity)
    import_instances = _async(_Operations.import_instances)
    list_instances = _async_pages(_Operations.list_instances)
    instance_columns = _async_pages(_Operations.instance_columns)
    delete_instances = _async(_Operations.delete_instances)
    evict = _async(_Operations.evict)
    set_protection = _async(_Operations.set_protection)
    report_health = _async(_Operations.report_health)
    rebalance = _async(_Operations.rebalance)
    start_rolling_upgrade = _async(_Operations.start_rolling_upgrade)
    get_rolling_upgrade = _async(_Operations.get_rolling_upgrade)
    cancel_rolling_upgrade = _async(_Operations.cancel_rolling_upgrade)
    upgrade_instances = _async(_Operations.upgrade_instances)
    set_repairs_service_state = _async(_Operations.set_repairs_service_state)
    set_autoscale_setting = _async(_Operations.set_autoscale_setting)
    get_autoscale_setting = _async(_Operations.get_autoscale_setting)
    delete_autoscale_setting = _async(_Operations.delete_autoscale_setting)
    report_metrics = _async(_Operations.report_metrics)
    evaluate_autoscale = _async(_Operations.evaluate_autoscale)
    autoscale_history = _async_pages(_Operations.autoscale_history)
    describe_region = _async(_Operations.describe_region)
    set_zone_available = _async(_Operations.set_zone_available)
    set_pool_capacity = _async(_Operations.set_pool_capacity)
    set_core_quota = _async(_Operations.set_core_quota)
    echo = _async(_Operations.echo)
    report_operation = _async(_Operations.report_operation)
    acknowledge_scheduled_event = _async(_Operations.acknowledge_scheduled_event)
    complete_lifecycle_action = _async(_Operations.complete_lifecycle_action)
    record_lifecycle_action_heartbeat = _async(_Operations.record_lifecycle_action_heartbeat)
    fleet_report = _async(_Operations.fleet_report)

    async def lease_operations(
        self, executor_id: str, zones: Iterable[str] = (), max_in_flight: int = 16, lease_seconds: int = 60
    ) -> AsyncIterator[Leased]:
        """Operations leased to this executor as they come, as (new operations, cancelled ids)."""
        request = _lease_request(executor_id, zones, max_in_flight, lease_seconds)
        try:
            async for message in self._stubs["Executors"].LeaseOperations(request, metadata=self._metadata):
                yield _leased(message)
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.CANCELLED:
                raise _Failure.of(err).exception() from None
