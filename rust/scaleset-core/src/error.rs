//! The one error type of the core. Every variant carries a stable, machine-readable code (Azure's own
//! where Azure documents one) and a message written for the operator who has to act on it.

/// What kind of failure this is; the binding and the service map each kind exactly once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request itself is wrong (bad value, unknown enum, out of range).
    InvalidInput,
    /// The request is well formed but conflicts with current state (immutable field, protection).
    Conflict,
    /// A named scale set, instance or zone does not exist.
    NotFound,
    /// The region cannot supply what was asked (zones down, pools exhausted, limits).
    Capacity,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct CoreError {
    pub kind: ErrorKind,
    pub code: &'static str,
    pub message: String,
    /// The request field at fault, in the API's snake_case path ("sku.capacity"), where one is.
    pub field: Option<&'static str>,
}

impl CoreError {
    pub fn invalid(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::InvalidInput,
            code,
            message: message.into(),
            field: None,
        }
    }
    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Conflict,
            code,
            message: message.into(),
            field: None,
        }
    }
    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::NotFound,
            code,
            message: message.into(),
            field: None,
        }
    }
    pub fn capacity(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Capacity,
            code,
            message: message.into(),
            field: None,
        }
    }
}

impl CoreError {
    /// Names the request field at fault.
    #[must_use]
    pub fn at(mut self, field: &'static str) -> Self {
        self.field = Some(field);
        self
    }
}

pub type Result<T> = std::result::Result<T, CoreError>;

/// Stable error codes. Azure's spelling where Azure has one; our own otherwise (documented in the README).
pub mod codes {
    pub const INVALID_PARAMETER: &str = "InvalidParameter";
    pub const INVALID_RESOURCE_NAME: &str = "InvalidResourceName";
    pub const PROPERTY_CHANGE_NOT_ALLOWED: &str = "PropertyChangeNotAllowed";
    pub const OPERATION_NOT_ALLOWED: &str = "OperationNotAllowed";
    pub const RESOURCE_NOT_FOUND: &str = "ResourceNotFound";
    pub const INSTANCE_NOT_FOUND: &str = "InstanceNotFound";
    pub const ZONE_NOT_FOUND: &str = "ZoneNotFound";
    pub const SCALE_SET_ALREADY_EXISTS: &str = "ScaleSetAlreadyExists";
    pub const INSTANCE_ALREADY_EXISTS: &str = "InstanceAlreadyExists";
    pub const INVALID_FAULT_DOMAIN_COUNT: &str = "InvalidPlatformFaultDomainCount";
    pub const ZONE_BALANCE_REQUIRES_MULTIPLE_ZONES: &str = "ZoneBalanceRequiresMultipleZones";
    pub const ZONAL_ALLOCATION_FAILED: &str = "ZonalAllocationFailed";
    pub const ALLOCATION_FAILED: &str = "AllocationFailed";
    pub const ZONE_BALANCE_BLOCKED: &str = "ZoneBalanceBlocked";
    pub const TOO_MANY_ZONES_UNAVAILABLE: &str = "TooManyZonesUnavailable";
    pub const SCALE_IN_BLOCKED_BY_PROTECTION: &str = "ScaleInBlockedByProtection";
    pub const INVALID_PROTECTION_POLICY: &str = "InvalidProtectionPolicy";
    pub const MAX_PRICE_VALUE_INVALID: &str = "MaxPriceValueInvalid";
    pub const MAX_PRICE_CHANGE_NOT_ALLOWED_FOR_ALLOCATED_VMS: &str =
        "MaxPriceChangeNotAllowedForAllocatedVMs";
    pub const MAX_PRICE_ONLY_FOR_SPOT: &str = "MaxPriceIsSupportedOnlyForAzureSpotVirtualMachines";
    pub const EVICTION_POLICY_ONLY_FOR_SPOT: &str =
        "EvictionPolicyCanBeSetOnlyOnAzureSpotVirtualMachines";
    pub const PRIORITY_MIX_NOT_SUPPORTED: &str = "PriorityMixPolicyNotSupported";
    pub const NOT_A_SPOT_INSTANCE: &str = "NotAzureSpotVirtualMachine";
    pub const SKU_PROFILE_ALLOCATION_STRATEGY_INVALID: &str = "SkuProfileAllocationStrategyInvalid";
    pub const SKU_PROFILE_VM_SIZES_EMPTY: &str = "SkuProfileVMSizesCannotBeNullOrEmpty";
    pub const SKU_PROFILE_TOO_MANY_VM_SIZES: &str = "SkuProfileHasTooManyVMSizesInRequest";
    pub const SKU_PROFILE_DUPLICATE_VM_SIZE: &str = "SkuProfileVMSizesCannotHaveDuplicates";
    pub const SKU_PROFILE_SCENARIO_NOT_SUPPORTED: &str = "SkuProfileScenarioNotSupported";
    pub const SKU_NAME_MUST_BE_MIX: &str = "SkuNameMustBeMixIfSkuProfileIsSpecified";
    pub const SKU_TIER_MUST_NOT_BE_SET: &str = "SkuTierMustNotBeSetIfSkuProfileIsSpecified";
    pub const SKU_PROFILE_RANK_INVALID: &str = "SkuProfileRankInvalid";
    pub const SKU_NOT_AVAILABLE: &str = "SkuNotAvailable";
    pub const SPOT_PRICE_ABOVE_MAX_PRICE: &str = "SpotPriceGreaterThanProvidedMaxPrice";
    pub const SPOT_RESTORE_ONLY_FOR_SPOT: &str =
        "SpotRestorationIsSupportedOnlyForAzureSpotScaleSets";
}
