//! The storage conformance suite: behaviour every [`Store`] backend must have.
//!
//! Each backend's tests call [`run_all`] on a fresh, empty store; a new backend is done
//! when the whole suite passes on it.
// Test code: a failed expectation must stop the test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use sealpost_proto::api::EnvelopeKind;
use uuid::Uuid;

use super::{
    AccountRecord, DeviceRecord, LinkRecord, LinkState, SequenceRequest, Store, StoreError,
};

const NOW: i64 = 1_800_000_000;

fn device(username: &str) -> DeviceRecord {
    DeviceRecord {
        device_id: Uuid::new_v4(),
        username: username.into(),
        signature_key: vec![1; 32],
        certificate: vec![2; 150],
        created_day: NOW / 86_400,
        name_sealed: None,
    }
}

async fn account(store: &dyn Store, username: &str) -> DeviceRecord {
    let first = device(username);
    store
        .create_account(
            &AccountRecord {
                username: username.into(),
                account_key: vec![3; 32],
                created_day: NOW / 86_400,
                last_seen_day: NOW / 86_400,
            },
            &first,
        )
        .await
        .unwrap();
    first
}

fn request(
    group: &str,
    sender: Uuid,
    kind: EnvelopeKind,
    epoch: u64,
    payload: &[u8],
) -> SequenceRequest {
    SequenceRequest {
        group_id: group.into(),
        sender_device: sender,
        message_id: Uuid::new_v4(),
        kind,
        epoch,
        mailbox_quota: u64::MAX,
        payload: payload.to_vec(),
        welcome: None,
        added_devices: Vec::new(),
        removed_devices: Vec::new(),
        leaving_devices: Vec::new(),
        now: NOW,
        expires_at: NOW + 30 * 86_400,
    }
}

/// Runs every check on an empty store.
pub async fn run_all(store: &dyn Store) {
    accounts_are_unique(store).await;
    challenges_work_once_and_expire(store).await;
    tokens_expire(store).await;
    key_packages_fall_back_to_last_resort(store).await;
    commits_are_sequenced_by_epoch(store).await;
    mailboxes_deliver_in_order_until_acknowledged(store).await;
    undelivered_messages_expire(store).await;
    devices_are_added_renamed_and_revoked(store).await;
    mailbox_quota_refuses_application_messages_only(store).await;
    link_sessions_are_single_use_and_burn_after_wrong_proofs(store).await;
}

async fn devices_are_added_renamed_and_revoked(store: &dyn Store) {
    let first = account(store, "multi").await;
    let second = device("multi");
    store.add_device(&second, 2).await.unwrap();
    assert!(matches!(
        store.add_device(&device("multi"), 2).await,
        Err(StoreError::LimitExceeded(_))
    ));
    assert!(matches!(
        store.add_device(&second, 5).await,
        Err(StoreError::DeviceExists)
    ));
    store
        .set_device_name(second.device_id, b"sealed")
        .await
        .unwrap();
    let listed = store.devices_of("multi").await.unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(
        listed
            .iter()
            .find(|d| d.device_id == second.device_id)
            .unwrap()
            .name_sealed,
        Some(b"sealed".to_vec())
    );

    // Revocation: token, KeyPackages, memberships and mailbox go with the device.
    store
        .insert_token(b"multi-token", second.device_id, NOW + 100)
        .await
        .unwrap();
    store
        .add_key_packages(second.device_id, &[b"kp".to_vec()], None, 10)
        .await
        .unwrap();
    let group = "ee".repeat(16);
    store.create_group(&group, first.device_id).await.unwrap();
    let mut add = request(&group, first.device_id, EnvelopeKind::Commit, 0, b"add");
    add.added_devices = vec![second.device_id];
    add.welcome = Some(b"w".to_vec());
    store.sequence(add).await.unwrap();
    store.remove_device(second.device_id).await.unwrap();
    assert!(
        store
            .device_for_token(b"multi-token", NOW)
            .await
            .unwrap()
            .is_none()
    );
    assert!(store.device(second.device_id).await.unwrap().is_none());
    assert_eq!(
        store.group(&group).await.unwrap().unwrap().members,
        vec![first.device_id]
    );
    assert!(
        store
            .fetch_mailbox(second.device_id, 10)
            .await
            .unwrap()
            .0
            .is_empty()
    );

    // Deleting the account frees the username.
    store.delete_account("multi").await.unwrap();
    assert!(store.account("multi").await.unwrap().is_none());
    assert!(store.devices_of("multi").await.unwrap().is_empty());
    account(store, "multi").await;
}

