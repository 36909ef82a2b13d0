"""A typed, blocking Python client for a scaleset server.

It speaks the same domain types as the in-process :class:`~scaleset.Controller` and raises the same
:mod:`scaleset.errors` (kind from the gRPC status, ``code`` from the ``ErrorInfo`` detail). Every
mutation carries a ``request_id`` (generated unless given), and is retried with it when the server is
briefly unavailable, so a retry never applies twice.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from scaleset import convert
from scaleset.errors import (
    CapacityError,
    ConflictError,
    InvalidInputError,
    NotFoundError,
    ScaleSetError,
    UnavailableError,
    error,
)
from scaleset.model import AutoscaleDecision, AutoscaleSetting, Eviction, Instance, Plan, Region, ScaleSetSpec
from scaleset.v1 import scaleset_pb2 as pb
from scaleset.v1 import scaleset_pb2_grpc as pb_grpc

__all__ = ["Client", "ScaleSetInfo", "WatchedEvent"]

_ERROR_BY_STATUS: dict[grpc.StatusCode, type[ScaleSetError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInputError,
    grpc.StatusCode.FAILED_PRECONDITION: ConflictError,
    grpc.StatusCode.ALREADY_EXISTS: ConflictError,
    grpc.StatusCode.ABORTED: ConflictError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: CapacityError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
}
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE}


@dataclass(frozen=True, slots=True)
class ScaleSetInfo:
    """A scale set as the server stores it: its spec, capacity, and revision/etag for preconditions."""

    spec: ScaleSetSpec
    capacity: int
    revision: int
    etag: str


@dataclass(frozen=True, slots=True)
class WatchedEvent:
    sequence: int
    scale_set: str
    revision: int
    type: str
    summary: str
    time_unix_ms: int
    plan: Plan | None


def _error(err: grpc.RpcError) -> Exception:
    """A server error as the scaleset exception it was raised as."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    status = rpc_status.from_call(err) if isinstance(err, grpc.Call) else None
    reason = code.name
    metadata: dict[str, str] = {}
    if status is not None:
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                reason, metadata = info.reason, dict(info.metadata)
    cls = _ERROR_BY_STATUS.get(code, ScaleSetError)
    field = metadata.pop("field", None)
    message = err.details() if hasattr(err, "details") else str(err)
    return error(cls, message, reason, field=field, metadata=metadata)


def _info(msg: pb.ScaleSet) -> ScaleSetInfo:
    return ScaleSetInfo(convert.spec_from_proto(msg.spec), msg.capacity, msg.revision, msg.etag)


