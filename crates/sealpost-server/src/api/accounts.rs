//! Registration, challenge-response login, and account lookups.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use ed25519_dalek::{Signature, VerifyingKey};
use rand::RngCore as _;
use sealpost_proto::api::{
    ChallengeRequest, ChallengeResponse, DeviceInfo, LoginRequest, LoginResponse, RegisterRequest,
    RegisterResponse, UserDevicesResponse, WhoAmIResponse, login_signed_bytes,
};
use sealpost_proto::certificate::DeviceCertificate;
use sealpost_proto::names::validate_username;
use sealpost_proto::{Bytes64, ErrorBody, ErrorCode, limits};
use sha2::{Digest as _, Sha256};
use uuid::Uuid;

use super::{ApiJson, ApiPath, AppState, AuthDevice, existing_account};
use crate::clock;
use crate::error::ApiError;
use crate::store::{AccountRecord, DeviceRecord};

fn verifying_key(bytes: &[u8], what: &str) -> Result<VerifyingKey, ApiError> {
    let bytes: [u8; 32] = bytes
        .try_into()
        .map_err(|_| ApiError::bad_request(format!("{what} must be 32 bytes")))?;
    VerifyingKey::from_bytes(&bytes)
        .map_err(|_| ApiError::bad_request(format!("{what} is not a valid Ed25519 key")))
}

/// Decodes a device certificate and checks it against the account key.
pub(crate) fn verify_certificate(
    bytes: &[u8],
    username: &str,
    account_key: &VerifyingKey,
) -> Result<DeviceCertificate, ApiError> {
    let invalid = |why: &str| ApiError::new(ErrorCode::InvalidCertificate, why);
    if bytes.len() > limits::CERTIFICATE_MAX_BYTES {
        return Err(invalid("device certificate is too large"));
    }
    let cert = DeviceCertificate::decode(bytes).map_err(|e| invalid(&e.to_string()))?;
    if cert.username != username {
        return Err(invalid("device certificate names another user"));
    }
    if cert.account_key != account_key.to_bytes() {
        return Err(invalid("device certificate names another account key"));
    }
    VerifyingKey::from_bytes(&cert.device_key)
        .map_err(|_| invalid("device key is not a valid Ed25519 key"))?;
    account_key
        .verify_strict(
            &cert.to_be_signed(),
            &Signature::from_bytes(&cert.signature),
        )
        .map_err(|_| invalid("device certificate signature does not verify"))?;
    Ok(cert)
}

/// Registers an account and its first device; the server verifies the certificate.
#[utoipa::path(
    post,
    path = "/v1/accounts",
    tag = "accounts",
    operation_id = "register",
    request_body = RegisterRequest,
    responses(
        (status = 201, description = "Registered.", body = RegisterResponse),
        (status = 400, description = "`invalid_username`, `invalid_certificate`, or \
            `bad_request`: the account key is not an Ed25519 key, or the body is not JSON \
            (or lacks `Content-Type: application/json`) or has wrong, unknown or missing \
            fields.", body = ErrorBody),
        (status = 409, description = "`username_taken` or `device_exists`.", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: the body is over 256 KiB.", body = ErrorBody),
    )
)]
pub async fn register(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<RegisterRequest>,
) -> Result<(StatusCode, Json<RegisterResponse>), ApiError> {
    validate_username(&request.username)
        .map_err(|e| ApiError::new(ErrorCode::InvalidUsername, e.to_string()))?;
    let account_key = verifying_key(request.account_key.as_ref(), "account_key")?;
    let cert = verify_certificate(
        request.device_certificate.as_ref(),
        &request.username,
        &account_key,
    )?;
    let today = clock::today();
    state
        .store
        .create_account(
            &AccountRecord {
                username: request.username.clone(),
                account_key: account_key.to_bytes().to_vec(),
                created_day: today,
                last_seen_day: today,
            },
            &DeviceRecord {
                device_id: cert.device_id,
                username: request.username.clone(),
                signature_key: cert.device_key.to_vec(),
                certificate: request.device_certificate.into_inner(),
                created_day: today,
                name_sealed: None,
            },
        )
        .await?;
    tracing::info!("account registered");
    Ok((
        StatusCode::CREATED,
        Json(RegisterResponse {
            username: request.username,
            device_id: cert.device_id,
        }),
    ))
}

