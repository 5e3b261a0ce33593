//! Group registration and sequencing of commits, proposals and application messages.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use sealpost_proto::api::{
    CreateGroupRequest, EnvelopeKind, GroupStateResponse, PostCommitRequest, PostMessageRequest,
    PostProposalRequest, SequencedResponse, is_valid_group_id,
};
use sealpost_proto::{ErrorBody, ErrorCode, limits};
use uuid::Uuid;

use super::{ApiJson, ApiPath, AppState, AuthDevice};
use crate::clock;
use crate::error::ApiError;
use crate::mls::{self, Expected};
use crate::store::{GroupState, SequenceRequest};

/// Validates a group id from the path and returns its raw bytes (the MLS group id).
fn group_id_bytes(group_id: &str) -> Result<Vec<u8>, ApiError> {
    if !is_valid_group_id(group_id) {
        return Err(ApiError::bad_request(
            "a group id is 32 lowercase hex characters",
        ));
    }
    hex::decode(group_id).map_err(|_| ApiError::bad_request("a group id is hex"))
}

fn too_large(what: &str, max: usize) -> ApiError {
    ApiError::new(
        ErrorCode::PayloadTooLarge,
        format!("{what} is larger than {max} bytes"),
    )
}

fn state_response(group: GroupState) -> Json<GroupStateResponse> {
    Json(GroupStateResponse {
        group_id: group.group_id,
        epoch: group.epoch,
        members: group.members,
    })
}

/// Registers a group at epoch 0 with the calling device as its only member.
#[utoipa::path(
    post,
    path = "/v1/groups",
    tag = "groups",
    operation_id = "create_group",
    security(("bearerAuth" = [])),
    request_body = CreateGroupRequest,
    responses(
        (status = 201, description = "The new group.", body = GroupStateResponse),
        (status = 400, description = "`bad_request`: the group id is not 32 lowercase hex \
            characters, or the body is not JSON (or lacks \
            `Content-Type: application/json`) or has wrong, unknown or missing fields.", body = ErrorBody),
        (status = 401, description = "`unauthorized`: missing, invalid or expired bearer token.", body = ErrorBody),
        (status = 409, description = "`group_exists`.", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: the body is over 256 KiB.", body = ErrorBody),
    )
)]
pub async fn create(
    State(state): State<AppState>,
    AuthDevice(device): AuthDevice,
    ApiJson(request): ApiJson<CreateGroupRequest>,
) -> Result<(StatusCode, Json<GroupStateResponse>), ApiError> {
    group_id_bytes(&request.group_id)?;
    let group = state
        .store
        .create_group(&request.group_id, device.device_id)
        .await?;
    Ok((StatusCode::CREATED, state_response(group)))
}

/// A group's epoch and member devices (members only).
#[utoipa::path(
    get,
    path = "/v1/groups/{group_id}",
    tag = "groups",
    operation_id = "group_state",
    security(("bearerAuth" = [])),
    params(("group_id" = String, Path, pattern = "^[0-9a-f]{32}$")),
    responses(
        (status = 200, description = "The group.", body = GroupStateResponse),
        (status = 400, description = "`bad_request`: the group id is not 32 lowercase hex \
            characters.", body = ErrorBody),
        (status = 401, description = "`unauthorized`: missing, invalid or expired bearer token.", body = ErrorBody),
        (status = 403, description = "`not_a_member`.", body = ErrorBody),
        (status = 404, description = "`group_not_found`.", body = ErrorBody),
    )
)]
pub async fn state(
    State(state): State<AppState>,
    AuthDevice(device): AuthDevice,
    ApiPath(group_id): ApiPath<String>,
) -> Result<Json<GroupStateResponse>, ApiError> {
    group_id_bytes(&group_id)?;
    let group = state
        .store
        .group(&group_id)
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::GroupNotFound, "no such group"))?;
    if !group.members.contains(&device.device_id) {
        return Err(ApiError::new(
            ErrorCode::NotAMember,
            "this device is not a member of the group",
        ));
    }
    Ok(state_response(group))
}

/// Stores a sequenced message for every recipient (the store hands it to their sockets).
async fn sequence(
    state: &AppState,
    request: SequenceRequest,
) -> Result<Json<SequencedResponse>, ApiError> {
    Ok(Json(queue(state, request).await?.await?))
}

/// Queues a request for sequencing now and returns the future of the answer: requests
/// queued one after the other are sequenced in that order (a socket's sends).
pub(super) async fn queue(
    state: &AppState,
    request: SequenceRequest,
) -> Result<impl Future<Output = Result<SequencedResponse, ApiError>> + Send + 'static, ApiError> {
    let kind = match request.kind {
        EnvelopeKind::Commit => "commit",
        EnvelopeKind::Proposal => "proposal",
        EnvelopeKind::Application => "application",
        EnvelopeKind::Welcome => "welcome",
    };
    let ticket = state.store.queue_sequence(request).await?;
    let metrics = state.metrics.clone();
    Ok(async move {
        let outcome = ticket.await?;
        metrics
            .messages_in
            .get_or_create(&crate::metrics::KindLabel { kind })
            .inc();
        // The store already handed the deliveries to the sockets, in mailbox order.
        Ok(outcome.response)
    })
}

