//! Contacts: pinned account keys, verification with safety numbers, key changes, and the
//! device lists the directory publishes.
//!
//! The first account key seen for a username is pinned. A later, different key is a key
//! change: for an unverified contact the new key replaces the old one and every
//! conversation with them shows a notice; for a verified contact the new key is held as
//! *pending*, a loud notice is shown, and sending to any conversation with them is refused
//! until the user checks the new safety number and accepts it. Key changes never make the
//! client reject group traffic (that would split the group); they stop the user from
//! encrypting to an unconfirmed key.

use rusqlite::{Connection, OptionalExtension as _, params};
use sealpost_proto::api::UserDevicesResponse;
use sealpost_proto::certificate::DeviceCertificate;
use serde::Serialize;
use uuid::Uuid;

use super::Engine;
use super::conversations::{insert_notice, load_group, member_devices};
use super::transparency::{kt_keys, observe_root, save_contact_devices};
use crate::error::CoreError;
use crate::identity::verify_certificate;
use crate::kt::verify_lookup;
use crate::safety;
use crate::store::Provider;
use sealpost_proto::kt::DirectoryEntry;

/// What the engine knows about a contact's key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ContactKey {
    pub username: String,
    /// The pinned account key, hex.
    pub account_key: String,
    pub verified: bool,
    /// A new key that replaced a verified one and awaits the user's acceptance, hex.
    pub pending_key: Option<String>,
}

/// A safety number and what it is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SafetyNumber {
    pub username: String,
    /// 60 digits.
    pub number: String,
    pub verified: bool,
    /// The contact's key changed after verification; the number shown is for the new key.
    pub key_changed: bool,
}

/// A device the directory lists for an account, with a valid certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DirectoryDevice {
    pub device_id: Uuid,
    /// The device's name (readable only for the user's own account).
    pub name: Option<String>,
    pub created: String,
}

struct ContactRow {
    account_key: Vec<u8>,
    verified: bool,
    pending_key: Option<Vec<u8>>,
}

fn contact_row(tx: &Connection, username: &str) -> Result<Option<ContactRow>, CoreError> {
    Ok(tx
        .prepare_cached(
            "SELECT account_key, verified, pending_key FROM contacts WHERE username = ?",
        )?
        .query_row([username], |row| {
            Ok(ContactRow {
                account_key: row.get(0)?,
                verified: row.get::<_, i64>(1)? != 0,
                pending_key: row.get(2)?,
            })
        })
        .optional()?)
}

/// Group ids of active conversations that include `username`.
fn conversations_with(
    provider: &Provider<'_>,
    tx: &Connection,
    username: &str,
) -> Result<Vec<String>, CoreError> {
    let ids: Vec<String> = {
        let mut statement =
            tx.prepare("SELECT group_id FROM conversations WHERE status = 'active'")?;
        let rows = statement.query_map([], |row| row.get::<_, String>(0))?;
        rows.collect::<Result<_, _>>()?
    };
    let mut out = Vec::new();
    for id in ids {
        if let Some(group) = load_group(provider, &id)?
            && member_devices(&group)
                .iter()
                .any(|m| m.username == username)
        {
            out.push(id);
        }
    }
    Ok(out)
}