/// Asks for a login challenge for a device (valid for 60 s).
#[utoipa::path(
    post,
    path = "/v1/auth/challenge",
    tag = "accounts",
    operation_id = "login_challenge",
    request_body = ChallengeRequest,
    responses(
        (status = 200, description = "A challenge to sign.", body = ChallengeResponse),
        (status = 400, description = "`bad_request`: the body is not JSON (or lacks \
            `Content-Type: application/json`) or has wrong, unknown or missing fields.", body = ErrorBody),
        (status = 404, description = "`device_not_found`.", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: the body is over 256 KiB.", body = ErrorBody),
    )
)]
pub async fn challenge(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<ChallengeRequest>,
) -> Result<Json<ChallengeResponse>, ApiError> {
    if state.store.device(request.device_id).await?.is_none() {
        return Err(ApiError::new(ErrorCode::DeviceNotFound, "unknown device"));
    }
    let mut nonce = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let challenge_id = Uuid::new_v4();
    let ttl = state.config.challenge_ttl.as_secs();
    state
        .store
        .create_challenge(
            challenge_id,
            request.device_id,
            &nonce,
            clock::now_unix() + ttl as i64,
        )
        .await?;
    Ok(Json(ChallengeResponse {
        challenge_id,
        nonce: Bytes64(nonce.to_vec()),
        expires_in_secs: ttl,
    }))
}

/// Answers a challenge with the device key's signature over `"sealpost login v1" |
/// device_id | nonce` and gets a bearer token (valid for 7 days). A challenge works once.
#[utoipa::path(
    post,
    path = "/v1/auth/login",
    tag = "accounts",
    operation_id = "login",
    request_body = LoginRequest,
    responses(
        (status = 200, description = "Logged in.", body = LoginResponse),
        (status = 400, description = "`bad_request`: the body is not JSON (or lacks \
            `Content-Type: application/json`) or has wrong, unknown or missing fields.", body = ErrorBody),
        (status = 401, description = "`challenge_invalid` (unknown, expired or used) or \
            `invalid_signature`.", body = ErrorBody),
        (status = 404, description = "`device_not_found`: the device was removed.", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: the body is over 256 KiB.", body = ErrorBody),
    )
)]
pub async fn login(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<LoginRequest>,
) -> Result<Json<LoginResponse>, ApiError> {
    let (device_id, nonce) = state
        .store
        .take_challenge(request.challenge_id, clock::now_unix())
        .await?
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::ChallengeInvalid,
                "the login challenge is unknown, expired or already used",
            )
        })?;
    let device = state
        .store
        .device(device_id)
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::DeviceNotFound, "unknown device"))?;
    let key = verifying_key(&device.signature_key, "device key")?;
    let signature: [u8; 64] =
        request.signature.as_ref().try_into().map_err(|_| {
            ApiError::new(ErrorCode::InvalidSignature, "signature must be 64 bytes")
        })?;
    key.verify_strict(
        &login_signed_bytes(&device_id, &nonce),
        &Signature::from_bytes(&signature),
    )
    .map_err(|_| {
        ApiError::new(
            ErrorCode::InvalidSignature,
            "login signature does not verify",
        )
    })?;

    let mut token = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut token);
    let token = Bytes64::encode(&token);
    let ttl = state.config.token_ttl.as_secs();
    state
        .store
        .insert_token(
            &Sha256::digest(token.as_bytes()),
            device_id,
            clock::now_unix() + ttl as i64,
        )
        .await?;
    state
        .store
        .touch_last_seen(&device.username, clock::today())
        .await?;
    Ok(Json(LoginResponse {
        token,
        expires_in_secs: ttl,
    }))
}