fn new_request(
    state: &AppState,
    group_id: String,
    sender: Uuid,
    message_id: Uuid,
    kind: EnvelopeKind,
    epoch: u64,
    payload: Vec<u8>,
) -> SequenceRequest {
    let now = clock::now_unix();
    SequenceRequest {
        group_id,
        sender_device: sender,
        message_id,
        kind,
        epoch,
        payload,
        welcome: None,
        added_devices: Vec::new(),
        removed_devices: Vec::new(),
        leaving_devices: Vec::new(),
        mailbox_quota: state.config.limits.mailbox_quota,
        now,
        expires_at: now + state.config.mailbox_ttl.as_secs() as i64,
    }
}

/// Sequences a commit (MLS PublicMessage) for the group's current epoch: the first one
/// wins. `added_devices` get the Welcome; `removed_devices` get this commit and nothing
/// after it.
#[utoipa::path(
    post,
    path = "/v1/groups/{group_id}/commits",
    tag = "groups",
    operation_id = "post_commit",
    security(("bearerAuth" = [])),
    params(("group_id" = String, Path, pattern = "^[0-9a-f]{32}$")),
    request_body = PostCommitRequest,
    responses(
        (status = 200, description = "Sequenced and stored for every recipient.", body = SequencedResponse),
        (status = 400, description = "`invalid_message` (not an MLS commit of this group, or the Welcome does not parse), or `bad_request`: the group id is \
            not 32 lowercase hex characters, a Welcome is missing or superfluous, an added device is already a member, or the body is not JSON (or lacks \
            `Content-Type: application/json`) or has wrong, unknown or missing fields.", body = ErrorBody),
        (status = 401, description = "`unauthorized`: missing, invalid or expired bearer token.", body = ErrorBody),
        (status = 403, description = "`not_a_member`.", body = ErrorBody),
        (status = 404, description = "`group_not_found`, or `device_not_found`: an added device is unknown.", body = ErrorBody),
        (status = 409, description = "`epoch_conflict` (with `current_epoch`: process what you \
            missed and retry) or `duplicate_message_id`.", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: the commit is over 4 MiB, the Welcome \
            over 3 MiB, or the body over the route's limit (about 9.4 MB).", body = ErrorBody),
        (status = 422, description = "`limit_exceeded`: more than 2,000 devices added and removed.", body = ErrorBody),
    )
)]
pub async fn commit(
    State(state): State<AppState>,
    AuthDevice(device): AuthDevice,
    ApiPath(group_id): ApiPath<String>,
    ApiJson(request): ApiJson<PostCommitRequest>,
) -> Result<Json<SequencedResponse>, ApiError> {
    let raw_group = group_id_bytes(&group_id)?;
    if request.commit.len() > limits::COMMIT_MAX_BYTES {
        return Err(too_large("the commit", limits::COMMIT_MAX_BYTES));
    }
    if request.added_devices.len() + request.removed_devices.len() > limits::DEVICES_PER_COMMIT {
        return Err(ApiError::new(
            ErrorCode::LimitExceeded,
            "too many devices in one commit",
        ));
    }
    let epoch = mls::inspect(request.commit.as_ref(), Expected::Commit, &raw_group)?;
    if let Some(welcome) = &request.welcome {
        if welcome.len() > limits::WELCOME_MAX_BYTES {
            return Err(too_large("the Welcome", limits::WELCOME_MAX_BYTES));
        }
        mls::inspect_welcome(welcome.as_ref())?;
    }
    if request.welcome.is_some() == request.added_devices.is_empty() {
        return Err(ApiError::bad_request(
            "a Welcome is required exactly when devices are added",
        ));
    }
    #[allow(unused_mut)]
    let mut commit = request.commit.into_inner();
    #[cfg(feature = "adversarial")]
    if state.tamper.lock().is_ok_and(|t| t.corrupt_commits) {
        crate::adversary::corrupt(&mut commit);
    }
    let mut sequence_request = new_request(
        &state,
        group_id,
        device.device_id,
        request.message_id,
        EnvelopeKind::Commit,
        epoch,
        commit,
    );
    sequence_request.welcome = request.welcome.map(|w| w.into_inner());
    sequence_request.added_devices = request.added_devices;
    sequence_request.removed_devices = request.removed_devices;
    sequence(&state, sequence_request).await
}

