//! Device linking: the server relays two sealed messages between an existing device (E)
//! and a new device (N) and registers N's certificate. It never sees the link code.
//!
//! 1. E: `POST /v1/links` with a link id and `verifier = SHA-256(K_auth)`, where `K_auth`
//!    is derived from the code. The session expires after 10 minutes.
//! 2. N: `POST /v1/links/{id}/join` with `proof = K_auth` and a request sealed for E.
//! 3. E: `GET /v1/links/{id}` until joined; opens the request, signs N's certificate, and
//!    `POST /v1/links/{id}/complete` with the certificate and a response sealed for N. The
//!    server verifies the certificate against the account key and registers N.
//! 4. N: `POST /v1/links/{id}/result` with the proof; gets the response; the session is
//!    deleted.
//!
//! Every wrong proof is counted and the session is destroyed after five, so a code (128
//! random bits) cannot be guessed through the server; a session is used once.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use sealpost_proto::api::{
    CompleteLinkRequest, CreateLinkRequest, CreateLinkResponse, JoinLinkRequest, LinkResultRequest,
    LinkResultResponse, LinkStatusResponse, is_valid_link_id,
};
use sealpost_proto::{Bytes64, ErrorBody, ErrorCode, limits};
use sha2::{Digest as _, Sha256};

use super::accounts::verify_certificate;
use super::{ApiJson, ApiPath, AppState, AuthDevice, existing_account};
use crate::clock;
use crate::error::ApiError;
use crate::store::{DeviceRecord, LinkRecord, LinkState};

fn link_id_bytes(link_id: &str) -> Result<Vec<u8>, ApiError> {
    if !is_valid_link_id(link_id) {
        return Err(ApiError::bad_request(
            "a link id is 16 lowercase hex characters",
        ));
    }
    hex::decode(link_id).map_err(|_| ApiError::bad_request("a link id is hex"))
}

fn invalid_link() -> ApiError {
    ApiError::new(
        ErrorCode::LinkInvalid,
        "the link code is unknown, expired or already used",
    )
}

fn check_sealed(sealed: &Bytes64) -> Result<(), ApiError> {
    if sealed.is_empty() || sealed.len() > limits::LINK_SEALED_MAX_BYTES {
        return Err(ApiError::new(
            ErrorCode::PayloadTooLarge,
            "a sealed link message is 1 to 4096 bytes",
        ));
    }
    Ok(())
}

/// Loads a live session and checks the new device's proof, counting failures.
async fn check_proof(
    state: &AppState,
    link_id: &[u8],
    proof: &[u8],
) -> Result<LinkRecord, ApiError> {
    let link = state
        .store
        .link(link_id, clock::now_unix())
        .await?
        .ok_or_else(invalid_link)?;
    let digest = Sha256::digest(proof);
    // Both sides are hashes of fixed length; comparing digests does not leak the proof.
    if digest.as_slice() != link.verifier.as_slice() {
        let burned = state
            .store
            .link_failed_attempt(link_id, limits::LINK_MAX_ATTEMPTS)
            .await?;
        tracing::warn!(burned, "wrong link proof");
        return Err(if burned {
            invalid_link()
        } else {
            ApiError::new(
                ErrorCode::LinkProofInvalid,
                "the link code does not match; check it and try again",
            )
        });
    }
    Ok(link)
}

/// The caller's own live session.
async fn owned_link(
    state: &AppState,
    caller: &DeviceRecord,
    link_id: &[u8],
) -> Result<LinkRecord, ApiError> {
    match state.store.link(link_id, clock::now_unix()).await? {
        Some(link) if link.owner_device == caller.device_id => Ok(link),
        _ => Err(invalid_link()),
    }
}

