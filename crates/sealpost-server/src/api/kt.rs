//! Key-transparency endpoints: the KT keys, signed roots, lookup and history proofs, and
//! append-only proofs between epochs. They need no login: anyone may audit the directory.

use axum::Json;
use axum::extract::{Query, State};
use sealpost_proto::kt::{
    AuditResponse, EpochRange, HistoryResponse, KtKeysResponse, LookupEnvelope, RootsResponse,
    SignedRoot,
};
use sealpost_proto::names::validate_username;
use sealpost_proto::{ErrorBody, ErrorCode};

use super::{ApiPath, AppState};
use crate::error::ApiError;
use crate::kt::KtError;

/// Most roots in one answer.
const MAX_ROOTS: u64 = 1_000;
/// Most epochs one append-only proof may span.
const MAX_AUDIT_SPAN: u64 = 100;

impl From<KtError> for ApiError {
    fn from(err: KtError) -> Self {
        match err {
            KtError::NotPublished => ApiError::new(
                ErrorCode::KtPending,
                "the key directory has not published this account yet; retry in a few seconds",
            ),
            KtError::UnknownEpoch => ApiError::new(ErrorCode::NotFound, "no such epoch range"),
            KtError::Store(err) => err.into(),
            other => ApiError::internal(&other),
        }
    }
}

/// Epochs are SQLite integers: larger ones cannot exist and are a malformed request.
fn check_epochs(range: &EpochRange) -> Result<(), ApiError> {
    if i64::try_from(range.from).is_err() || i64::try_from(range.to).is_err() {
        return Err(ApiError::bad_request("an epoch is at most 2^63 - 1"));
    }
    Ok(())
}

fn check_username(username: &str) -> Result<(), ApiError> {
    validate_username(username)
        .map_err(|e| ApiError::new(ErrorCode::InvalidUsername, e.to_string()))
}

/// The server's key-transparency public keys, pinned by clients at registration.
#[utoipa::path(
    get,
    path = "/v1/kt/keys",
    tag = "kt",
    operation_id = "kt_keys",
    responses((status = 200, description = "The KT keys.", body = KtKeysResponse))
)]
pub async fn keys(State(state): State<AppState>) -> Json<KtKeysResponse> {
    Json(state.kt.keys())
}

/// The current signed root of the key directory.
#[utoipa::path(
    get,
    path = "/v1/kt/root",
    tag = "kt",
    operation_id = "kt_root",
    responses((status = 200, description = "The newest epoch's signed root.", body = SignedRoot))
)]
pub async fn root(State(state): State<AppState>) -> Result<Json<SignedRoot>, ApiError> {
    #[cfg(feature = "adversarial")]
    if let Some(epoch) = state.tamper.lock().ok().and_then(|t| t.rollback_to)
        && let Some(old) = state.kt.roots(epoch, epoch).await?.pop()
    {
        return Ok(Json(old));
    }
    Ok(Json(state.kt.root().await?))
}

/// Signed roots of the stored epochs in `from..=to` (at most 1,000 epochs).
#[utoipa::path(
    get,
    path = "/v1/kt/roots",
    tag = "kt",
    operation_id = "kt_roots",
    params(EpochRange),
    responses(
        (status = 200, description = "The roots in the range that exist, oldest first.", body = RootsResponse),
        (status = 400, description = "`bad_request`: `from` or `to` is missing or not an \
            integer from 0 to 2^63 - 1, `to < from`, or the range spans more than 1,000 epochs.", body = ErrorBody),
    )
)]
pub async fn roots(
    State(state): State<AppState>,
    query: Result<Query<EpochRange>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<RootsResponse>, ApiError> {
    let Query(range) = query?;
    check_epochs(&range)?;
    if range.to < range.from || range.to - range.from >= MAX_ROOTS {
        return Err(ApiError::bad_request(format!(
            "ask for 1 to {MAX_ROOTS} epochs, from <= to"
        )));
    }
    #[allow(unused_mut)]
    let mut roots = state.kt.roots(range.from, range.to).await?;
    #[cfg(feature = "adversarial")]
    forge_roots(&state, &mut roots);
    Ok(Json(RootsResponse { roots }))
}

/// A lookup proof for a username against the current root.
#[utoipa::path(
    get,
    path = "/v1/kt/lookup/{username}",
    tag = "kt",
    operation_id = "kt_lookup",
    params(("username" = String, Path, pattern = "^[a-z0-9_.]{3,32}$")),
    responses(
        (status = 200, description = "The proof.", body = LookupEnvelope),
        (status = 400, description = "`invalid_username`.", body = ErrorBody),
        (status = 409, description = "`kt_pending`: the username is not in the directory (not \
            yet published, or never registered).", body = ErrorBody),
    )
)]
pub async fn lookup(
    State(state): State<AppState>,
    ApiPath(username): ApiPath<String>,
) -> Result<Json<LookupEnvelope>, ApiError> {
    check_username(&username)?;
    Ok(Json(state.kt.lookup(&username).await?.0))
}

/// A username's complete key history against the current root.
#[utoipa::path(
    get,
    path = "/v1/kt/history/{username}",
    tag = "kt",
    operation_id = "kt_history",
    params(("username" = String, Path, pattern = "^[a-z0-9_.]{3,32}$")),
    responses(
        (status = 200, description = "The history proof.", body = HistoryResponse),
        (status = 400, description = "`invalid_username`.", body = ErrorBody),
        (status = 409, description = "`kt_pending`: the username is not in the directory (not \
            yet published, or never registered).", body = ErrorBody),
    )
)]
pub async fn history(
    State(state): State<AppState>,
    ApiPath(username): ApiPath<String>,
) -> Result<Json<HistoryResponse>, ApiError> {
    check_username(&username)?;
    Ok(Json(state.kt.history(&username).await?))
}

/// An append-only proof from epoch `from` to `to` (1 to 100 epochs), with the signed
/// roots of every epoch in between.
#[utoipa::path(
    get,
    path = "/v1/kt/audit",
    tag = "kt",
    operation_id = "kt_audit",
    params(EpochRange),
    responses(
        (status = 200, description = "The proof and roots.", body = AuditResponse),
        (status = 400, description = "`bad_request`: `from` or `to` is missing or not an \
            integer from 0 to 2^63 - 1, `to <= from`, or the range spans more than 100 epochs.", body = ErrorBody),
        (status = 404, description = "`not_found`: an epoch of the range does not exist.", body = ErrorBody),
    )
)]
pub async fn audit(
    State(state): State<AppState>,
    query: Result<Query<EpochRange>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<AuditResponse>, ApiError> {
    let Query(range) = query?;
    check_epochs(&range)?;
    if range.to <= range.from || range.to - range.from > MAX_AUDIT_SPAN {
        return Err(ApiError::bad_request(format!(
            "an audit spans 1 to {MAX_AUDIT_SPAN} epochs, from < to"
        )));
    }
    #[allow(unused_mut)]
    let mut response = state.kt.audit(range.from, range.to).await?;
    #[cfg(feature = "adversarial")]
    forge_roots(&state, &mut response.roots);
    Ok(Json(response))
}

/// A malicious server's forged roots, validly signed (tests only).
#[cfg(feature = "adversarial")]
fn forge_roots(state: &AppState, roots: &mut [SignedRoot]) {
    if let Ok(tamper) = state.tamper.lock() {
        for root in roots {
            if let Some(hash) = tamper.forged_roots.get(&root.epoch) {
                *root = state.kt.sign_forged_root(root.epoch, hash);
            }
        }
    }
}
