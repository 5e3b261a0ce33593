//! Key transparency in the engine: pinned server keys, the roots this device has seen,
//! proven device lists of contacts, self-monitoring of our own account, and root gossip.
//!
//! Rules:
//! - every root must be signed by the pinned KT key, and epochs only move forward
//!   (a lower epoch than one seen before is a rollback and is refused);
//! - two different roots for one epoch mean the server signed two directories: an alert;
//! - devices of a contact are those of their latest *proven* directory entry; a KeyPackage
//!   for any other device is refused;
//! - every version of our own entry published since we first appeared must carry our
//!   account key and only certificates signed by it; anything else raises an alert.

use rusqlite::{Connection, OptionalExtension as _, params};
use sealpost_proto::certificate::DeviceCertificate;
use sealpost_proto::kt::{DirectoryEntry, HistoryResponse, SignedRoot};
use uuid::Uuid;

use super::Engine;
use super::conversations::insert_notice;
use crate::error::CoreError;
use crate::identity::verify_certificate;
use crate::kt::{Gossip, KtKeys, verify_history, verify_root};
use crate::store;

/// The pseudo-conversation that holds security alerts.
pub const SECURITY: &str = "security";

pub(crate) fn kt_keys(tx: &rusqlite::Connection) -> Result<KtKeys, CoreError> {
    let signing = store::meta_get(tx, "kt_signing_key")?;
    let vrf = store::meta_get(tx, "kt_vrf_key")?;
    match (signing, vrf) {
        (Some(signing), Some(vrf)) => Ok(KtKeys {
            signing_key: signing.as_slice().try_into().map_err(|_| {
                CoreError::Transparency("the pinned directory key is corrupt".into())
            })?,
            vrf_public_key: vrf,
        }),
        _ => Err(CoreError::Transparency(
            "this device has no pinned key-directory key; register or link it again".into(),
        )),
    }
}

/// Raises an alert once (by `key`) in the security conversation; returns whether it was new.
pub(crate) fn alert(tx: &Connection, key: &str, text: &str, now: i64) -> Result<bool, CoreError> {
    let inserted = tx.execute(
        "INSERT OR IGNORE INTO kt_alerts (key, raised_at) VALUES (?, ?)",
        params![key, now],
    )?;
    if inserted == 1 {
        tracing::warn!("security alert: {text}");
        insert_notice(tx, SECURITY, &format!("ALERT: {text}"), now, false)?;
    }
    Ok(inserted == 1)
}

/// Records a signed root: verifies it, refuses rollbacks, alerts on a second root for the
/// same epoch. Returns the root hash.
pub(crate) fn observe_root(
    tx: &Connection,
    root: &SignedRoot,
    now: i64,
) -> Result<[u8; 32], CoreError> {
    let keys = kt_keys(tx)?;
    let hash = verify_root(&keys, root)?;
    let newest: Option<i64> =
        tx.query_row("SELECT MAX(epoch) FROM kt_roots", [], |row| row.get(0))?;
    if let Some(newest) = newest
        && (root.epoch as i64) < newest
    {
        // Older epochs are fine when we have that very root already (e.g. an audit).
        let known: Option<Vec<u8>> = tx
            .query_row(
                "SELECT root_hash FROM kt_roots WHERE epoch = ?",
                [root.epoch as i64],
                |row| row.get(0),
            )
            .optional()?;
        if known.as_deref() != Some(hash.as_slice()) {
            return Err(CoreError::Transparency(format!(
                "the server showed directory epoch {} after epoch {newest}: a rollback, refused",
                root.epoch
            )));
        }
        return Ok(hash);
    }
    record_root_hash(tx, root.epoch, &hash, now)?;
    Ok(hash)
}

/// Stores the root hash of an epoch; a different hash than one already seen for the same
/// epoch means the server signed two directories: an alert and an error.
fn record_root_hash(
    tx: &Connection,
    epoch: u64,
    hash: &[u8; 32],
    now: i64,
) -> Result<(), CoreError> {
    let known: Option<Vec<u8>> = tx
        .query_row(
            "SELECT root_hash FROM kt_roots WHERE epoch = ?",
            [epoch as i64],
            |row| row.get(0),
        )
        .optional()?;
    match known {
        Some(existing) if existing != hash => {
            alert(
                tx,
                &format!("fork:{epoch}"),
                &format!(
                    "the server signed two different key directories for epoch {epoch}: it may \
                     be showing people different keys"
                ),
                now,
            )?;
            Err(CoreError::Transparency(format!(
                "two different directory roots for epoch {epoch}"
            )))
        }
        Some(_) => Ok(()),
        None => {
            tx.execute(
                "INSERT INTO kt_roots (epoch, root_hash) VALUES (?, ?)",
                params![epoch as i64, hash.as_slice()],
            )?;
            Ok(())
        }
    }
}

