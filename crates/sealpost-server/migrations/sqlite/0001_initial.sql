-- Sealpost server schema, SQLite. Never edit a shipped migration; add a new one.
-- Metadata kept is the minimum of design §8: no IP addresses, no contact lists, no
-- message history after delivery, timestamps of accounts and devices as days only.

CREATE TABLE accounts (
    username      TEXT PRIMARY KEY NOT NULL,
    account_key   BLOB NOT NULL,
    created_day   INTEGER NOT NULL,
    last_seen_day INTEGER NOT NULL
) STRICT;

CREATE TABLE devices (
    device_id     BLOB PRIMARY KEY NOT NULL,
    username      TEXT NOT NULL REFERENCES accounts(username),
    signature_key BLOB NOT NULL,
    certificate   BLOB NOT NULL,
    created_day   INTEGER NOT NULL
) STRICT;
CREATE INDEX devices_by_user ON devices(username);

CREATE TABLE login_challenges (
    challenge_id BLOB PRIMARY KEY NOT NULL,
    device_id    BLOB NOT NULL,
    nonce        BLOB NOT NULL,
    expires_at   INTEGER NOT NULL
) STRICT;

-- Bearer tokens, stored as SHA-256 hashes only.
CREATE TABLE tokens (
    token_hash BLOB PRIMARY KEY NOT NULL,
    device_id  BLOB NOT NULL,
    expires_at INTEGER NOT NULL
) STRICT;
CREATE INDEX tokens_by_device ON tokens(device_id);

CREATE TABLE key_packages (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id   BLOB NOT NULL,
    last_resort INTEGER NOT NULL,
    data        BLOB NOT NULL
) STRICT;
CREATE INDEX key_packages_by_device ON key_packages(device_id, last_resort, id);

CREATE TABLE groups (
    group_id TEXT PRIMARY KEY NOT NULL,
    epoch    INTEGER NOT NULL,
    next_seq INTEGER NOT NULL
) STRICT;

CREATE TABLE group_members (
    group_id  TEXT NOT NULL,
    device_id BLOB NOT NULL,
    PRIMARY KEY (group_id, device_id)
) STRICT;

-- Sequenced messages. The payload is dropped once every recipient acknowledged it; the
-- row stays until it expires so a resent message id is recognised (idempotency).
CREATE TABLE messages (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    group_id     TEXT NOT NULL,
    message_id   BLOB NOT NULL,
    kind         INTEGER NOT NULL,
    group_seq    INTEGER NOT NULL,
    epoch_after  INTEGER NOT NULL,
    payload_hash BLOB NOT NULL,
    payload      BLOB,
    server_time  INTEGER NOT NULL,
    expires_at   INTEGER NOT NULL,
    UNIQUE (group_id, message_id, kind)
) STRICT;
CREATE INDEX messages_by_expiry ON messages(expires_at);

-- Per-device durable mailboxes: one row per (recipient device, message).
CREATE TABLE mailbox (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id  BLOB NOT NULL,
    message    INTEGER NOT NULL REFERENCES messages(id)
) STRICT;
CREATE INDEX mailbox_by_device ON mailbox(device_id, seq);
CREATE INDEX mailbox_by_message ON mailbox(message);