async fn link_sessions_are_single_use_and_burn_after_wrong_proofs(store: &dyn Store) {
    let owner = account(store, "linker").await;
    let session = |id: &[u8], expires_at| LinkRecord {
        link_id: id.to_vec(),
        owner_device: owner.device_id,
        verifier: vec![9; 32],
        expires_at,
        failed_attempts: 0,
        state: LinkState::Open,
        sealed_request: None,
        sealed_response: None,
    };
    store
        .create_link(&session(b"link-1", NOW + 600))
        .await
        .unwrap();
    assert!(
        store
            .create_link(&session(b"link-1", NOW + 600))
            .await
            .is_err()
    );
    assert!(store.link(b"link-1", NOW + 599).await.unwrap().is_some());
    assert!(store.link(b"link-1", NOW + 600).await.unwrap().is_none());

    // Wrong proofs: the fifth destroys the session.
    for attempt in 1..=4 {
        assert!(
            !store.link_failed_attempt(b"link-1", 5).await.unwrap(),
            "{attempt}"
        );
    }
    assert_eq!(
        store
            .link(b"link-1", NOW)
            .await
            .unwrap()
            .unwrap()
            .failed_attempts,
        4
    );
    assert!(store.link_failed_attempt(b"link-1", 5).await.unwrap());
    assert!(store.link(b"link-1", NOW).await.unwrap().is_none());

    // A complete run, each step once.
    store
        .create_link(&session(b"link-2", NOW + 600))
        .await
        .unwrap();
    let new_device = device("linker");
    assert!(matches!(
        store
            .link_complete(b"link-2", &new_device, b"resp", 16)
            .await,
        Err(StoreError::LinkInvalid)
    ));
    store.link_join(b"link-2", b"req").await.unwrap();
    assert!(matches!(
        store.link_join(b"link-2", b"again").await,
        Err(StoreError::LinkInvalid)
    ));
    let joined = store.link(b"link-2", NOW).await.unwrap().unwrap();
    assert_eq!(
        (joined.state, joined.sealed_request),
        (LinkState::Joined, Some(b"req".to_vec()))
    );
    assert_eq!(store.link_take_result(b"link-2").await.unwrap(), None);
    store
        .link_complete(b"link-2", &new_device, b"resp", 16)
        .await
        .unwrap();
    assert!(store.device(new_device.device_id).await.unwrap().is_some());
    assert_eq!(
        store.link_take_result(b"link-2").await.unwrap(),
        Some(b"resp".to_vec())
    );
    assert_eq!(store.link_take_result(b"link-2").await.unwrap(), None);
    assert!(store.link(b"link-2", NOW).await.unwrap().is_none());
}

async fn accounts_are_unique(store: &dyn Store) {
    let first = account(store, "unique").await;
    let again = store
        .create_account(
            &AccountRecord {
                username: "unique".into(),
                account_key: vec![4; 32],
                created_day: 0,
                last_seen_day: 0,
            },
            &device("unique"),
        )
        .await;
    assert!(matches!(again, Err(StoreError::UsernameTaken)));
    let mut clash = first.clone();
    clash.username = "other".into();
    let clash_result = store
        .create_account(
            &AccountRecord {
                username: "other".into(),
                account_key: vec![4; 32],
                created_day: 0,
                last_seen_day: 0,
            },
            &clash,
        )
        .await;
    assert!(matches!(clash_result, Err(StoreError::DeviceExists)));
    // A failed registration leaves nothing behind.
    assert!(store.account("other").await.unwrap().is_none());
    assert_eq!(
        store.devices_of("unique").await.unwrap(),
        vec![first.clone()]
    );
    assert_eq!(store.device(first.device_id).await.unwrap(), Some(first));
}

async fn challenges_work_once_and_expire(store: &dyn Store) {
    let dev = account(store, "challenged").await;
    let id = Uuid::new_v4();
    store
        .create_challenge(id, dev.device_id, b"nonce", NOW + 60)
        .await
        .unwrap();
    let taken = store.take_challenge(id, NOW).await.unwrap();
    assert_eq!(taken, Some((dev.device_id, b"nonce".to_vec())));
    assert_eq!(store.take_challenge(id, NOW).await.unwrap(), None);
    let late = Uuid::new_v4();
    store
        .create_challenge(late, dev.device_id, b"n", NOW + 60)
        .await
        .unwrap();
    assert_eq!(store.take_challenge(late, NOW + 61).await.unwrap(), None);
}

async fn tokens_expire(store: &dyn Store) {
    let dev = account(store, "tokened").await;
    store
        .insert_token(b"hash-1", dev.device_id, NOW + 10)
        .await
        .unwrap();
    assert_eq!(
        store
            .device_for_token(b"hash-1", NOW)
            .await
            .unwrap()
            .map(|d| d.device_id),
        Some(dev.device_id)
    );
    assert!(
        store
            .device_for_token(b"hash-1", NOW + 11)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        store
            .device_for_token(b"unknown", NOW)
            .await
            .unwrap()
            .is_none()
    );
}