class Client:
    """Blocking client. ``Client("localhost:50051")``; use as a context manager or call :meth:`close`.

    Args:
        token: a bearer token (static or JWT) for a server with authentication.
        root_certificates: PEM of the CA that signed the server's certificate: connects with TLS.
        private_key, certificate_chain: the client's own PEM key and certificate, for mutual TLS.
    """

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
        # The server sends replies up to 64 MB (a 100,000-instance plan is about 32 MB): accept as much.
        options = [("grpc.max_receive_message_length", 64 * 1024 * 1024), ("grpc.keepalive_time_ms", 60_000)]
        if root_certificates is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)
            self._channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._scale_sets = pb_grpc.ScaleSetsStub(self._channel)
        self._regions = pb_grpc.RegionsStub(self._channel)
        self._diagnostics = pb_grpc.DiagnosticsStub(self._channel)
        self._autoscale = pb_grpc.AutoscaleStub(self._channel)
        self._timeout = timeout
        self._retries = retries

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: Any, request: Any, *, idempotent: bool = True) -> Any:
        delay = 0.1
        for attempt in range(self._retries + 1):
            try:
                return method(request, timeout=self._timeout, metadata=self._metadata)
            except grpc.RpcError as err:
                if idempotent and err.code() in _RETRYABLE and attempt < self._retries:
                    time.sleep(delay)
                    delay *= 2
                    continue
                raise _error(err) from None
        raise AssertionError("unreachable")

    @staticmethod
    def _request_id(request_id: str | None) -> str:
        return request_id if request_id is not None else str(uuid.uuid4())

    # ----- scale sets ---------------------------------------------------------------------------------

    def create_scale_set(
        self, spec: ScaleSetSpec, capacity: int = 0, *, request_id: str | None = None
    ) -> tuple[ScaleSetInfo, Plan]:
        reply = self._call(
            self._scale_sets.CreateScaleSet,
            pb.CreateScaleSetRequest(
                scale_set=convert.spec_to_proto(spec),
                capacity=capacity,
                request_id=self._request_id(request_id),
            ),
        )
        return _info(reply.scale_set), convert.plan_from_proto(reply.plan)

    def get_scale_set(self, name: str) -> ScaleSetInfo:
        return _info(self._call(self._scale_sets.GetScaleSet, pb.GetScaleSetRequest(name=name)))

    def list_scale_sets(self, page_size: int = 100) -> list[ScaleSetInfo]:
        out: list[ScaleSetInfo] = []
        token = ""
        while True:
            reply = self._call(
                self._scale_sets.ListScaleSets, pb.ListScaleSetsRequest(page_size=page_size, page_token=token)
            )
            out.extend(_info(s) for s in reply.scale_sets)
            token = reply.next_page_token
            if not token:
                return out

    def update_scale_set(
        self,
        spec: ScaleSetSpec,
        *,
        update_mask: Sequence[str] = (),
        etag: str = "",
        request_id: str | None = None,
    ) -> ScaleSetInfo:
        request = pb.UpdateScaleSetRequest(
            scale_set=convert.spec_to_proto(spec), etag=etag, request_id=self._request_id(request_id)
        )
        # Like Engine.update_scale_set, the spec replaces the stored one unless a mask names what changes.
        request.update_mask.paths.extend(update_mask or ["*"])
        return _info(self._call(self._scale_sets.UpdateScaleSet, request))

    def delete_scale_set(self, name: str, *, etag: str = "", request_id: str | None = None) -> None:
        self._call(
            self._scale_sets.DeleteScaleSet,
            pb.DeleteScaleSetRequest(name=name, etag=etag, request_id=self._request_id(request_id)),
        )

    def set_capacity(
        self,
        name: str,
        capacity: int,
        *,
        dry_run: bool = False,
        etag: str = "",
        request_id: str | None = None,
        summary_only: bool = False,
    ) -> Plan:
        request = pb.SetCapacityRequest(
            name=name,
            capacity=capacity,
            dry_run=dry_run,
            etag=etag,
            request_id=self._request_id(request_id),
            view=pb.PLAN_VIEW_SUMMARY if summary_only else pb.PLAN_VIEW_FULL,
        )
        return convert.plan_from_proto(self._call(self._scale_sets.SetCapacity, request).plan)

    # ----- instances ----------------------------------------------------------------------------------

    def import_instances(
        self, name: str, instances: Iterable[Instance], *, request_id: str | None = None
    ) -> None:
        request = pb.ImportInstancesRequest(name=name, request_id=self._request_id(request_id))
        for i in instances:
            request.instances.add(
                instance_id=i.instance_id,
                name=i.name or "",
                zone=i.zone or "",
                fault_domain=i.fault_domain,
                vm_size=i.vm_size,
                priority=convert.PRIORITY_TO_PB[i.priority],
                power_state=convert.POWER_TO_PB[i.power_state],
                health=convert.HEALTH_TO_PB[i.health],
                model_version=i.model_version or 0,
                protect_from_scale_in=i.protect_from_scale_in,
                protect_from_scale_set_actions=i.protect_from_scale_set_actions,
            )
        self._call(self._scale_sets.ImportInstances, request)

    def list_instances(self, name: str, page_size: int = 1000) -> list[Instance]:
        out: list[Instance] = []
        token = ""
        while True:
            reply = self._call(
                self._scale_sets.ListInstances,
                pb.ListInstancesRequest(name=name, page_size=page_size, page_token=token),
            )
            out.extend(convert.columns_from_proto(reply.instances, name))
            token = reply.next_page_token
            if not token:
                return out

    def delete_instances(
        self, name: str, instance_ids: Iterable[int], *, request_id: str | None = None
    ) -> Plan:
        request = pb.DeleteInstancesRequest(
            name=name, instance_ids=list(instance_ids), request_id=self._request_id(request_id)
        )
        return convert.plan_from_proto(self._call(self._scale_sets.DeleteInstances, request).plan)

    def evict(self, name: str, instance_ids: Iterable[int], *, request_id: str | None = None) -> Eviction:
        request = pb.EvictInstancesRequest(
            name=name, instance_ids=list(instance_ids), request_id=self._request_id(request_id)
        )
        reply = self._call(self._scale_sets.EvictInstances, request)
        return Eviction(deleted=tuple(reply.deleted), deallocated=tuple(reply.deallocated))

    def set_protection(
        self,
        name: str,
        instance_ids: Iterable[int],
        protect_from_scale_in: bool,
        protect_from_scale_set_actions: bool = False,
        *,
        request_id: str | None = None,
    ) -> None:
        request = pb.SetInstanceProtectionRequest(
            name=name,
            instance_ids=list(instance_ids),
            protect_from_scale_in=protect_from_scale_in,
            protect_from_scale_set_actions=protect_from_scale_set_actions,
            request_id=self._request_id(request_id),
        )
        self._call(self._scale_sets.SetInstanceProtection, request)

    def report_health(
        self, name: str, instance_ids: Iterable[int], health: str, *, request_id: str | None = None
    ) -> None:
        request = pb.ReportInstanceHealthRequest(name=name, request_id=self._request_id(request_id))
        request.reports.add(instance_ids=list(instance_ids), health=convert.HEALTH_TO_PB[health])
        self._call(self._scale_sets.ReportInstanceHealth, request)

    def rebalance(
        self,
        name: str,
        max_replacements: int | None = None,
        max_surge: int = 1,
        time_limit_s: float = 1.0,
        dry_run: bool = True,
        *,
        max_replacements_percent: float | None = None,
        etag: str = "",
        request_id: str | None = None,
    ) -> pb.RebalancePlan:
        """The server's rebalance plan (as the protobuf message: waves, counts, status, bound)."""
        request = pb.RebalanceRequest(
            name=name,
            max_surge=max_surge,
            time_limit_s=time_limit_s,
            dry_run=dry_run,
            etag=etag,
            request_id=self._request_id(request_id),
        )
        if max_replacements is not None:
            request.max_replacements = max_replacements
        if max_replacements_percent is not None:
            request.max_replacements_percent = max_replacements_percent
        return self._call(self._scale_sets.Rebalance, request).plan

    def start_rolling_upgrade(
        self, name: str, *, etag: str = "", request_id: str | None = None
    ) -> pb.RollingUpgradeStatus:
        request = pb.StartRollingUpgradeRequest(name=name, etag=etag, request_id=self._request_id(request_id))
        return self._call(self._scale_sets.StartRollingUpgrade, request)

    def get_rolling_upgrade(self, name: str) -> pb.RollingUpgradeStatus:
        return self._call(self._scale_sets.GetRollingUpgrade, pb.GetRollingUpgradeRequest(name=name))

    def cancel_rolling_upgrade(self, name: str, *, request_id: str | None = None) -> pb.RollingUpgradeStatus:
        request = pb.CancelRollingUpgradeRequest(name=name, request_id=self._request_id(request_id))
        return self._call(self._scale_sets.CancelRollingUpgrade, request)

    def upgrade_instances(
        self, name: str, instance_ids: Iterable[int], *, request_id: str | None = None
    ) -> None:
        request = pb.UpgradeInstancesRequest(
            name=name, instance_ids=list(instance_ids), request_id=self._request_id(request_id)
        )
        self._call(self._scale_sets.UpgradeInstances, request)

    def set_repairs_service_state(self, name: str, state: str, *, request_id: str | None = None) -> None:
        request = pb.SetRepairsServiceStateRequest(
            name=name,
            state=cast(
                "pb.RepairsServiceState",
                convert.enum_number(pb.RepairsServiceState.DESCRIPTOR, state, "state"),
            ),
            request_id=self._request_id(request_id),
        )
        self._call(self._scale_sets.SetRepairsServiceState, request)

    # ----- autoscale --------------------------------------------------------------------------------

    def set_autoscale_setting(
        self, name: str, setting: AutoscaleSetting, *, etag: str = "", request_id: str | None = None
    ) -> AutoscaleSetting:
        request = pb.SetAutoscaleSettingRequest(
            name=name,
            setting=convert.autoscale_setting_to_proto(setting),
            etag=etag,
            request_id=self._request_id(request_id),
        )
        return convert.autoscale_setting_from_proto(
            self._call(self._autoscale.SetAutoscaleSetting, request).setting
        )

    def get_autoscale_setting(self, name: str) -> AutoscaleSetting:
        reply = self._call(self._autoscale.GetAutoscaleSetting, pb.GetAutoscaleSettingRequest(name=name))
        return convert.autoscale_setting_from_proto(reply.setting)

    def delete_autoscale_setting(self, name: str, *, request_id: str | None = None) -> None:
        request = pb.DeleteAutoscaleSettingRequest(name=name, request_id=self._request_id(request_id))
        self._call(self._autoscale.DeleteAutoscaleSetting, request)

    def report_metrics(
        self, name: str, metric: str, samples: Iterable[tuple[float, float]], *, request_id: str | None = None
    ) -> int:
        """Pushes (time in seconds, value) samples of ``metric``; returns how many were accepted."""
        series = pb.MetricSeries(
            metric_name=metric,
            samples=[pb.MetricSample(time_unix_ms=round(t * 1000), value=v) for t, v in samples],
        )
        request = pb.ReportMetricsRequest(name=name, series=[series], request_id=self._request_id(request_id))
        return int(self._call(self._autoscale.ReportMetrics, request).accepted_samples)

    def evaluate_autoscale(self, name: str) -> AutoscaleDecision:
        """What autoscale would decide now on the server's clock, and why."""
        reply = self._call(self._autoscale.EvaluateAutoscale, pb.EvaluateAutoscaleRequest(name=name))
        return convert.decision_from_proto(reply)

    def autoscale_history(self, name: str, limit: int = 200) -> list[AutoscaleDecision]:
        """Recorded decisions, newest first."""
        out: list[AutoscaleDecision] = []
        token = ""
        while len(out) < limit:
            request = pb.ListAutoscaleHistoryRequest(name=name, page_size=min(200, limit), page_token=token)
            reply = self._call(self._autoscale.ListAutoscaleHistory, request)
            out += [convert.decision_from_proto(d) for d in reply.decisions]
            token = reply.next_page_token
            if not token:
                break
        return out[:limit]

    def watch(self, scale_set: str = "", after: int = 0) -> Iterator[WatchedEvent]:
        """Events after ``after`` (a revision of ``scale_set``, or a global sequence), then live ones."""
        try:
            request = pb.WatchEventsRequest(scale_set=scale_set, after=after)
            for message in self._scale_sets.WatchEvents(request, metadata=self._metadata):
                for e in message.events:
                    yield WatchedEvent(
                        e.sequence,
                        e.scale_set,
                        e.revision,
                        e.type,
                        e.summary,
                        e.time_unix_ms,
                        convert.plan_from_proto(e.plan) if e.HasField("plan") else None,
                    )
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.CANCELLED:
                return
            raise _error(err) from None

    # ----- region -------------------------------------------------------------------------------------

    def describe_region(self) -> Region:
        return convert.region_from_proto(self._call(self._regions.GetRegion, pb.GetRegionRequest()))

    def set_zone_available(self, zone: str, available: bool, *, request_id: str | None = None) -> Region:
        request = pb.SetZoneAvailabilityRequest(
            zone=zone, available=available, request_id=self._request_id(request_id)
        )
        return convert.region_from_proto(self._call(self._regions.SetZoneAvailability, request))

    def set_pool_capacity(
        self,
        zone: str | None,
        vm_size: str,
        priority: str,
        available: int | None,
        price: float | None = None,
        *,
        request_id: str | None = None,
    ) -> Region:
        pool = pb.Pool(zone=zone or "", vm_size=vm_size, priority=priority)
        if available is not None:
            pool.available = available
        if price is not None:
            pool.price = price
        request = pb.SetPoolCapacityRequest(pool=pool, request_id=self._request_id(request_id))
        return convert.region_from_proto(self._call(self._regions.SetPoolCapacity, request))

    def echo(self, payload: bytes = b"") -> bytes:
        return bytes(self._call(self._diagnostics.Echo, pb.EchoRequest(payload=payload)).payload)
