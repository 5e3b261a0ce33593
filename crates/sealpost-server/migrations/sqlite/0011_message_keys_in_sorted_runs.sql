-- Idempotency keys leave `messages` for `message_keys`, which the writer fills in sorted
-- runs (see store/writer/message_keys.rs):
--
-- * The unique key (message id, group, kind) of `messages` was an index updated as each
--   message was stored. Message ids are made by the clients, from their own clocks, so a
--   batch's ids lie far apart in key order, and every batch rewrote a page of that index
--   for nearly every sender in it: a third of the bytes the server wrote.
-- * Now the writer keeps the keys of the newest messages in memory and writes them to
--   `message_keys` in runs, sorted, a few seconds later: consecutive keys fill the same
--   pages. The messages up to `messages_keyed` in `counters` have their keys there; the
--   writer reads the keys of the newer ones back from `messages` when it starts.
-- * Expiry deletes a message's key with its row.
-- * Each group keeps the highest message id it has sequenced: a send with a higher id
--   cannot be a resend, so it is not looked up at all (a sender's UUIDv7 ids rise).

CREATE TABLE message_keys (
    message_id BLOB NOT NULL,
    group_id   TEXT NOT NULL,
    kind       INTEGER NOT NULL,
    message    INTEGER NOT NULL,
    PRIMARY KEY (message_id, group_id, kind)
) STRICT, WITHOUT ROWID;
INSERT INTO message_keys (message_id, group_id, kind, message)
    SELECT message_id, group_id, kind, id FROM messages ORDER BY message_id, group_id, kind;

-- The same table without the unique key (a constraint cannot be dropped in place).
CREATE TABLE messages_v5 (
    id           INTEGER PRIMARY KEY,
    group_id     TEXT NOT NULL,
    message_id   BLOB NOT NULL,
    kind         INTEGER NOT NULL,
    group_seq    INTEGER NOT NULL,
    epoch_after  INTEGER NOT NULL,
    payload_hash BLOB NOT NULL,
    first_seq    INTEGER NOT NULL,
    last_seq     INTEGER NOT NULL,
    server_time  INTEGER NOT NULL,
    expires_at   INTEGER NOT NULL
) STRICT;
INSERT INTO messages_v5 (id, group_id, message_id, kind, group_seq, epoch_after,
    payload_hash, first_seq, last_seq, server_time, expires_at)
SELECT id, group_id, message_id, kind, group_seq, epoch_after, payload_hash, first_seq,
    last_seq, server_time, expires_at
FROM messages ORDER BY id;
DROP TABLE messages;
ALTER TABLE messages_v5 RENAME TO messages;
CREATE INDEX messages_by_expiry ON messages(expires_at);

-- Every message there is now has its key in `message_keys`.
INSERT INTO counters (name, value)
    VALUES ('messages_keyed', (SELECT COALESCE(MAX(id), 0) FROM messages));

ALTER TABLE groups ADD COLUMN highest_message_id BLOB;
WITH highest AS (SELECT group_id, MAX(message_id) AS id FROM messages GROUP BY group_id)
UPDATE groups SET highest_message_id = highest.id
    FROM highest WHERE highest.group_id = groups.group_id;
