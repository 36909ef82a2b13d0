"""Time-driven policies above the engine: rolling upgrades, automatic repairs, automatic zone balance.

Each policy is advanced with explicit time by :class:`~scaleset.policies.runner.PolicyRunner`, which owns
their state and calls the engine facade one way.
"""

from scaleset.policies.common import Action
from scaleset.policies.repairs import RepairState
from scaleset.policies.runner import PolicyRunner
from scaleset.policies.upgrade import RollingUpgrade
from scaleset.policies.zone_balance import ZoneBalanceOperation

__all__ = ["Action", "PolicyRunner", "RepairState", "RollingUpgrade", "ZoneBalanceOperation"]
