//! KeyPackage upload, count and claim.

use axum::Json;
use axum::extract::{Path, State};
use sealpost_proto::api::{
    ClaimKeyPackagesResponse, ClaimedKeyPackage, KeyPackageCountResponse, UploadKeyPackagesRequest,
};
use sealpost_proto::{Bytes64, ErrorCode, limits};

use super::{ApiJson, AppState, AuthDevice, existing_account};
use crate::error::ApiError;
use crate::store::KeyPackageCount;

fn count_response(count: KeyPackageCount) -> Json<KeyPackageCountResponse> {
    Json(KeyPackageCountResponse {
        one_time: count.one_time,
        last_resort: count.last_resort,
    })
}

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

pub async fn count(
    State(state): State<AppState>,
    AuthDevice(device): AuthDevice,
) -> Result<Json<KeyPackageCountResponse>, ApiError> {
    Ok(count_response(
        state.store.key_package_count(device.device_id).await?,
    ))
}

pub async fn claim(
    State(state): State<AppState>,
    AuthDevice(caller): AuthDevice,
    Path(username): Path<String>,
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