/// Opens a device-link session (kept for 10 minutes).
#[utoipa::path(
    post,
    path = "/v1/links",
    tag = "links",
    operation_id = "create_link",
    security(("bearerAuth" = [])),
    request_body = CreateLinkRequest,
    responses(
        (status = 201, description = "The session is open.", body = CreateLinkResponse),
        (status = 400, description = "`bad_request`: the link id is not 16 lowercase hex \
            characters or already in use, the verifier is not 32 bytes, or the body is not JSON (or lacks \
            `Content-Type: application/json`) or has wrong, unknown or missing fields." , body = ErrorBody),
        (status = 401, description = "`unauthorized`: missing, invalid or expired bearer token.", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: the body is over 256 KiB.", body = ErrorBody),
    )
)]
pub async fn create(
    State(state): State<AppState>,
    AuthDevice(caller): AuthDevice,
    ApiJson(request): ApiJson<CreateLinkRequest>,
) -> Result<(StatusCode, Json<CreateLinkResponse>), ApiError> {
    let link_id = link_id_bytes(&request.link_id)?;
    if request.verifier.len() != 32 {
        return Err(ApiError::bad_request("the verifier is 32 bytes"));
    }
    state
        .store
        .create_link(&LinkRecord {
            link_id,
            owner_device: caller.device_id,
            verifier: request.verifier.into_inner(),
            expires_at: clock::now_unix() + state.config.link_ttl.as_secs() as i64,
            failed_attempts: 0,
            state: LinkState::Open,
            sealed_request: None,
            sealed_response: None,
        })
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(CreateLinkResponse {
            expires_in_secs: state.config.link_ttl.as_secs(),
        }),
    ))
}

/// The state of one of the caller's link sessions, with the new device's sealed request
/// once it joined.
#[utoipa::path(
    get,
    path = "/v1/links/{link_id}",
    tag = "links",
    operation_id = "link_status",
    security(("bearerAuth" = [])),
    params(("link_id" = String, Path, pattern = "^[0-9a-f]{16}$")),
    responses(
        (status = 200, description = "The session's state.", body = LinkStatusResponse),
        (status = 400, description = "`bad_request`: the link id is not 16 lowercase hex \
            characters.", body = ErrorBody),
        (status = 401, description = "`unauthorized`: missing, invalid or expired bearer token.", body = ErrorBody),
        (status = 404, description = "`link_invalid`: no such live session of this device.", body = ErrorBody),
    )
)]
pub async fn status(
    State(state): State<AppState>,
    AuthDevice(caller): AuthDevice,
    ApiPath(link_id): ApiPath<String>,
) -> Result<Json<LinkStatusResponse>, ApiError> {
    let link = owned_link(&state, &caller, &link_id_bytes(&link_id)?).await?;
    let state_name = match link.state {
        LinkState::Open => "open",
        LinkState::Joined => "joined",
        LinkState::Completed => "completed",
    };
    Ok(Json(LinkStatusResponse {
        state: state_name.to_owned(),
        sealed_request: link.sealed_request.map(Bytes64),
    }))
}

