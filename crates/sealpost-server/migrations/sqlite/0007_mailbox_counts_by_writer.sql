-- Mailbox sizes are kept by the code that changes mailboxes instead of by triggers. The
-- group-commit writer keeps each device's count in memory during a batch and writes it
-- once per batch; with the triggers every envelope stored or acknowledged also rewrote
-- its device's counter row. Device removal deletes the counter with the mailbox, and
-- expiry recounts the devices it took envelopes from.

DROP TRIGGER mailbox_count_insert;
DROP TRIGGER mailbox_count_delete;
