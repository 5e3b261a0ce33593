-- Key transparency: storage of the AKD directory (akd crate), see src/store/akd_sqlite.rs.
-- Records are CBOR-encoded akd types; the columns beside them exist only for lookups.

-- The Azks record and the tree nodes, keyed by akd's `get_full_binary_id()` (a type byte,
-- then the record's key). Records are overwritten in place when akd updates them.
CREATE TABLE akd_records (
    id     BLOB PRIMARY KEY NOT NULL,
    record BLOB NOT NULL
) STRICT;

-- One row per (label, epoch) at which the label's value changed: akd's `ValueState`.
-- `username` is the raw AKD label; `epoch` and `version` are copies of the record's fields.
CREATE TABLE akd_value_states (
    username BLOB NOT NULL,
    epoch    INTEGER NOT NULL,
    version  INTEGER NOT NULL,
    record   BLOB NOT NULL,
    PRIMARY KEY (username, epoch)
) STRICT;
CREATE INDEX akd_value_states_by_version ON akd_value_states(username, version);
