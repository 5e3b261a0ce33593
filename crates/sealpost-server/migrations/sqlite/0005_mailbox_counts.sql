-- Per-device mailbox sizes, kept with every insert and delete so that the per-device quota
-- is checked in constant time.

CREATE TABLE mailbox_counts (
    device_id BLOB PRIMARY KEY NOT NULL,
    n         INTEGER NOT NULL
) STRICT;

INSERT INTO mailbox_counts (device_id, n)
    SELECT device_id, COUNT(*) FROM mailbox GROUP BY device_id;

CREATE TRIGGER mailbox_count_insert AFTER INSERT ON mailbox BEGIN
    INSERT INTO mailbox_counts (device_id, n) VALUES (NEW.device_id, 1)
        ON CONFLICT(device_id) DO UPDATE SET n = n + 1;
END;

CREATE TRIGGER mailbox_count_delete AFTER DELETE ON mailbox BEGIN
    UPDATE mailbox_counts SET n = n - 1 WHERE device_id = OLD.device_id;
END;