/// Records the account key seen for `username` (see the module doc). Returns `true` when
/// sending to this user is blocked by an unaccepted key change.
pub(crate) fn observe_account_key(
    provider: &Provider<'_>,
    tx: &Connection,
    own_username: &str,
    username: &str,
    account_key: &[u8],
    now: i64,
) -> Result<bool, CoreError> {
    if username == own_username {
        // Our own key comes from our own store, never from the server.
        return Ok(false);
    }
    let Some(row) = contact_row(tx, username)? else {
        tx.execute(
            "INSERT INTO contacts (username, account_key, first_seen, checked_at) VALUES (?, ?, ?, ?)",
            params![username, account_key, now, now],
        )?;
        return Ok(false);
    };
    if row.account_key == account_key {
        return Ok(row.pending_key.is_some());
    }
    if row.pending_key.as_deref() == Some(account_key) {
        return Ok(true);
    }
    if row.verified {
        tx.execute(
            "UPDATE contacts SET pending_key = ? WHERE username = ?",
            params![account_key, username],
        )?;
        let text = format!(
            "WARNING: {username}'s safety number changed. You had verified {username}, so sending \
             to {username} is paused: compare the new number (`sealpost safety-number {username}`) \
             and, if it is right, run `sealpost verify {username} --accept-new-key`"
        );
        for group in conversations_with(provider, tx, username)? {
            insert_notice(tx, &group, &text, now, false)?;
        }
        Ok(true)
    } else {
        tx.execute(
            "UPDATE contacts SET account_key = ?, pending_key = NULL WHERE username = ?",
            params![account_key, username],
        )?;
        let text = format!(
            "{username}'s safety number changed (a new account key). Check it with \
             `sealpost safety-number {username}`"
        );
        for group in conversations_with(provider, tx, username)? {
            insert_notice(tx, &group, &text, now, false)?;
        }
        Ok(false)
    }
}

/// The contacts with a key change awaiting acceptance.
const PENDING_KEY_CHANGES: &str = "SELECT username FROM contacts WHERE pending_key IS NOT NULL";

/// Users whose unaccepted key change blocks sending to this group, in the order given.
pub(crate) fn blocked_members(
    tx: &Connection,
    usernames: impl IntoIterator<Item = String>,
) -> Result<Vec<String>, CoreError> {
    // Key changes awaiting acceptance are rare: one query for all of them, whatever the
    // size of the group, answered from the partial index `contacts_pending`.
    let pending: Vec<String> = tx
        .prepare_cached(PENDING_KEY_CHANGES)?
        .query_map([], |row| row.get(0))?
        .collect::<Result<_, _>>()?;
    let mut blocked = Vec::new();
    if pending.is_empty() {
        return Ok(blocked);
    }
    for username in usernames {
        if pending.contains(&username) && !blocked.contains(&username) {
            blocked.push(username);
        }
    }
    Ok(blocked)
}

pub(crate) fn key_change_error(users: &[String]) -> CoreError {
    let user = users.first().cloned().unwrap_or_default();
    CoreError::KeyMismatch {
        detail: format!(
            "{user}'s safety number changed after you verified it; nothing was sent. Compare \
             the new number with `sealpost safety-number {user}` and run `sealpost verify \
             {user} --accept-new-key` if it is right"
        ),
        user,
    }
}

