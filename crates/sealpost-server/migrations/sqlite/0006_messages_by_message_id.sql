-- Idempotency index in insertion order. The unique key of `messages` was
-- (group_id, message_id, kind): with random group ids every insert landed on a random
-- index page, so each sequenced message dirtied (and wrote to the WAL) a whole 4 KiB page.
-- Clients now choose time-ordered message ids (UUIDv7), and the key starts with the
-- message id, so new entries go to the right edge of the index: a batch of hundreds of
-- messages dirties a handful of pages. The same set of columns is unique, so nothing
-- about idempotency changes. `messages` is referenced by `mailbox`, so both are rebuilt
-- (the new `mailbox` references the new `messages` before the renames).

CREATE TABLE messages_v2 (
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
    UNIQUE (message_id, group_id, kind)
) STRICT;
INSERT INTO messages_v2 (id, group_id, message_id, kind, group_seq, epoch_after,
    payload_hash, payload, server_time, expires_at)
    SELECT id, group_id, message_id, kind, group_seq, epoch_after, payload_hash, payload,
        server_time, expires_at FROM messages ORDER BY id;

CREATE TABLE mailbox_v2 (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id  BLOB NOT NULL,
    message    INTEGER NOT NULL REFERENCES messages_v2(id)
) STRICT;
INSERT INTO mailbox_v2 (seq, device_id, message)
    SELECT seq, device_id, message FROM mailbox ORDER BY seq;

-- Ids are never reused: the new tables continue the old AUTOINCREMENT counters.
DELETE FROM sqlite_sequence WHERE name IN ('messages_v2', 'mailbox_v2');
INSERT INTO sqlite_sequence (name, seq)
    SELECT name || '_v2', seq FROM sqlite_sequence WHERE name IN ('messages', 'mailbox');

-- Dropping `mailbox` drops its indexes and the mailbox_counts triggers.
DROP TABLE mailbox;
DROP TABLE messages;
ALTER TABLE messages_v2 RENAME TO messages;
ALTER TABLE mailbox_v2 RENAME TO mailbox;

CREATE INDEX messages_by_expiry ON messages(expires_at);
CREATE INDEX mailbox_by_device ON mailbox(device_id, seq);
CREATE INDEX mailbox_by_message ON mailbox(message);

CREATE TRIGGER mailbox_count_insert AFTER INSERT ON mailbox BEGIN
    INSERT INTO mailbox_counts (device_id, n) VALUES (NEW.device_id, 1)
        ON CONFLICT(device_id) DO UPDATE SET n = n + 1;
END;

CREATE TRIGGER mailbox_count_delete AFTER DELETE ON mailbox BEGIN
    UPDATE mailbox_counts SET n = n - 1 WHERE device_id = OLD.device_id;
END;
