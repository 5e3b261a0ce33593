//! The batched inbound path (`Engine::process_batch`, used by the client's sync) and the
//! engine's in-memory group cache: every message is shown once and in order, the state
//! survives reopening, a failure mid-batch leaves nothing half-applied, and a group
//! changed by another connection is never used from a stale copy.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{NOW, User, World, message_envelope, start_direct, text_of_len};
use sealpost_core::engine::Engine;
use sealpost_core::{CoreError, HistoryEntry};
use sealpost_proto::api::Envelope;
use sealpost_proto::limits::MAILBOX_FETCH_MAX;

struct Chat {
    world: World,
    alice: User,
    bob: User,
    group_id: String,
    dir: tempfile::TempDir,
    sent: usize,
}

impl Chat {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut world = World::new();
        let mut alice = User::register(&mut world, &dir.path().join("alice.db"), "alice");
        let mut bob = User::register(&mut world, &dir.path().join("bob.db"), "bob");
        let group_id = start_direct(&world, &mut alice, &mut bob);
        // The Welcome's notice is not what these tests look at.
        bob.engine.take_unshown().unwrap();
        Self {
            world,
            alice,
            bob,
            group_id,
            dir,
            sent: 0,
        }
    }

    /// Alice sends `count` messages; returns what the server would deliver to Bob.
    fn send(&mut self, count: usize) -> Vec<Envelope> {
        (0..count)
            .map(|_| {
                self.sent += 1;
                let message = self
                    .alice
                    .engine
                    .encrypt_text(&self.group_id, &text(self.sent), None, NOW * 1000)
                    .unwrap();
                self.alice
                    .engine
                    .message_accepted(message.request.message_id)
                    .unwrap();
                message_envelope(&message, self.sent as u64)
            })
            .collect()
    }

    fn bob_db(&self) -> std::path::PathBuf {
        self.dir.path().join("bob.db")
    }
}

fn text(n: usize) -> String {
    text_of_len(n, 200)
}

fn texts(entries: &[HistoryEntry]) -> Vec<String> {
    entries
        .iter()
        .filter(|entry| entry.kind == "text")
        .map(|entry| entry.text.clone())
        .collect()
}

/// Processes envelopes page by page as the client's sync does; returns the acks.
fn sync(engine: &mut Engine, envelopes: &[Envelope]) -> Result<Vec<u64>, CoreError> {
    let mut acks = Vec::new();
    for page in envelopes.chunks(MAILBOX_FETCH_MAX) {
        acks.extend(engine.process_batch(page, NOW)?);
    }
    Ok(acks)
}

#[test]
fn a_backlog_is_shown_once_in_order_and_survives_reopening() {
    let mut chat = Chat::new();
    let backlog = chat.send(1_200);
    let acks = sync(&mut chat.bob.engine, &backlog).unwrap();
    assert_eq!(acks, backlog.iter().map(|e| e.id).collect::<Vec<_>>());
    let shown = chat.bob.engine.take_unshown().unwrap();
    assert_eq!(texts(&shown), (1..=1_200).map(text).collect::<Vec<_>>());
    assert!(shown.iter().all(|entry| entry.sender == "alice"));

    // Delivery is at least once: the same pages again are acknowledged, not shown again.
    let acks = sync(&mut chat.bob.engine, &backlog).unwrap();
    assert_eq!(acks.len(), backlog.len());
    assert!(chat.bob.engine.take_unshown().unwrap().is_empty());

    // A new process finds the history and the MLS state of the batches.
    let reopened = Engine::open(&chat.bob_db()).unwrap();
    let conversation = reopened.find_conversation("alice").unwrap();
    assert_eq!(
        texts(&reopened.history(&conversation, 10_000).unwrap()).len(),
        1_200
    );
    chat.bob.engine = reopened;
    let more = chat.send(3);
    sync(&mut chat.bob.engine, &more).unwrap();
    assert_eq!(
        texts(&chat.bob.engine.take_unshown().unwrap()),
        (1_201..=1_203).map(text).collect::<Vec<_>>()
    );
}

#[test]
fn a_local_failure_mid_batch_rolls_back_the_whole_batch() {
    let mut chat = Chat::new();
    let before = chat.send(10);
    sync(&mut chat.bob.engine, &before).unwrap();
    chat.bob.engine.take_unshown().unwrap();
    let batch = chat.send(100);

    // Make the store fail at the 60th message of the batch (as a full disk would),
    // through another connection, as another process could.
    let other = rusqlite::Connection::open(chat.bob_db()).unwrap();
    other
        .execute_batch(&format!(
            "CREATE TRIGGER fail BEFORE INSERT ON history WHEN NEW.text = '{}' \
             BEGIN SELECT RAISE(ABORT, 'injected failure'); END;",
            text(70)
        ))
        .unwrap();
    let err = chat.bob.engine.process_batch(&batch, NOW).unwrap_err();
    assert!(matches!(err, CoreError::Store(_)), "{err:?}");

    // Nothing of the batch was applied: no history, nothing marked processed.
    assert!(chat.bob.engine.take_unshown().unwrap().is_empty());
    let processed: i64 = other
        .query_row("SELECT COUNT(*) FROM processed", [], |row| row.get(0))
        .unwrap();
    assert_eq!(
        processed,
        1 + 10,
        "the Welcome and the first 10 messages only"
    );

    // Once the store works again, the same batch (redelivered, since it was not
    // acknowledged) applies in full: the MLS state was not advanced by the failed try.
    other.execute_batch("DROP TRIGGER fail").unwrap();
    let acks = chat.bob.engine.process_batch(&batch, NOW).unwrap();
    assert_eq!(acks.len(), 100);
    assert_eq!(
        texts(&chat.bob.engine.take_unshown().unwrap()),
        (11..=110).map(text).collect::<Vec<_>>()
    );
}

