//! Managing an account's devices: names, revocation, per-device KeyPackage claims, and
//! linking a new device (see [`crate::api::links`]).

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use sealpost_proto::api::{ClaimKeyPackagesResponse, ClaimedKeyPackage, RenameDeviceRequest};
use sealpost_proto::{Bytes64, ErrorCode, limits};
use uuid::Uuid;

use super::{ApiJson, AppState, AuthDevice, existing_account};
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

pub async fn rename(
    State(state): State<AppState>,
    AuthDevice(caller): AuthDevice,
    Path(device_id): Path<String>,
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

pub async fn remove(
    State(state): State<AppState>,
    AuthDevice(caller): AuthDevice,
    Path(device_id): Path<String>,
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

pub async fn claim(
    State(state): State<AppState>,
    AuthDevice(caller): AuthDevice,
    Path(device_id): Path<String>,
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
