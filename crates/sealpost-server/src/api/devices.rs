//! Managing an account's devices: names, revocation, per-device KeyPackage claims, and
//! linking a new device (see [`crate::api::links`]).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use sealpost_proto::api::{ClaimKeyPackagesResponse, ClaimedKeyPackage, RenameDeviceRequest};
use sealpost_proto::{Bytes64, ErrorBody, ErrorCode, limits};
use uuid::Uuid;

use super::{ApiJson, ApiPath, AppState, AuthDevice, existing_account};
use crate::error::ApiError;
use crate::store::DeviceRecord;

fn parse_device_id(text: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(text).map_err(|_| ApiError::bad_request("a device id is a UUID"))
}

/// The device named in the path, which must belong to the caller's account.
async fn own_device(
    state: &AppState,
    caller: &DeviceRecord,
    device_id: &str,
) -> Result<DeviceRecord, ApiError> {
    let device_id = parse_device_id(device_id)?;
    match state.store.device(device_id).await? {
        Some(device) if device.username == caller.username => Ok(device),
        _ => Err(ApiError::new(
            ErrorCode::DeviceNotFound,
            "no such device in your account",
        )),
    }
}

/// Sets a device's sealed name (one of the caller's account's devices).
#[utoipa::path(
    put,
    path = "/v1/devices/{device_id}/name",
    tag = "devices",
    operation_id = "rename_device",
    security(("bearerAuth" = [])),
    params(("device_id" = Uuid, Path)),
    request_body = RenameDeviceRequest,
    responses(
        (status = 204, description = "Renamed."),
        (status = 400, description = "`bad_request`: the device id is not a UUID, or the body \
            is not JSON (or lacks `Content-Type: application/json`) or has wrong, unknown or \
            missing fields.", body = ErrorBody),
        (status = 401, description = "`unauthorized`: missing, invalid or expired bearer token.", body = ErrorBody),
        (status = 404, description = "`device_not_found`: no such device in the caller's account.", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: the sealed name is empty or over 512 \
            bytes, or the body is over 256 KiB.", body = ErrorBody),
    )
)]
pub async fn rename(
    State(state): State<AppState>,
    AuthDevice(caller): AuthDevice,
    ApiPath(device_id): ApiPath<String>,
    ApiJson(request): ApiJson<RenameDeviceRequest>,
) -> Result<StatusCode, ApiError> {
    let device = own_device(&state, &caller, &device_id).await?;
    if request.name_sealed.is_empty()
        || request.name_sealed.len() > limits::DEVICE_NAME_SEALED_MAX_BYTES
    {
        return Err(ApiError::new(
            ErrorCode::PayloadTooLarge,
            "a sealed device name is 1 to 512 bytes",
        ));
    }
    state
        .store
        .set_device_name(device.device_id, request.name_sealed.as_ref())
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Revokes another device of the caller's account: its token, KeyPackages, memberships
/// and mailbox are deleted at once.
#[utoipa::path(
    delete,
    path = "/v1/devices/{device_id}",
    tag = "devices",
    operation_id = "remove_device",
    security(("bearerAuth" = [])),
    params(("device_id" = Uuid, Path)),
    responses(
        (status = 204, description = "Revoked."),
        (status = 400, description = "`bad_request`: the device id is not a UUID, or it is the \
            calling device (a device cannot revoke itself).", body = ErrorBody),
        (status = 401, description = "`unauthorized`: missing, invalid or expired bearer token.", body = ErrorBody),
        (status = 404, description = "`device_not_found`: no such device in the caller's account.", body = ErrorBody),
    )
)]
pub async fn remove(
    State(state): State<AppState>,
    AuthDevice(caller): AuthDevice,
    ApiPath(device_id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    let device = own_device(&state, &caller, &device_id).await?;
    if device.device_id == caller.device_id {
        return Err(ApiError::bad_request(
            "a device cannot revoke itself; revoke it from another device",
        ));
    }
    state.store.remove_device(device.device_id).await?;
    tracing::info!("device revoked");
    Ok(StatusCode::NO_CONTENT)
}

/// Claims one KeyPackage of one device (a one-time one, else its last-resort one).
#[utoipa::path(
    post,
    path = "/v1/devices/{device_id}/keypackages/claim",
    tag = "keypackages",
    operation_id = "claim_device_key_package",
    security(("bearerAuth" = [])),
    params(("device_id" = Uuid, Path)),
    responses(
        (status = 200, description = "One KeyPackage of the device.", body = ClaimKeyPackagesResponse),
        (status = 400, description = "`bad_request`: the device id is not a UUID.", body = ErrorBody),
        (status = 401, description = "`unauthorized`: missing, invalid or expired bearer token.", body = ErrorBody),
        (status = 404, description = "`device_not_found` or `no_key_packages`.", body = ErrorBody),
        (status = 429, description = "`rate_limited`: too many KeyPackage claims by this account \
            (or requests from this address or account); retry after `Retry-After` seconds.", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying."))),
    )
)]
pub async fn claim(
    State(state): State<AppState>,
    AuthDevice(caller): AuthDevice,
    ApiPath(device_id): ApiPath<String>,
) -> Result<Json<ClaimKeyPackagesResponse>, ApiError> {
    state.rate_limits.check_claim(&caller.username)?;
    let device_id = parse_device_id(&device_id)?;
    let (device, package) = state.store.claim_device_key_package(device_id).await?;
    let account = existing_account(&state, &device.username).await?;
    #[cfg(feature = "adversarial")]
    if let Some(forged) = crate::adversary::forged_claim(&state, &device.username) {
        return Ok(Json(ClaimKeyPackagesResponse {
            username: device.username,
            account_key: Bytes64(account.account_key),
            key_packages: vec![forged],
        }));
    }
    Ok(Json(ClaimKeyPackagesResponse {
        username: device.username,
        account_key: Bytes64(account.account_key),
        key_packages: vec![ClaimedKeyPackage {
            device_id: device.device_id,
            certificate: Bytes64(device.certificate),
            key_package: Bytes64(package),
        }],
    }))
}
