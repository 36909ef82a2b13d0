"""scaleset: a placement engine for groups of virtual machines, with Azure VM Scale Sets' behaviour.

Import the controller and the model from here::

    from scaleset import Controller, Region, ScaleSetSpec, Sku

    controller = Controller(Region(zones=["1", "2", "3"], fault_domains_per_zone=5))
    controller.create_scale_set(ScaleSetSpec(name="web", zones=["1", "2", "3"], sku=Sku(name="Standard_D2s_v5")))
    plan = controller.set_capacity("web", 10)

:class:`Controller` runs every change as a typed command with its time-driven policies (rolling upgrades,
repairs, zone balance); :class:`Engine` is the placement facade beneath it, without policies.
"""

from importlib.metadata import PackageNotFoundError, version

from scaleset import errors
from scaleset.controller import Controller
from scaleset.engine import Engine
from scaleset.model import (
    AutomaticRepairsPolicy,
    AutomaticZoneRebalancingPolicy,
    AutoscaleCapacity,
    AutoscaleDecision,
    AutoscaleProfile,
    AutoscaleSetting,
    Eviction,
    Instance,
    MaxInstancePercentPerZonePolicy,
    MetricTrigger,
    Placement,
    Plan,
    PlannedCreate,
    PlannedDelete,
    Pool,
    PredictiveAutoscalePolicy,
    PriorityMixPolicy,
    Recurrence,
    RecurrentSchedule,
    Region,
    RollingUpgradePolicy,
    ScaleAction,
    ScaleInPolicy,
    ScaleRule,
    ScaleSet,
    ScaleSetSpec,
    Sku,
    SkuProfile,
    TimeWindow,
    UpgradePolicy,
    VmSize,
    ZoneAllocationPolicy,
)

__all__ = [
    "AutomaticRepairsPolicy",
    "AutomaticZoneRebalancingPolicy",
    "AutoscaleCapacity",
    "AutoscaleDecision",
    "AutoscaleProfile",
    "AutoscaleSetting",
    "Controller",
    "Engine",
    "Eviction",
    "Instance",
    "MaxInstancePercentPerZonePolicy",
    "MetricTrigger",
    "Placement",
    "Plan",
    "PlannedCreate",
    "PlannedDelete",
    "Pool",
    "PredictiveAutoscalePolicy",
    "PriorityMixPolicy",
    "Recurrence",
    "RecurrentSchedule",
    "Region",
    "RollingUpgradePolicy",
    "ScaleAction",
    "ScaleInPolicy",
    "ScaleRule",
    "ScaleSet",
    "ScaleSetSpec",
    "Sku",
    "SkuProfile",
    "TimeWindow",
    "UpgradePolicy",
    "VmSize",
    "ZoneAllocationPolicy",
    "errors",
]

try:
    __version__ = version("scaleset")  # one place for the version: rust/Cargo.toml's workspace version
except PackageNotFoundError:  # pragma: no cover - running from a source tree without an install
    __version__ = "0+unknown"