async fn key_packages_fall_back_to_last_resort(store: &dyn Store) {
    let dev = account(store, "packaged").await;
    assert!(matches!(
        store.claim_key_packages("packaged").await,
        Err(StoreError::NoKeyPackages(id)) if id == dev.device_id
    ));
    let count = store
        .add_key_packages(
            dev.device_id,
            &[b"kp1".to_vec(), b"kp2".to_vec()],
            Some(b"last"),
            3,
        )
        .await
        .unwrap();
    assert_eq!((count.one_time, count.last_resort), (2, true));
    let too_many = store
        .add_key_packages(dev.device_id, &[b"a".to_vec(), b"b".to_vec()], None, 3)
        .await;
    assert!(matches!(too_many, Err(StoreError::LimitExceeded(_))));
    let mut claimed = Vec::new();
    for _ in 0..4 {
        let claim = store.claim_key_packages("packaged").await.unwrap();
        assert_eq!(claim.len(), 1);
        claimed.push(claim[0].1.clone());
    }
    assert_eq!(
        claimed,
        [
            b"kp1".to_vec(),
            b"kp2".to_vec(),
            b"last".to_vec(),
            b"last".to_vec()
        ]
    );
    let count = store.key_package_count(dev.device_id).await.unwrap();
    assert_eq!((count.one_time, count.last_resort), (0, true));
}

async fn commits_are_sequenced_by_epoch(store: &dyn Store) {
    let a = account(store, "seq_a").await.device_id;
    let b = account(store, "seq_b").await.device_id;
    let c = account(store, "seq_c").await.device_id;
    let group = "aa".repeat(16);
    store.create_group(&group, a).await.unwrap();
    assert!(matches!(
        store.create_group(&group, b).await,
        Err(StoreError::GroupExists)
    ));

    // A non-member cannot post; an add needs a Welcome.
    let outsider = store
        .sequence(request(&group, b, EnvelopeKind::Application, 0, b"x"))
        .await;
    assert!(matches!(outsider, Err(StoreError::NotAMember)));
    let mut add = request(&group, a, EnvelopeKind::Commit, 0, b"commit-1");
    add.added_devices = vec![b, c];
    let no_welcome = store.sequence(add.clone()).await;
    assert!(matches!(no_welcome, Err(StoreError::Invalid(_))));
    add.welcome = Some(b"welcome-1".to_vec());
    let first = store.sequence(add.clone()).await.unwrap();
    assert_eq!((first.response.group_seq, first.response.epoch), (1, 1));
    let mut recipients = first.recipients();
    recipients.sort();
    let mut expected = vec![b, c];
    expected.sort();
    assert_eq!(recipients, expected);

    // A resend is answered with the first result and delivers nothing again; the same id
    // with other bytes is refused.
    let resent = store.sequence(add.clone()).await.unwrap();
    assert_eq!(resent.response, first.response);
    assert!(resent.deliveries.is_empty());
    let mut tampered = add.clone();
    tampered.payload = b"other".to_vec();
    assert!(matches!(
        store.sequence(tampered).await,
        Err(StoreError::DuplicateMessageId)
    ));

    // Two commits for epoch 1: the first wins, the second gets the current epoch.
    let winner = store
        .sequence(request(&group, b, EnvelopeKind::Commit, 1, b"c2"))
        .await
        .unwrap();
    assert_eq!(winner.response.epoch, 2);
    let loser = store
        .sequence(request(&group, c, EnvelopeKind::Commit, 1, b"c3"))
        .await;
    assert!(matches!(
        loser,
        Err(StoreError::EpochConflict { current: 2 })
    ));
    let stale = store
        .sequence(request(&group, c, EnvelopeKind::Application, 1, b"m"))
        .await;
    assert!(matches!(
        stale,
        Err(StoreError::EpochConflict { current: 2 })
    ));

    // Removal: the removed device gets the commit but nothing after it.
    let mut remove = request(&group, a, EnvelopeKind::Commit, 2, b"remove-c");
    remove.removed_devices = vec![c];
    let removed = store.sequence(remove).await.unwrap();
    assert!(removed.recipients().contains(&c));
    let after = store
        .sequence(request(&group, a, EnvelopeKind::Application, 3, b"after"))
        .await
        .unwrap();
    assert_eq!(after.recipients(), vec![b]);
    assert!(matches!(
        store
            .sequence(request(&group, c, EnvelopeKind::Application, 3, b"x"))
            .await,
        Err(StoreError::NotAMember)
    ));

    // Leaving by proposal takes the device out of delivery at once.
    let mut leave = request(&group, b, EnvelopeKind::Proposal, 3, b"leave");
    leave.leaving_devices = vec![b];
    store.sequence(leave).await.unwrap();
    let state = store.group(&group).await.unwrap().unwrap();
    assert_eq!((state.epoch, state.members), (3, vec![a]));
}