impl Engine {
    /// Checks a directory answer: every device certificate must verify under the listed
    /// account key; records that key (key-change rules above) and returns the devices.
    /// For a verified contact with a pending key change, the devices are those under the
    /// new key (callers must not encrypt to them until the change is accepted).
    pub fn observe_directory(
        &mut self,
        response: &UserDevicesResponse,
        now: i64,
    ) -> Result<Vec<DirectoryDevice>, CoreError> {
        self.transact(|provider, tx, identity| {
            let identity = identity.ok_or(CoreError::NotRegistered)?;
            // The answer must be exactly what the key directory proves for this name.
            let keys = kt_keys(tx)?;
            let entry = verify_lookup(&keys, &response.username, &response.kt)?;
            observe_root(tx, &response.kt.root, now)?;
            let listed =
                DirectoryEntry::new(
                    response.account_key.as_ref().try_into().map_err(|_| {
                        CoreError::BadResponse("an account key is not 32 bytes".into())
                    })?,
                    response
                        .devices
                        .iter()
                        .map(|d| (d.device_id, d.certificate.as_ref().to_vec()))
                        .collect(),
                );
            if entry.is_deleted() || listed != entry {
                return Err(CoreError::Transparency(format!(
                    "the server's keys for {} are not the ones the key directory holds; refusing \
                     to use them",
                    response.username
                )));
            }
            let own = response.username == identity.username;
            if own && entry.account_key != identity.account_key() {
                return Err(CoreError::KeyMismatch {
                    user: response.username.clone(),
                    detail: "the key directory lists another account key for your own account"
                        .into(),
                });
            }
            observe_account_key(
                provider,
                tx,
                &identity.username,
                &response.username,
                &entry.account_key,
                now,
            )?;
            if own {
                crate::store::meta_set(tx, "own_directory_checked_at", &now.to_le_bytes())?;
            } else {
                tx.execute(
                    "UPDATE contacts SET checked_at = ? WHERE username = ?",
                    params![now, response.username],
                )?;
            }
            let mut devices = Vec::with_capacity(response.devices.len());
            for device in &response.devices {
                let cert = DeviceCertificate::decode(device.certificate.as_ref())
                    .map_err(|e| CoreError::InvalidCertificate(e.to_string()))?;
                verify_certificate(&cert)?;
                if cert.username != response.username
                    || cert.account_key != entry.account_key
                    || cert.device_id != device.device_id
                {
                    return Err(CoreError::InvalidCertificate(format!(
                        "the directory lists a device of {} whose certificate does not match",
                        response.username
                    )));
                }
                let name = if own {
                    device.name_sealed.as_ref().and_then(|sealed| {
                        identity
                            .account
                            .open_device_name(cert.device_id, sealed.as_ref())
                    })
                } else {
                    None
                };
                devices.push(DirectoryDevice {
                    device_id: cert.device_id,
                    name,
                    created: device.created.clone(),
                });
            }
            save_contact_devices(tx, &response.username, &entry)?;
            Ok(devices)
        })
    }

    /// Checks the directory's proof that `username`'s account was deleted; afterwards the
    /// account has no devices.
    pub fn observe_deleted(
        &mut self,
        username: &str,
        envelope: &sealpost_proto::kt::LookupEnvelope,
        now: i64,
    ) -> Result<(), CoreError> {
        self.transact(|_, tx, _| {
            let keys = kt_keys(tx)?;
            let entry = verify_lookup(&keys, username, envelope)?;
            observe_root(tx, &envelope.root, now)?;
            if !entry.is_deleted() {
                return Err(CoreError::Transparency(format!(
                    "the server says {username} does not exist, but the key directory lists the \
                     account"
                )));
            }
            save_contact_devices(tx, username, &entry)?;
            tx.execute(
                "UPDATE contacts SET checked_at = ? WHERE username = ?",
                params![now, username],
            )?;
            Ok(())
        })
    }

    /// When the user's directory entry was last checked (Unix seconds; 0 if never).
    pub fn directory_checked_at(&self, username: &str) -> Result<i64, CoreError> {
        if self
            .identity()
            .is_ok_and(|identity| identity.username == username)
        {
            return Ok(
                crate::store::meta_get(&self.conn, "own_directory_checked_at")?
                    .and_then(|bytes| <[u8; 8]>::try_from(bytes.as_slice()).ok())
                    .map(i64::from_le_bytes)
                    .unwrap_or(0),
            );
        }
        Ok(self
            .conn
            .query_row(
                "SELECT checked_at FROM contacts WHERE username = ?",
                [username],
                |row| row.get(0),
            )
            .optional()?
            .unwrap_or(0))
    }

    pub fn contact(&mut self, username: &str) -> Result<Option<ContactKey>, CoreError> {
        self.transact(|_, tx, _| {
            Ok(contact_row(tx, username)?.map(|row| ContactKey {
                username: username.to_owned(),
                account_key: hex::encode(&row.account_key),
                verified: row.verified,
                pending_key: row.pending_key.map(hex::encode),
            }))
        })
    }