/// Compares a root another member reported (in a message's authenticated data) with ours.
pub(crate) fn observe_gossip(
    tx: &Connection,
    sender: &str,
    gossip: &Gossip,
    now: i64,
) -> Result<(), CoreError> {
    let known: Option<Vec<u8>> = tx
        .prepare_cached("SELECT root_hash FROM kt_roots WHERE epoch = ?")?
        .query_row([gossip.epoch as i64], |row| row.get(0))
        .optional()?;
    match known {
        Some(hash) if hash != gossip.root_hash => {
            alert(
                tx,
                &format!("split:{}:{sender}", gossip.epoch),
                &format!(
                    "{sender} was shown a different key directory than you for epoch {}: the \
                     server is showing different people different directories",
                    gossip.epoch
                ),
                now,
            )?;
        }
        Some(_) => {}
        None => {
            tx.prepare_cached(
                "INSERT OR IGNORE INTO kt_gossip_pending (epoch, root_hash, sender) VALUES (?, ?, ?)",
            )?
            .execute(params![gossip.epoch as i64, gossip.root_hash, sender])?;
        }
    }
    Ok(())
}

/// The gossip to attach to an outgoing message: our newest root.
pub(crate) fn current_gossip(tx: &Connection) -> Result<Option<Gossip>, CoreError> {
    let row: Option<(i64, Vec<u8>)> = tx
        .prepare_cached("SELECT epoch, root_hash FROM kt_roots ORDER BY epoch DESC LIMIT 1")?
        .query_row([], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()?;
    Ok(row.and_then(|(epoch, hash)| {
        let hash: [u8; 32] = hash.try_into().ok()?;
        Some(Gossip::new(epoch as u64, hash))
    }))
}

/// Stores the proven device list of an account.
pub(crate) fn save_contact_devices(
    tx: &Connection,
    username: &str,
    entry: &DirectoryEntry,
) -> Result<(), CoreError> {
    tx.execute("DELETE FROM contact_devices WHERE username = ?", [username])?;
    for (device, cert) in &entry.devices {
        tx.execute(
            "INSERT INTO contact_devices (username, device_id, certificate) VALUES (?, ?, ?)",
            params![username, device.to_string(), cert],
        )?;
    }
    Ok(())
}

/// Whether `certificate` is a proven device of `username`.
pub(crate) fn is_proven_device(
    tx: &Connection,
    username: &str,
    device: Uuid,
    certificate: &[u8],
) -> Result<bool, CoreError> {
    let stored: Option<Vec<u8>> = tx
        .prepare_cached(
            "SELECT certificate FROM contact_devices WHERE username = ? AND device_id = ?",
        )?
        .query_row(params![username, device.to_string()], |row| row.get(0))
        .optional()?;
    Ok(stored.as_deref() == Some(certificate))
}

impl Engine {
    /// Pins the server's KT keys (at registration or linking).
    pub fn pin_kt_keys(&mut self, keys: &KtKeys) -> Result<(), CoreError> {
        self.transact(|_, tx, _| {
            store::meta_set(tx, "kt_signing_key", &keys.signing_key)?;
            store::meta_set(tx, "kt_vrf_key", &keys.vrf_public_key)?;
            Ok(())
        })
    }

    /// The pinned KT keys.
    pub fn kt_keys(&self) -> Result<KtKeys, CoreError> {
        kt_keys(&self.conn)
    }

    /// Records the server's current root (refusing rollbacks).
    pub fn observe_signed_root(&mut self, root: &SignedRoot, now: i64) -> Result<(), CoreError> {
        self.transact(|_, tx, _| observe_root(tx, root, now).map(|_| ()))
    }

    /// Records a root of a past epoch met during an audit: verified and compared with any
    /// root already seen for that epoch, but not subject to the rollback rule.
    pub fn observe_signed_root_history(
        &mut self,
        root: &SignedRoot,
        now: i64,
    ) -> Result<(), CoreError> {
        self.transact(|_, tx, _| {
            let hash = verify_root(&kt_keys(tx)?, root)?;
            record_root_hash(tx, root.epoch, &hash, now)
        })
    }

    /// Epochs that other members reported roots for and this device has not seen.
    pub fn pending_gossip_epochs(&self) -> Result<Vec<u64>, CoreError> {
        let mut statement = self
            .conn
            .prepare("SELECT DISTINCT epoch FROM kt_gossip_pending ORDER BY epoch")?;
        let rows = statement.query_map([], |row| row.get::<_, i64>(0))?;
        Ok(rows
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .map(|e| e as u64)
            .collect())
    }

    /// Checks gossip against roots the server signed for those epochs (fetched by the
    /// client); alerts on any difference.
    pub fn resolve_gossip(&mut self, roots: &[SignedRoot], now: i64) -> Result<(), CoreError> {
        self.transact(|_, tx, _| {
            let keys = kt_keys(tx)?;
            for root in roots {
                let hash = verify_root(&keys, root)?;
                let reports: Vec<(Vec<u8>, String)> = {
                    let mut statement = tx.prepare(
                        "SELECT root_hash, sender FROM kt_gossip_pending WHERE epoch = ?",
                    )?;
                    let rows = statement
                        .query_map([root.epoch as i64], |row| Ok((row.get(0)?, row.get(1)?)))?;
                    rows.collect::<Result<_, _>>()?
                };
                for (reported, sender) in reports {
                    if reported != hash {
                        alert(
                            tx,
                            &format!("split:{}:{sender}", root.epoch),
                            &format!(
                                "{sender} was shown a different key directory than the server \
                                 shows you for epoch {}: the server is showing different people \
                                 different directories",
                                root.epoch
                            ),
                            now,
                        )?;
                    }
                }
                tx.execute(
                    "DELETE FROM kt_gossip_pending WHERE epoch = ?",
                    [root.epoch as i64],
                )?;
                tx.execute(
                    "INSERT OR IGNORE INTO kt_roots (epoch, root_hash) VALUES (?, ?)",
                    params![root.epoch as i64, hash.as_slice()],
                )?;
            }
            Ok(())
        })
    }

    /// Self-monitoring: verifies our own account's key history and alerts on any version
    /// we did not create. Returns the alerts raised now.
    pub fn check_own_history(
        &mut self,
        response: &HistoryResponse,
        now: i64,
    ) -> Result<Vec<String>, CoreError> {
        self.transact(|_, tx, identity| {
            let identity = identity.ok_or(CoreError::NotRegistered)?;
            let keys = kt_keys(tx)?;
            observe_root(tx, &response.root, now)?;
            let mut versions = verify_history(&keys, &identity.username, response)?;
            // akd lists the newest version first; walk them in publication order.
            versions.sort_by_key(|v| v.version);
            let own_key = identity.account_key();
            let mut raised = Vec::new();
            // Versions before our account first appears belong to an earlier holder of
            // the username.
            let Some(start) = versions.iter().position(|v| v.entry.account_key == own_key) else {
                return Ok(raised);
            };
            for version in &versions[start..] {
                let mut problems = Vec::new();
                if version.entry.account_key != own_key {
                    if version.entry.is_deleted() {
                        problems.push("your account was published as deleted".to_owned());
                    } else {
                        problems.push(
                            "an account key that is not yours was published for your account"
                                .to_owned(),
                        );
                    }
                }
                for (device, cert) in &version.entry.devices {
                    let valid = DeviceCertificate::decode(cert)
                        .ok()
                        .filter(|c| {
                            c.account_key == own_key
                                && c.username == identity.username
                                && c.device_id == *device
                                && verify_certificate(c).is_ok()
                        })
                        .is_some();
                    if !valid {
                        problems.push(format!(
                            "a device you did not add ({device}) has been published for your account"
                        ));
                    }
                }
                for problem in problems {
                    let key = format!("self:{}:{}:{problem}", version.epoch, version.version);
                    let text = format!("{problem} (directory epoch {})", version.epoch);
                    if alert(tx, &key, &text, now)? {
                        raised.push(text);
                    }
                }
            }
            Ok(raised)
        })
    }
}
