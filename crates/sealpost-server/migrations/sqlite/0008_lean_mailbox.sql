-- Fewer B-trees per message on the hot path (see store/writer/sequence.rs):
--
-- * `messages` counts the recipients that have not acknowledged (`pending`); the
--   acknowledgement that takes it to zero drops the payload. This replaces the
--   `mailbox_by_message` index, which every stored and every acknowledged envelope
--   updated and every acknowledgement probed.
-- * A message's envelopes take consecutive mailbox positions, `first_seq` to `last_seq`
--   (an empty range when it has none), so expiry deletes them by primary key, which the
--   index is not needed for either.
-- * Neither table is AUTOINCREMENT: the writer hands out mailbox positions from a counter
--   it keeps in `counters` (positions are never reused, since clients acknowledge by
--   them), and message row ids are internal.
-- * `mailbox` no longer declares a foreign key: the writer and expiry keep it consistent,
--   and the key cost a lookup per stored envelope.

CREATE TABLE messages_v3 (
    id           INTEGER PRIMARY KEY,
    group_id     TEXT NOT NULL,
    message_id   BLOB NOT NULL,
    kind         INTEGER NOT NULL,
    group_seq    INTEGER NOT NULL,
    epoch_after  INTEGER NOT NULL,
    payload_hash BLOB NOT NULL,
    payload      BLOB,
    pending      INTEGER NOT NULL,
    first_seq    INTEGER NOT NULL,
    last_seq     INTEGER NOT NULL,
    server_time  INTEGER NOT NULL,
    expires_at   INTEGER NOT NULL,
    UNIQUE (message_id, group_id, kind)
) STRICT;

-- Before this migration a message's envelopes were inserted one after the other too, so
-- their positions are consecutive.
INSERT INTO messages_v3 (id, group_id, message_id, kind, group_seq, epoch_after,
    payload_hash, payload, pending, first_seq, last_seq, server_time, expires_at)
SELECT m.id, m.group_id, m.message_id, m.kind, m.group_seq, m.epoch_after, m.payload_hash,
    m.payload,
    (SELECT COUNT(*) FROM mailbox b WHERE b.message = m.id),
    COALESCE((SELECT MIN(b.seq) FROM mailbox b WHERE b.message = m.id), 1),
    COALESCE((SELECT MAX(b.seq) FROM mailbox b WHERE b.message = m.id), 0),
    m.server_time, m.expires_at
FROM messages m ORDER BY m.id;

CREATE TABLE mailbox_v3 (
    seq       INTEGER PRIMARY KEY,
    device_id BLOB NOT NULL,
    message   INTEGER NOT NULL
) STRICT;
INSERT INTO mailbox_v3 (seq, device_id, message)
    SELECT seq, device_id, message FROM mailbox ORDER BY seq;

CREATE TABLE counters (
    name  TEXT PRIMARY KEY NOT NULL,
    value INTEGER NOT NULL
) STRICT;
-- The last mailbox position ever handed out.
INSERT INTO counters (name, value) VALUES ('mailbox_seq',
    MAX(COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'mailbox'), 0),
        COALESCE((SELECT MAX(seq) FROM mailbox), 0)));

DROP TABLE mailbox;
DROP TABLE messages;
ALTER TABLE messages_v3 RENAME TO messages;
ALTER TABLE mailbox_v3 RENAME TO mailbox;
CREATE INDEX messages_by_expiry ON messages(expires_at);
CREATE INDEX mailbox_by_device ON mailbox(device_id, seq);