async fn mailboxes_deliver_in_order_until_acknowledged(store: &dyn Store) {
    let a = account(store, "mail_a").await.device_id;
    let b = account(store, "mail_b").await.device_id;
    let group = "bb".repeat(16);
    store.create_group(&group, a).await.unwrap();
    let mut add = request(&group, a, EnvelopeKind::Commit, 0, b"add-b");
    add.added_devices = vec![b];
    add.welcome = Some(b"welcome".to_vec());
    store.sequence(add).await.unwrap();
    for i in 0..5u8 {
        store
            .sequence(request(&group, a, EnvelopeKind::Application, 1, &[i]))
            .await
            .unwrap();
    }
    let (first, more) = store.fetch_mailbox(b, 3).await.unwrap();
    assert!(more);
    assert_eq!(first[0].kind, EnvelopeKind::Welcome);
    assert_eq!(first[0].payload.as_ref(), b"welcome");
    let (all, more) = store.fetch_mailbox(b, 100).await.unwrap();
    assert!(!more);
    assert_eq!(all.len(), 6);
    let seqs: Vec<u64> = all.iter().map(|e| e.group_seq).collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5, 6]);
    // Another device cannot acknowledge b's mail.
    assert_eq!(store.ack(a, &[all[0].id]).await.unwrap(), 0);
    let ids: Vec<u64> = all.iter().take(4).map(|e| e.id).collect();
    assert_eq!(store.ack(b, &ids).await.unwrap(), 4);
    assert_eq!(store.ack(b, &ids).await.unwrap(), 0);
    let (rest, _) = store.fetch_mailbox(b, 100).await.unwrap();
    assert_eq!(rest, all[4..].to_vec());
    assert!(store.fetch_mailbox(a, 100).await.unwrap().0.is_empty());
}

async fn undelivered_messages_expire(store: &dyn Store) {
    let a = account(store, "exp_a").await.device_id;
    let b = account(store, "exp_b").await.device_id;
    let group = "cc".repeat(16);
    store.create_group(&group, a).await.unwrap();
    let mut add = request(&group, a, EnvelopeKind::Commit, 0, b"add");
    add.added_devices = vec![b];
    add.welcome = Some(b"w".to_vec());
    add.expires_at = NOW + 10;
    store.sequence(add).await.unwrap();
    let mut fresh = request(&group, a, EnvelopeKind::Application, 1, b"fresh");
    fresh.expires_at = NOW + 1_000;
    store.sequence(fresh).await.unwrap();
    // b has the Welcome (expiring) and the fresh message.
    assert_eq!(store.fetch_mailbox(b, 100).await.unwrap().0.len(), 2);
    assert_eq!(store.expire(NOW + 11).await.unwrap(), 1);
    let (left, _) = store.fetch_mailbox(b, 100).await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].payload.as_ref(), b"fresh");
}

async fn mailbox_quota_refuses_application_messages_only(store: &dyn Store) {
    let a = account(store, "quota_a").await.device_id;
    let b = account(store, "quota_b").await.device_id;
    let group = "ff".repeat(16);
    store.create_group(&group, a).await.unwrap();
    let mut add = request(&group, a, EnvelopeKind::Commit, 0, b"add");
    add.added_devices = vec![b];
    add.welcome = Some(b"w".to_vec());
    add.mailbox_quota = 1;
    store.sequence(add).await.unwrap();
    // b holds the Welcome: one envelope, the quota.
    let mut full = request(&group, a, EnvelopeKind::Application, 1, b"m");
    full.mailbox_quota = 1;
    assert!(matches!(
        store.sequence(full.clone()).await,
        Err(StoreError::MailboxFull)
    ));
    let mut commit = request(&group, a, EnvelopeKind::Commit, 1, b"c");
    commit.mailbox_quota = 1;
    store.sequence(commit).await.unwrap();
    // Acknowledging makes room again.
    let ids: Vec<u64> = store
        .fetch_mailbox(b, 10)
        .await
        .unwrap()
        .0
        .iter()
        .map(|e| e.id)
        .collect();
    store.ack(b, &ids).await.unwrap();
    let mut room = request(&group, a, EnvelopeKind::Application, 2, b"m2");
    room.mailbox_quota = 1;
    store.sequence(room).await.unwrap();
}
