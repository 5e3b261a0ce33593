-- Key transparency bookkeeping around the akd tables: usernames waiting for the next
-- epoch, and every epoch's root hash (signed on demand; kept for audits and gossip checks).

CREATE TABLE kt_pending (
    username TEXT PRIMARY KEY NOT NULL,
    seq      INTEGER NOT NULL
) STRICT;

CREATE TABLE kt_roots (
    epoch        INTEGER PRIMARY KEY NOT NULL,
    root_hash    BLOB NOT NULL,
    published_at INTEGER NOT NULL
) STRICT;

CREATE TABLE kt_published (
    username TEXT PRIMARY KEY NOT NULL,
    epoch    INTEGER NOT NULL
) STRICT;

-- Every existing account is published at the first epoch.
INSERT INTO kt_pending (username, seq) SELECT username, 0 FROM accounts;
