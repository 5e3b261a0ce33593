//! KeyPackage upload, count and claim.

use axum::Json;
use axum::extract::State;
use sealpost_proto::api::{
    ClaimKeyPackagesResponse, ClaimedKeyPackage, KeyPackageCountResponse, UploadKeyPackagesRequest,
};
use sealpost_proto::{Bytes64, ErrorBody, ErrorCode, limits};

use super::{ApiJson, ApiPath, AppState, AuthDevice, existing_account};
use crate::error::ApiError;
use crate::store::KeyPackageCount;

fn count_response(count: KeyPackageCount) -> Json<KeyPackageCountResponse> {
    Json(KeyPackageCountResponse {
        one_time: count.one_time,
        last_resort: count.last_resort,
    })
}

/// Uploads one-time KeyPackages (at most 200 per request, 500 stored) and optionally
/// replaces the last-resort one.
#[utoipa::path(
    post,
    path = "/v1/keypackages",
    tag = "keypackages",
    operation_id = "upload_key_packages",
    security(("bearerAuth" = [])),
    request_body = UploadKeyPackagesRequest,
    responses(
        (status = 200, description = "The device's KeyPackages after the upload.", body = KeyPackageCountResponse),
        (status = 400, description = "`bad_request`: the body is not JSON (or lacks \
            `Content-Type: application/json`) or has wrong, unknown or missing fields.", body = ErrorBody),
        (status = 401, description = "`unauthorized`: missing, invalid or expired bearer token.", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: more than 200 KeyPackages, one empty \
            or over 8,192 bytes, or a body over the route's limit (about 2.2 MB).", body = ErrorBody),
        (status = 422, description = "`limit_exceeded`: the device would store more than 500 \
            one-time KeyPackages.", body = ErrorBody),
    )
)]
pub async fn upload(
    State(state): State<AppState>,
    AuthDevice(device): AuthDevice,
    ApiJson(request): ApiJson<UploadKeyPackagesRequest>,
) -> Result<Json<KeyPackageCountResponse>, ApiError> {
    if request.key_packages.len() > limits::KEY_PACKAGES_PER_UPLOAD {
        return Err(ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!(
                "at most {} KeyPackages per upload",
                limits::KEY_PACKAGES_PER_UPLOAD
            ),
        ));
    }
    let all = request
        .key_packages
        .iter()
        .chain(request.last_resort.iter());
    for package in all {
        if package.is_empty() || package.len() > limits::KEY_PACKAGE_MAX_BYTES {
            return Err(ApiError::new(
                ErrorCode::PayloadTooLarge,
                format!(
                    "a KeyPackage must be 1 to {} bytes",
                    limits::KEY_PACKAGE_MAX_BYTES
                ),
            ));
        }
    }
    let one_time: Vec<Vec<u8>> = request
        .key_packages
        .into_iter()
        .map(Bytes64::into_inner)
        .collect();
    let count = state
        .store
        .add_key_packages(
            device.device_id,
            &one_time,
            request.last_resort.as_ref().map(AsRef::as_ref),
            limits::KEY_PACKAGES_PER_DEVICE,
        )
        .await?;
    Ok(count_response(count))
}

/// Counts the calling device's KeyPackages on the server.
#[utoipa::path(
    get,
    path = "/v1/keypackages",
    tag = "keypackages",
    operation_id = "count_key_packages",
    security(("bearerAuth" = [])),
    responses(
        (status = 200, description = "The device's KeyPackages.", body = KeyPackageCountResponse),
        (status = 401, description = "`unauthorized`: missing, invalid or expired bearer token.", body = ErrorBody),
    )
)]
pub async fn count(
    State(state): State<AppState>,
    AuthDevice(device): AuthDevice,
) -> Result<Json<KeyPackageCountResponse>, ApiError> {
    Ok(count_response(
        state.store.key_package_count(device.device_id).await?,
    ))
}

/// Claims one KeyPackage per device of a user: a one-time one (deleted), else the
/// last-resort one (kept).
#[utoipa::path(
    post,
    path = "/v1/users/{username}/keypackages/claim",
    tag = "keypackages",
    operation_id = "claim_user_key_packages",
    security(("bearerAuth" = [])),
    params(("username" = String, Path, pattern = "^[a-z0-9_.]{3,32}$")),
    responses(
        (status = 200, description = "One KeyPackage per device.", body = ClaimKeyPackagesResponse),
        (status = 400, description = "`invalid_username`.", body = ErrorBody),
        (status = 401, description = "`unauthorized`: missing, invalid or expired bearer token.", body = ErrorBody),
        (status = 404, description = "`user_not_found` or `no_key_packages`.", body = ErrorBody),
        (status = 429, description = "`rate_limited`: too many KeyPackage claims by this account \
            (or requests from this address or account); retry after `Retry-After` seconds.", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying."))),
    )
)]
pub async fn claim(
    State(state): State<AppState>,
    AuthDevice(caller): AuthDevice,
    ApiPath(username): ApiPath<String>,
) -> Result<Json<ClaimKeyPackagesResponse>, ApiError> {
    state.rate_limits.check_claim(&caller.username)?;
    let account = existing_account(&state, &username).await?;
    let claimed = state.store.claim_key_packages(&username).await?;
    #[cfg(feature = "adversarial")]
    if let Some(forged) = crate::adversary::forged_claim(&state, &username) {
        return Ok(Json(ClaimKeyPackagesResponse {
            username,
            account_key: Bytes64(account.account_key),
            key_packages: vec![forged],
        }));
    }
    Ok(Json(ClaimKeyPackagesResponse {
        username,
        account_key: Bytes64(account.account_key),
        key_packages: claimed
            .into_iter()
            .map(|(device, package)| ClaimedKeyPackage {
                device_id: device.device_id,
                certificate: Bytes64(device.certificate),
                key_package: Bytes64(package),
            })
            .collect(),
    }))
}