#[test]
fn a_bad_envelope_mid_batch_is_recorded_and_the_rest_applies() {
    let mut chat = Chat::new();
    let mut batch = chat.send(20);
    // The 10th message arrives corrupted (the peer's or the server's fault).
    let mut payload = batch[9].payload.as_ref().to_vec();
    let last = payload.len() - 1;
    payload[last] ^= 0xff;
    batch[9].payload = sealpost_proto::Bytes64(payload);
    let acks = chat.bob.engine.process_batch(&batch, NOW).unwrap();
    assert_eq!(acks.len(), 20, "a rejected envelope is acknowledged too");
    let shown = chat.bob.engine.take_unshown().unwrap();
    let expected: Vec<String> = (1..=20).filter(|n| *n != 10).map(text).collect();
    assert_eq!(texts(&shown), expected);
    assert!(
        shown
            .iter()
            .any(|entry| entry.kind == "notice" && entry.text.contains("could not be decrypted"))
    );
    // The group still works after the rejected envelope was undone.
    let more = chat.send(2);
    chat.bob.engine.process_batch(&more, NOW).unwrap();
    assert_eq!(texts(&chat.bob.engine.take_unshown().unwrap()).len(), 2);
}

#[test]
fn groups_changed_by_another_process_are_reloaded() {
    let mut chat = Chat::new();
    // Two engines on Alice's store (e.g. `sealpost sync --follow` and `sealpost send`).
    // Each keeps the group in memory after encrypting; neither may reuse a ratchet
    // generation the other used (that would reuse an AES-GCM nonce).
    let mut second = Engine::open(&chat.dir.path().join("alice.db")).unwrap();
    let mut envelopes = chat.send(2);
    let from_second = second
        .encrypt_text(&chat.group_id, &text(1_000), None, NOW * 1000)
        .unwrap();
    envelopes.push(message_envelope(&from_second, 1_000));
    envelopes.extend(chat.send(2));
    chat.bob.engine.process_batch(&envelopes, NOW).unwrap();
    let mut expected: Vec<String> = vec![text(1), text(2), text(1_000), text(3), text(4)];
    assert_eq!(texts(&chat.bob.engine.take_unshown().unwrap()), expected);

    // The same on the receiving side: a second engine on Bob's store processes a message,
    // then the first one must not decrypt the next with its stale copy of the group.
    let mut bob_second = Engine::open(&chat.bob_db()).unwrap();
    let next = chat.send(1);
    bob_second.process_batch(&next, NOW).unwrap();
    let next = chat.send(1);
    chat.bob.engine.process_batch(&next, NOW).unwrap();
    expected = vec![text(5), text(6)];
    assert_eq!(texts(&chat.bob.engine.take_unshown().unwrap()), expected);
    drop(chat.world);
}

#[test]
fn process_envelope_returns_what_history_holds() {
    let mut chat = Chat::new();
    let envelopes = chat.send(2);
    let mut returned = Vec::new();
    for envelope in &envelopes {
        returned.extend(chat.bob.engine.process_envelope(envelope, NOW).unwrap());
    }
    // A redelivery adds nothing.
    assert!(
        chat.bob
            .engine
            .process_envelope(&envelopes[0], NOW)
            .unwrap()
            .is_empty()
    );
    let conversation = chat.bob.engine.find_conversation("alice").unwrap();
    let history = chat.bob.engine.history(&conversation, 2).unwrap();
    assert_eq!(returned, history);
    assert_eq!(texts(&returned), [text(1), text(2)]);
}

#[test]
fn a_sent_message_waits_in_the_outbox_as_sent_and_a_stale_one_gives_its_text_back() {
    let mut chat = Chat::new();
    let sent = chat
        .alice
        .engine
        .encrypt_text(&chat.group_id, &text(1), None, NOW * 1000)
        .unwrap();
    let waiting = chat.alice.engine.outbox().unwrap();
    let [sealpost_core::engine::conversations::Outgoing::Message(waiting)] = waiting.as_slice()
    else {
        panic!("{waiting:?}");
    };
    assert_eq!(waiting.group_id, sent.group_id);
    assert_eq!(waiting.request.message_id, sent.request.message_id);
    assert_eq!(waiting.request.message, sent.request.message);
    // Survives reopening, and a stale message hands its text back for re-encryption.
    drop(chat.alice);
    let mut alice = Engine::open(&chat.dir.path().join("alice.db")).unwrap();
    assert_eq!(alice.outbox().unwrap().len(), 1);
    assert_eq!(
        alice.message_stale(sent.request.message_id).unwrap(),
        Some(text(1))
    );
    assert!(alice.outbox().unwrap().is_empty());
}
