-- Ciphertexts move out of `messages` into `payloads`, and are dropped in sweeps instead
-- of one by one (see store/writer/sweep.rs):
--
-- * An acknowledgement used to rewrite its message's row (count one recipient off, drop
--   the ciphertext with the last). Acknowledgements arrive in no particular order, so each
--   rewrote a different page of `messages`: at full load three quarters of the pages a
--   transaction wrote to the WAL. Now an acknowledgement deletes only its mailbox row.
-- * The writer drops, a few seconds behind, the ciphertexts of every message in a range of
--   ids whose envelopes are all gone. The rows of a range lie together, so each page of
--   `payloads` is rewritten once per sweep, not once per acknowledgement. A message that
--   still had envelopes when its range was swept (a device offline) loses its ciphertext
--   when its last envelope goes.
-- * `pending` is gone: "no mailbox row between `first_seq` and `last_seq`" says the same.

CREATE TABLE payloads (
    id      INTEGER PRIMARY KEY,
    payload BLOB NOT NULL
) STRICT;
INSERT INTO payloads (id, payload)
    SELECT id, payload FROM messages WHERE payload IS NOT NULL ORDER BY id;
ALTER TABLE messages DROP COLUMN payload;
ALTER TABLE messages DROP COLUMN pending;

-- Messages up to this id have been swept; every one before this migration was handled
-- one by one already.
INSERT INTO counters (name, value)
    VALUES ('payloads_swept', (SELECT COALESCE(MAX(id), 0) FROM messages));
