//! Delivery to connected devices.
//!
//! When a message is stored for a device, its open WebSockets must learn of it. A socket in
//! *wake* mode holds a `watch` receiver whose value is bumped on new mail, so no wake-up is
//! missed between two fetches. A socket in *push* mode holds a bounded queue that receives
//! each new mailbox entry itself, right after the transaction that stored it committed, in
//! mailbox order. When a push queue is full the entry is not queued and the socket is told
//! it lagged; it then re-reads the mailbox from the database, which holds every entry, so a
//! slow device costs bounded memory and loses nothing. Entries of devices with no socket are
//! not kept here at all.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, watch};
use uuid::Uuid;

use crate::store::{Delivery, StoredMessage};

/// Pushed entries one socket may have queued before it counts as lagging.
const PUSH_QUEUE: usize = 1024;

#[derive(Debug, Default, Clone)]
pub struct Notifier {
    devices: Arc<Mutex<HashMap<Uuid, Subscribers>>>,
    sockets: Arc<Mutex<HashMap<String, usize>>>,
    next_id: Arc<AtomicU64>,
}

/// The open sockets of one device.
#[derive(Debug, Default)]
struct Subscribers {
    wake: Option<watch::Sender<u64>>,
    pushers: Vec<Pusher>,
}

#[derive(Debug)]
struct Pusher {
    id: u64,
    queue: mpsc::Sender<Push>,
    lagged: Arc<AtomicBool>,
}

/// One new mailbox entry for a push-mode socket.
#[derive(Debug, Clone)]
pub struct Push {
    pub mailbox_id: u64,
    pub message: Arc<StoredMessage>,
}

/// A push-mode socket's side of its queue; unsubscribes on drop.
#[derive(Debug)]
pub struct PushSubscription {
    pub queue: mpsc::Receiver<Push>,
    lagged: Arc<AtomicBool>,
    device: Uuid,
    id: u64,
    notifier: Notifier,
}

impl PushSubscription {
    /// True (once) when entries were dropped since the last call: re-read the mailbox.
    pub fn take_lagged(&self) -> bool {
        self.lagged.swap(false, Ordering::AcqRel)
    }
}

impl Drop for PushSubscription {
    fn drop(&mut self) {
        let mut devices = self.notifier.lock_devices();
        if let Some(subscribers) = devices.get_mut(&self.device) {
            subscribers.pushers.retain(|p| p.id != self.id);
            if subscribers.is_idle() {
                devices.remove(&self.device);
            }
        }
    }
}

impl Subscribers {
    fn is_idle(&self) -> bool {
        self.pushers.is_empty() && self.wake.as_ref().is_none_or(|w| w.receiver_count() == 0)
    }
}

/// One open WebSocket counted against its account; released on drop.
#[derive(Debug)]
pub struct SocketSlot {
    sockets: Arc<Mutex<HashMap<String, usize>>>,
    account: String,
}

impl Drop for SocketSlot {
    fn drop(&mut self) {
        let mut sockets = self.sockets.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = sockets.get_mut(&self.account) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                sockets.remove(&self.account);
            }
        }
    }
}

impl Notifier {
    fn lock_devices(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Subscribers>> {
        self.devices.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a new WebSocket of `account`, or `None` when it already has `max` open.
    pub fn reserve_socket(&self, account: &str, max: usize) -> Option<SocketSlot> {
        let mut sockets = self.sockets.lock().unwrap_or_else(|e| e.into_inner());
        let count = sockets.entry(account.to_owned()).or_insert(0);
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(SocketSlot {
            sockets: self.sockets.clone(),
            account: account.to_owned(),
        })
    }

    /// Subscribes a wake-mode socket of `device`.
    pub fn subscribe(&self, device: Uuid) -> watch::Receiver<u64> {
        let mut devices = self.lock_devices();
        devices
            .entry(device)
            .or_default()
            .wake
            .get_or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    /// Subscribes a push-mode socket of `device`.
    pub fn subscribe_push(&self, device: Uuid) -> PushSubscription {
        let (queue, receiver) = mpsc::channel(PUSH_QUEUE);
        let lagged = Arc::new(AtomicBool::new(false));
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.lock_devices()
            .entry(device)
            .or_default()
            .pushers
            .push(Pusher {
                id,
                queue,
                lagged: lagged.clone(),
            });
        PushSubscription {
            queue: receiver,
            lagged,
            device,
            id,
            notifier: self.clone(),
        }
    }

    /// Hands new mailbox entries to the sockets of their devices.
    pub fn deliver(&self, deliveries: &[Delivery]) {
        if deliveries.is_empty() {
            return;
        }
        let mut devices = self.lock_devices();
        for delivery in deliveries {
            let Some(subscribers) = devices.get_mut(&delivery.device) else {
                continue;
            };
            if let Some(wake) = &subscribers.wake {
                wake.send_modify(|n| *n = n.wrapping_add(1));
            }
            for pusher in &subscribers.pushers {
                let push = Push {
                    mailbox_id: delivery.mailbox_id,
                    message: delivery.message.clone(),
                };
                if pusher.queue.try_send(push).is_err() {
                    // Full (or the socket is closing): the socket re-reads the mailbox.
                    pusher.lagged.store(true, Ordering::Release);
                }
            }
        }
    }

    /// Forgets a device's wake channel once its last wake-mode socket closed.
    pub fn release(&self, device: Uuid) {
        let mut devices = self.lock_devices();
        if let Some(subscribers) = devices.get_mut(&device) {
            if subscribers
                .wake
                .as_ref()
                .is_some_and(|w| w.receiver_count() == 0)
            {
                subscribers.wake = None;
            }
            if subscribers.is_idle() {
                devices.remove(&device);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sealpost_proto::api::EnvelopeKind;

    fn delivery(device: Uuid, mailbox_id: u64) -> Delivery {
        Delivery {
            device,
            mailbox_id,
            message: Arc::new(StoredMessage {
                message_id: Uuid::new_v4(),
                group_id: "ab".repeat(16),
                group_seq: mailbox_id,
                kind: EnvelopeKind::Application,
                server_time: 0,
                payload: vec![1],
            }),
        }
    }

    #[tokio::test]
    async fn wakes_subscribers_and_forgets_idle_devices() {
        let notifier = Notifier::default();
        let device = Uuid::new_v4();
        let mut rx = notifier.subscribe(device);
        notifier.deliver(&[delivery(device, 1), delivery(Uuid::new_v4(), 2)]);
        rx.changed().await.unwrap();
        drop(rx);
        notifier.release(device);
        assert!(notifier.devices.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn pushes_in_order_and_flags_a_full_queue() {
        let notifier = Notifier::default();
        let device = Uuid::new_v4();
        let mut subscription = notifier.subscribe_push(device);
        let deliveries: Vec<_> = (1..=PUSH_QUEUE as u64 + 5)
            .map(|id| delivery(device, id))
            .collect();
        notifier.deliver(&deliveries);
        assert!(subscription.take_lagged(), "overflow must be reported");
        assert!(!subscription.take_lagged(), "reported once");
        for expected in 1..=PUSH_QUEUE as u64 {
            assert_eq!(
                subscription.queue.recv().await.unwrap().mailbox_id,
                expected
            );
        }
        assert!(
            subscription.queue.try_recv().is_err(),
            "the overflow was dropped"
        );
        drop(subscription);
        assert!(notifier.devices.lock().unwrap().is_empty());
    }
}
