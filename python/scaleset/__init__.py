"""scaleset: a placement engine for groups of virtual machines, with Azure VM Scale Sets' behaviour.

Import the engine and the model from here::

    from scaleset import Engine, Region, ScaleSetSpec, Sku

    engine = Engine(Region(zones=["1", "2", "3"], fault_domains_per_zone=5))
    engine.create_scale_set(ScaleSetSpec(name="web", zones=["1", "2", "3"], sku=Sku(name="Standard_D2s_v5")))
    plan = engine.set_capacity("web", 10)
"""

from scaleset import errors
from scaleset.engine import Engine
from scaleset.model import (
    AutomaticRepairsPolicy,
    AutomaticZoneRebalancingPolicy,
    Eviction,
    Instance,
    Plan,
    PlannedCreate,
    PlannedDelete,
    Pool,
    PriorityMixPolicy,
    Region,
    RollingUpgradePolicy,
    ScaleInPolicy,
    ScaleSet,
    ScaleSetSpec,
    Sku,
    SkuProfile,
    UpgradePolicy,
    VmSize,
)

__all__ = [
    "AutomaticRepairsPolicy",
    "AutomaticZoneRebalancingPolicy",
    "Engine",
    "Eviction",
    "Instance",
    "Plan",
    "PlannedCreate",
    "PlannedDelete",
    "Pool",
    "PriorityMixPolicy",
    "Region",
    "RollingUpgradePolicy",
    "ScaleInPolicy",
    "ScaleSet",
    "ScaleSetSpec",
    "Sku",
    "SkuProfile",
    "UpgradePolicy",
    "VmSize",
    "errors",
]

__version__ = "0.1.0"
