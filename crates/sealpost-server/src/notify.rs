//! Wake-ups for connected devices.
//!
//! When a message is stored for a device, the device's WebSocket(s) must learn of it. Each
//! connected device has a `watch` channel whose value is bumped on new mail; every socket
//! of that device holds a receiver, so no wake-up is missed between two polls. Channels of
//! devices with no socket are dropped.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use uuid::Uuid;

#[derive(Debug, Default, Clone)]
pub struct Notifier {
    channels: Arc<Mutex<HashMap<Uuid, watch::Sender<u64>>>>,
    sockets: Arc<Mutex<HashMap<String, usize>>>,
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

    /// Subscribes a socket of `device` to its wake-ups.
    pub fn subscribe(&self, device: Uuid) -> watch::Receiver<u64> {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        channels
            .entry(device)
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    /// Wakes every socket of each device.
    pub fn wake(&self, devices: &[Uuid]) {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        for device in devices {
            if let Some(sender) = channels.get(device) {
                if sender.receiver_count() == 0 {
                    channels.remove(device);
                } else {
                    sender.send_modify(|n| *n = n.wrapping_add(1));
                }
            }
        }
    }

    /// Drops the channel of a device whose last socket closed.
    pub fn release(&self, device: Uuid) {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if channels
            .get(&device)
            .is_some_and(|sender| sender.receiver_count() == 0)
        {
            channels.remove(&device);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wakes_subscribers_and_forgets_idle_devices() {
        let notifier = Notifier::default();
        let device = Uuid::new_v4();
        let mut rx = notifier.subscribe(device);
        notifier.wake(&[device, Uuid::new_v4()]);
        rx.changed().await.unwrap();
        drop(rx);
        notifier.release(device);
        assert!(notifier.channels.lock().unwrap().is_empty());
    }
}
