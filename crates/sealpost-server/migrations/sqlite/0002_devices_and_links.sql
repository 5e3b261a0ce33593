-- Multi-device accounts: device names (sealed by the account's devices; opaque here) and
-- device-link sessions. A link session holds only a verifier (a hash of a key derived
-- from the link code) and ciphertext the server cannot read.

ALTER TABLE devices ADD COLUMN name_sealed BLOB;

CREATE TABLE links (
    link_id         BLOB PRIMARY KEY NOT NULL,
    owner_device    BLOB NOT NULL,
    verifier        BLOB NOT NULL,
    expires_at      INTEGER NOT NULL,
    failed_attempts INTEGER NOT NULL DEFAULT 0,
    state           INTEGER NOT NULL DEFAULT 0,
    sealed_request  BLOB,
    sealed_response BLOB
) STRICT;
CREATE INDEX links_by_expiry ON links(expires_at);
