-- The device index holds only envelopes that wait (see store/writer/sweep.rs):
--
-- * Most envelopes are acknowledged within milliseconds of being stored. Indexing each by
--   (device, position) cost an index insert and an index delete per envelope, and since a
--   batch's envelopes go to many devices, a page of the index for each device in the
--   batch: about a tenth of the writer thread's time at full load and of the bytes it
--   writes (docs/BENCHMARKS.md, "What made it fast").
-- * Now an envelope is stored unindexed (`indexed` 0). The writer's sweep, seconds
--   behind, sets `indexed` on the envelopes still there, up to a mailbox position it keeps
--   in `counters` as `mailbox_indexed`; the partial index covers those rows only.
-- * Reading a device's envelopes takes the indexed ones from the index and the newer ones
--   by scanning the positions after `mailbox_indexed` (seconds of envelopes, of which only
--   the unacknowledged are left).

ALTER TABLE mailbox ADD COLUMN indexed INTEGER NOT NULL DEFAULT 0;
UPDATE mailbox SET indexed = 1;
DROP INDEX mailbox_by_device;
CREATE INDEX mailbox_by_device ON mailbox(device_id, seq) WHERE indexed = 1;

-- Every envelope there is now is indexed; positions handed out later are above this.
INSERT INTO counters (name, value) VALUES ('mailbox_indexed',
    MAX(COALESCE((SELECT value FROM counters WHERE name = 'mailbox_seq'), 0),
        COALESCE((SELECT MAX(seq) FROM mailbox), 0)));