    /// The safety number with a contact whose key the engine has seen.
    pub fn safety_number(&mut self, username: &str) -> Result<SafetyNumber, CoreError> {
        self.transact(|_, tx, identity| {
            let identity = identity.ok_or(CoreError::NotRegistered)?;
            if username == identity.username {
                return Err(CoreError::InvalidInput(
                    "a safety number is between you and someone else".into(),
                ));
            }
            let row = contact_row(tx, username)?.ok_or_else(|| {
                CoreError::InvalidInput(format!("no key is known for {username:?}"))
            })?;
            let key = row.pending_key.clone().unwrap_or(row.account_key);
            Ok(SafetyNumber {
                username: username.to_owned(),
                number: safety::safety_number(
                    (&identity.username, &identity.account_key()),
                    (username, &key),
                ),
                verified: row.verified && row.pending_key.is_none(),
                key_changed: row.pending_key.is_some(),
            })
        })
    }

    /// Marks a contact verified if `number` is their current safety number.
    pub fn verify_contact(&mut self, username: &str, number: &str) -> Result<(), CoreError> {
        let expected = self.safety_number(username)?;
        if expected.key_changed {
            return Err(CoreError::KeyMismatch {
                user: username.to_owned(),
                detail: format!(
                    "{username}'s key changed since you verified it; accept the new key first \
                     with `sealpost verify {username} --accept-new-key`"
                ),
            });
        }
        if safety::normalize(number) != expected.number {
            return Err(CoreError::InvalidInput(format!(
                "that safety number does NOT match {username}'s; do not trust this \
                 conversation until you find out why"
            )));
        }
        self.transact(|_, tx, _| {
            tx.execute(
                "UPDATE contacts SET verified = 1 WHERE username = ?",
                [username],
            )?;
            Ok(())
        })
    }

    /// Accepts a verified contact's new key. The contact is then unverified until the user
    /// compares the new safety number.
    pub fn accept_new_key(&mut self, username: &str, now: i64) -> Result<(), CoreError> {
        self.transact(|provider, tx, _| {
            let row = contact_row(tx, username)?.ok_or_else(|| {
                CoreError::InvalidInput(format!("no key is known for {username:?}"))
            })?;
            let Some(pending) = row.pending_key else {
                return Err(CoreError::InvalidInput(format!(
                    "{username}'s key has not changed; nothing to accept"
                )));
            };
            tx.execute(
                "UPDATE contacts SET account_key = ?, pending_key = NULL, verified = 0 WHERE username = ?",
                params![pending, username],
            )?;
            let text = format!("you accepted {username}'s new key; {username} is not verified");
            for group in conversations_with(provider, tx, username)? {
                insert_notice(tx, &group, &text, now, true)?;
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add_contact(tx: &Connection, username: &str, pending: Option<&[u8]>) {
        tx.execute(
            "INSERT INTO contacts (username, account_key, first_seen, pending_key) \
             VALUES (?, x'01', 0, ?)",
            params![username, pending],
        )
        .unwrap();
    }

    #[test]
    fn pending_key_changes_are_read_from_their_index_not_from_every_contact() {
        let conn = crate::store::open_in_memory().unwrap();
        let plan: Vec<String> = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {PENDING_KEY_CHANGES}"))
            .unwrap()
            .query_map([], |row| row.get::<_, String>(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(
            plan.iter().any(|step| step.contains("contacts_pending")),
            "plan: {plan:?}"
        );
    }

    #[test]
    fn blocked_members_are_the_given_users_with_a_pending_key_in_order() {
        let conn = crate::store::open_in_memory().unwrap();
        for n in 0..50 {
            add_contact(&conn, &format!("user{n}"), None);
        }
        add_contact(&conn, "carol", Some(b"new key"));
        add_contact(&conn, "bob", Some(b"new key"));
        let asked = ["alice", "bob", "user7", "carol", "bob"].map(str::to_owned);
        assert_eq!(
            blocked_members(&conn, asked).unwrap(),
            ["bob".to_owned(), "carol".to_owned()]
        );
        assert!(
            blocked_members(&conn, ["user1".to_owned()])
                .unwrap()
                .is_empty()
        );
    }
}