/// The new device joins a session with the proof of the link code and its sealed request.
/// Needs no login. The fifth wrong proof destroys the session.
#[utoipa::path(
    post,
    path = "/v1/links/{link_id}/join",
    tag = "links",
    operation_id = "join_link",
    params(("link_id" = String, Path, pattern = "^[0-9a-f]{16}$")),
    request_body = JoinLinkRequest,
    responses(
        (status = 204, description = "Joined."),
        (status = 400, description = "`bad_request`: the link id is not 16 lowercase hex \
            characters, or the body is not JSON (or lacks \
            `Content-Type: application/json`) or has wrong, unknown or missing fields.", body = ErrorBody),
        (status = 401, description = "`link_proof_invalid`: the proof does not match.", body = ErrorBody),
        (status = 404, description = "`link_invalid`: unknown, expired, used, or destroyed \
            after too many wrong proofs.", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: the sealed request is empty or over \
            4,096 bytes, or the body is over 256 KiB.", body = ErrorBody),
    )
)]
pub async fn join(
    State(state): State<AppState>,
    ApiPath(link_id): ApiPath<String>,
    ApiJson(request): ApiJson<JoinLinkRequest>,
) -> Result<StatusCode, ApiError> {
    let link_id = link_id_bytes(&link_id)?;
    check_sealed(&request.sealed_request)?;
    check_proof(&state, &link_id, request.proof.as_ref()).await?;
    state
        .store
        .link_join(&link_id, request.sealed_request.as_ref())
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The existing device registers the new device's certificate and leaves a sealed
/// response for it.
#[utoipa::path(
    post,
    path = "/v1/links/{link_id}/complete",
    tag = "links",
    operation_id = "complete_link",
    security(("bearerAuth" = [])),
    params(("link_id" = String, Path, pattern = "^[0-9a-f]{16}$")),
    request_body = CompleteLinkRequest,
    responses(
        (status = 204, description = "The new device is registered."),
        (status = 400, description = "`invalid_certificate`, or `bad_request`: the link id is \
            not 16 lowercase hex characters, or the body is not JSON (or lacks \
            `Content-Type: application/json`) or has wrong, unknown or missing fields.", body = ErrorBody),
        (status = 401, description = "`unauthorized`: missing, invalid or expired bearer token.", body = ErrorBody),
        (status = 404, description = "`link_invalid`: no such session of this device, or the new \
            device has not joined.", body = ErrorBody),
        (status = 409, description = "`device_exists`.", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: the sealed response is empty or over \
            4,096 bytes, or the body is over 256 KiB.", body = ErrorBody),
        (status = 422, description = "`limit_exceeded`: the account has 16 devices.", body = ErrorBody),
    )
)]
pub async fn complete(
    State(state): State<AppState>,
    AuthDevice(caller): AuthDevice,
    ApiPath(link_id): ApiPath<String>,
    ApiJson(request): ApiJson<CompleteLinkRequest>,
) -> Result<StatusCode, ApiError> {
    let link_id = link_id_bytes(&link_id)?;
    check_sealed(&request.sealed_response)?;
    owned_link(&state, &caller, &link_id).await?;
    let account = existing_account(&state, &caller.username).await?;
    let account_key = ed25519_dalek::VerifyingKey::from_bytes(
        account
            .account_key
            .as_slice()
            .try_into()
            .map_err(|_| ApiError::internal(&"stored account key is not 32 bytes"))?,
    )
    .map_err(|_| ApiError::internal(&"stored account key is invalid"))?;
    let cert = verify_certificate(
        request.device_certificate.as_ref(),
        &caller.username,
        &account_key,
    )?;
    let device = DeviceRecord {
        device_id: cert.device_id,
        username: caller.username.clone(),
        signature_key: cert.device_key.to_vec(),
        certificate: request.device_certificate.into_inner(),
        created_day: clock::today(),
        name_sealed: None,
    };
    state
        .store
        .link_complete(
            &link_id,
            &device,
            request.sealed_response.as_ref(),
            limits::DEVICES_PER_ACCOUNT,
        )
        .await?;
    tracing::info!("device linked");
    Ok(StatusCode::NO_CONTENT)
}

/// The new device fetches the sealed response; the session is deleted. Needs no login.
#[utoipa::path(
    post,
    path = "/v1/links/{link_id}/result",
    tag = "links",
    operation_id = "link_result",
    params(("link_id" = String, Path, pattern = "^[0-9a-f]{16}$")),
    request_body = LinkResultRequest,
    responses(
        (status = 200, description = "The sealed response.", body = LinkResultResponse),
        (status = 400, description = "`bad_request`: the link id is not 16 lowercase hex \
            characters, or the body is not JSON (or lacks \
            `Content-Type: application/json`) or has wrong, unknown or missing fields.", body = ErrorBody),
        (status = 401, description = "`link_proof_invalid`: the proof does not match.", body = ErrorBody),
        (status = 404, description = "`link_invalid`: unknown, expired, used, or destroyed \
            after too many wrong proofs.", body = ErrorBody),
        (status = 409, description = "`link_pending`: the existing device has not answered yet.", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: the body is over 256 KiB.", body = ErrorBody),
    )
)]
pub async fn result(
    State(state): State<AppState>,
    ApiPath(link_id): ApiPath<String>,
    ApiJson(request): ApiJson<LinkResultRequest>,
) -> Result<Json<LinkResultResponse>, ApiError> {
    let link_id = link_id_bytes(&link_id)?;
    let link = check_proof(&state, &link_id, request.proof.as_ref()).await?;
    if link.state != LinkState::Completed {
        return Err(ApiError::new(
            ErrorCode::LinkPending,
            "the existing device has not answered yet",
        ));
    }
    let sealed = state
        .store
        .link_take_result(&link_id)
        .await?
        .ok_or_else(invalid_link)?;
    Ok(Json(LinkResultResponse {
        sealed_response: Bytes64(sealed),
    }))
}