/// Sequences one standalone proposal (MLS PublicMessage), used to leave a group; the
/// server stops delivering to `leaving_devices`.
#[utoipa::path(
    post,
    path = "/v1/groups/{group_id}/proposals",
    tag = "groups",
    operation_id = "post_proposal",
    security(("bearerAuth" = [])),
    params(("group_id" = String, Path, pattern = "^[0-9a-f]{32}$")),
    request_body = PostProposalRequest,
    responses(
        (status = 200, description = "Sequenced and stored for every recipient.", body = SequencedResponse),
        (status = 400, description = "`invalid_message` (not an MLS proposal of this group), or `bad_request`: the group id is \
            not 32 lowercase hex characters, not exactly one proposal, or the body is not JSON (or lacks \
            `Content-Type: application/json`) or has wrong, unknown or missing fields.", body = ErrorBody),
        (status = 401, description = "`unauthorized`: missing, invalid or expired bearer token.", body = ErrorBody),
        (status = 403, description = "`not_a_member`: the caller is not a member, or a leaving device is not of the caller's account.", body = ErrorBody),
        (status = 404, description = "`group_not_found`.", body = ErrorBody),
        (status = 409, description = "`epoch_conflict` (with `current_epoch`: process what you \
            missed and retry) or `duplicate_message_id`.", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: the proposal is over 64 KiB or the \
            body over 256 KiB.", body = ErrorBody),
    )
)]
pub async fn proposal(
    State(state): State<AppState>,
    AuthDevice(device): AuthDevice,
    ApiPath(group_id): ApiPath<String>,
    ApiJson(request): ApiJson<PostProposalRequest>,
) -> Result<Json<SequencedResponse>, ApiError> {
    let raw_group = group_id_bytes(&group_id)?;
    if request.proposals.len() != 1 {
        return Err(ApiError::bad_request("send exactly one proposal"));
    }
    let proposal = request.proposals.into_iter().next().unwrap_or_default();
    if proposal.len() > limits::PROPOSAL_MAX_BYTES {
        return Err(too_large("the proposal", limits::PROPOSAL_MAX_BYTES));
    }
    let epoch = mls::inspect(proposal.as_ref(), Expected::Proposal, &raw_group)?;
    // A device may only take devices of its own account out of delivery.
    for leaving in &request.leaving_devices {
        let owner = state.store.device(*leaving).await?;
        if owner.is_none_or(|owner| owner.username != device.username) {
            return Err(ApiError::new(
                ErrorCode::NotAMember,
                "only devices of your own account can leave",
            ));
        }
    }
    let mut sequence_request = new_request(
        &state,
        group_id,
        device.device_id,
        request.message_id,
        EnvelopeKind::Proposal,
        epoch,
        proposal.into_inner(),
    );
    sequence_request.leaving_devices = request.leaving_devices;
    sequence(&state, sequence_request).await
}

/// Sequences an application message (MLS PrivateMessage) for the group's current epoch.
#[utoipa::path(
    post,
    path = "/v1/groups/{group_id}/messages",
    tag = "groups",
    operation_id = "post_message",
    security(("bearerAuth" = [])),
    params(("group_id" = String, Path, pattern = "^[0-9a-f]{32}$")),
    request_body = PostMessageRequest,
    responses(
        (status = 200, description = "Sequenced and stored for every recipient.", body = SequencedResponse),
        (status = 400, description = "`invalid_message` (not an MLS application message of this group), or `bad_request`: the group id is \
            not 32 lowercase hex characters, or the body is not JSON (or lacks \
            `Content-Type: application/json`) or has wrong, unknown or missing fields.", body = ErrorBody),
        (status = 401, description = "`unauthorized`: missing, invalid or expired bearer token.", body = ErrorBody),
        (status = 403, description = "`not_a_member`.", body = ErrorBody),
        (status = 404, description = "`group_not_found`.", body = ErrorBody),
        (status = 409, description = "`epoch_conflict` (with `current_epoch`: process what you \
            missed and retry) or `duplicate_message_id`.", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: the message is over 64 KiB or the \
            body over 256 KiB.", body = ErrorBody),
        (status = 507, description = "`mailbox_full`: a recipient's mailbox is full.", body = ErrorBody),
    )
)]
pub async fn message(
    State(state): State<AppState>,
    AuthDevice(device): AuthDevice,
    ApiPath(group_id): ApiPath<String>,
    ApiJson(request): ApiJson<PostMessageRequest>,
) -> Result<Json<SequencedResponse>, ApiError> {
    let request = application_request(
        &state,
        device.device_id,
        group_id,
        request.message_id,
        request.message.into_inner(),
    )?;
    sequence(&state, request).await
}

/// Checks an application message (size, MLS framing, group) and makes its sequencing
/// request; shared by `POST /v1/groups/{id}/messages` and push-mode WebSocket sends.
pub(super) fn application_request(
    state: &AppState,
    sender: Uuid,
    group_id: String,
    message_id: Uuid,
    message: Vec<u8>,
) -> Result<SequenceRequest, ApiError> {
    let raw_group = group_id_bytes(&group_id)?;
    if message.len() > limits::APPLICATION_MESSAGE_MAX_BYTES {
        return Err(too_large(
            "the message",
            limits::APPLICATION_MESSAGE_MAX_BYTES,
        ));
    }
    let epoch = mls::inspect(&message, Expected::Application, &raw_group)?;
    Ok(new_request(
        state,
        group_id,
        sender,
        message_id,
        EnvelopeKind::Application,
        epoch,
        message,
    ))
}