/// Who the bearer token belongs to.
#[utoipa::path(
    get,
    path = "/v1/me",
    tag = "accounts",
    operation_id = "whoami",
    security(("bearerAuth" = [])),
    responses(
        (status = 200, description = "The token's account and device.", body = WhoAmIResponse),
        (status = 401, description = "`unauthorized`: missing, invalid or expired bearer token.", body = ErrorBody),
    )
)]
pub async fn whoami(AuthDevice(device): AuthDevice) -> Json<WhoAmIResponse> {
    Json(WhoAmIResponse {
        username: device.username,
        device_id: device.device_id,
    })
}

/// An account's key and device certificates as the key directory published them, with
/// the lookup proof.
#[utoipa::path(
    get,
    path = "/v1/users/{username}",
    tag = "accounts",
    operation_id = "user_devices",
    security(("bearerAuth" = [])),
    params(("username" = String, Path, pattern = "^[a-z0-9_.]{3,32}$")),
    responses(
        (status = 200, description = "The account's published entry.", body = UserDevicesResponse),
        (status = 400, description = "`invalid_username`.", body = ErrorBody),
        (status = 401, description = "`unauthorized`: missing, invalid or expired bearer token.", body = ErrorBody),
        (status = 404, description = "`user_not_found`.", body = ErrorBody),
        (status = 409, description = "`kt_pending`: the key directory has not published the \
            account yet; retry in a few seconds.", body = ErrorBody),
    )
)]
pub async fn user_devices(
    State(state): State<AppState>,
    _auth: AuthDevice,
    ApiPath(username): ApiPath<String>,
) -> Result<Json<UserDevicesResponse>, ApiError> {
    let account = existing_account(&state, &username).await?;
    // Answer with exactly what the directory published, and its proof: devices added
    // since the last epoch appear once they are published.
    // A name deleted and registered again is another account: until the directory
    // publishes it, its entry is the old account's (or the deletion), which must not be
    // served as this account's; the client waits for `kt_pending`.
    let (kt, entry) = state
        .kt
        .lookup_current(&username, &account.account_key)
        .await?;
    let stored = state.store.devices_of(&username).await?;
    let devices = entry
        .devices
        .into_iter()
        .map(|(device_id, certificate)| {
            let record = stored.iter().find(|d| d.device_id == device_id);
            DeviceInfo {
                device_id,
                certificate: Bytes64(certificate),
                created: record
                    .map(|d| clock::format_day(d.created_day))
                    .unwrap_or_default(),
                name_sealed: record.and_then(|d| d.name_sealed.clone()).map(Bytes64),
            }
        })
        .collect();
    #[allow(unused_mut)]
    let mut response = UserDevicesResponse {
        kt,
        username,
        account_key: Bytes64(entry.account_key.to_vec()),
        devices,
    };
    #[cfg(feature = "adversarial")]
    if let Some((key, devices)) = state
        .tamper
        .lock()
        .ok()
        .and_then(|t| t.substitute_devices.get(&response.username).cloned())
    {
        response.account_key = Bytes64(key.to_vec());
        response.devices = devices
            .into_iter()
            .map(|(device_id, certificate)| DeviceInfo {
                device_id,
                certificate: Bytes64(certificate),
                created: String::new(),
                name_sealed: None,
            })
            .collect();
    }
    Ok(Json(response))
}

/// Deletes the caller's account and all its devices. The username becomes free again; a
/// new account under it has a new account key, which contacts see as a key change.
#[utoipa::path(
    delete,
    path = "/v1/accounts/me",
    tag = "accounts",
    operation_id = "delete_account",
    security(("bearerAuth" = [])),
    responses(
        (status = 204, description = "The account and all its devices are deleted."),
        (status = 401, description = "`unauthorized`: missing, invalid or expired bearer token.", body = ErrorBody),
    )
)]
pub async fn delete_account(
    State(state): State<AppState>,
    AuthDevice(device): AuthDevice,
) -> Result<StatusCode, ApiError> {
    state.store.delete_account(&device.username).await?;
    tracing::info!("account deleted");
    Ok(StatusCode::NO_CONTENT)
}
