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
use axum::extract::{Path, State};
use axum::http::StatusCode;
use sealpost_proto::api::{
    CompleteLinkRequest, CreateLinkRequest, CreateLinkResponse, JoinLinkRequest, LinkResultRequest,
    LinkResultResponse, LinkStatusResponse, is_valid_link_id,
};
use sealpost_proto::{Bytes64, ErrorCode, limits};
use sha2::{Digest as _, Sha256};

use super::accounts::verify_certificate;
use super::{ApiJson, AppState, AuthDevice, existing_account};
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

pub async fn status(
    State(state): State<AppState>,
    AuthDevice(caller): AuthDevice,
    Path(link_id): Path<String>,
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

pub async fn join(
    State(state): State<AppState>,
    Path(link_id): Path<String>,
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

pub async fn complete(
    State(state): State<AppState>,
    AuthDevice(caller): AuthDevice,
    Path(link_id): Path<String>,
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

pub async fn result(
    State(state): State<AppState>,
    Path(link_id): Path<String>,
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
