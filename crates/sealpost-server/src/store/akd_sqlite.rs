//! SQLite storage for the key-transparency directory: an [`akd::storage::Database`].
//!
//! The `akd` crate keeps its authenticated directory (the append-only Merkle tree of
//! label → value commitments behind lookup, history and audit proofs) in a pluggable
//! storage layer. [`AkdSqliteStorage`] puts that layer in the server's SQLite database
//! file, so the directory lives and is backed up with the rest of the server state and
//! survives restarts. Its semantics mirror akd's reference in-memory backend
//! (`akd::storage::memory::AsyncInMemoryDatabase`) exactly, and akd's own storage
//! conformance suite runs against it in the tests below.
//!
//! Layout (migration `0003_key_transparency_storage.sql`):
//! - `akd_records`: the `Azks` record and the tree nodes, keyed by
//!   `DbRecord::get_full_binary_id()`.
//! - `akd_value_states`: one row per `ValueState`, keyed by (label, epoch), with the
//!   version copied into a column so that every retrieval flag is a single indexed query.
//!
//! Records are stored as CBOR (`ciborium`) of akd's serde representation. Epochs and
//! versions are SQLite integers, so values above `i64::MAX` are refused on write.
//!
//! Writes go through the single-connection writer pool (a whole `batch_set` is one
//! transaction, so a published epoch is written atomically); reads use the reader pool
//! and see committed snapshots (WAL). Batched reads pass their keys as one JSON array
//! (`json_each`, hex-encoded bytes decoded with `unhex`) because query strings must be
//! static; this needs SQLite 3.41 or later, which the bundled SQLite provides.

use std::collections::HashMap;

use akd::errors::StorageError;
use akd::storage::types::{
    DbRecord, KeyData, StorageType, ValueState, ValueStateKey, ValueStateRetrievalFlag,
};
use akd::storage::{Database, DbSetState, Storable};
use akd::{AkdLabel, AkdValue};
use async_trait::async_trait;
use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::Row as _;
use sqlx::sqlite::SqlitePool;

use super::write_turn::SqlxWriter;

const UPSERT_RECORD: &str = "INSERT INTO akd_records (id, record) VALUES (?1, ?2) \
     ON CONFLICT (id) DO UPDATE SET record = excluded.record";
const UPSERT_VALUE_STATE: &str = "INSERT INTO akd_value_states (username, epoch, version, record) \
     VALUES (?1, ?2, ?3, ?4) \
     ON CONFLICT (username, epoch) DO UPDATE SET version = excluded.version, record = excluded.record";

const RECORD_BY_ID: &str = "SELECT record FROM akd_records WHERE id = ?1";
/// `?1`: JSON array of hex ids. One row per id found, in the order of the array (an id
/// given twice is returned twice, as the in-memory backend does).
const RECORDS_BY_IDS: &str = "SELECT r.record FROM json_each(?1) AS j \
     CROSS JOIN akd_records AS r ON r.id = unhex(j.value) ORDER BY j.key";

const VALUE_STATE_BY_KEY: &str =
    "SELECT record FROM akd_value_states WHERE username = ?1 AND epoch = ?2";
/// `?1`: JSON array of `[hex username, epoch]` pairs; like [`RECORDS_BY_IDS`].
const VALUE_STATES_BY_KEYS: &str = "SELECT s.record FROM json_each(?1) AS j \
     CROSS JOIN akd_value_states AS s \
     ON s.username = unhex(json_extract(j.value, '$[0]')) \
     AND s.epoch = json_extract(j.value, '$[1]') ORDER BY j.key";

const USER_STATES: &str = "SELECT record FROM akd_value_states WHERE username = ?1 ORDER BY epoch";

// One state per label chosen by a `ValueStateRetrievalFlag`. `?1` is a JSON array of hex
// labels; each yields one row whose `record` is NULL when the label has no such state.
// `?2` is the flag's parameter.
const STATE_MAX_EPOCH: &str = "SELECT (SELECT s.record FROM akd_value_states AS s \
     WHERE s.username = unhex(j.value) ORDER BY s.epoch DESC LIMIT 1) AS record \
     FROM json_each(?1) AS j";
const STATE_MIN_EPOCH: &str = "SELECT (SELECT s.record FROM akd_value_states AS s \
     WHERE s.username = unhex(j.value) ORDER BY s.epoch ASC LIMIT 1) AS record \
     FROM json_each(?1) AS j";
/// The in-memory backend scans states by ascending epoch and takes the first one with the
/// version, so if a version was stored at several epochs the earliest wins.
const STATE_SPECIFIC_VERSION: &str = "SELECT (SELECT s.record FROM akd_value_states AS s \
     WHERE s.username = unhex(j.value) AND s.version = ?2 ORDER BY s.epoch ASC LIMIT 1) \
     AS record FROM json_each(?1) AS j";
const STATE_SPECIFIC_EPOCH: &str = "SELECT (SELECT s.record FROM akd_value_states AS s \
     WHERE s.username = unhex(j.value) AND s.epoch = ?2) AS record FROM json_each(?1) AS j";
const STATE_LEQ_EPOCH: &str = "SELECT (SELECT s.record FROM akd_value_states AS s \
     WHERE s.username = unhex(j.value) AND s.epoch <= ?2 ORDER BY s.epoch DESC LIMIT 1) \
     AS record FROM json_each(?1) AS j";

/// [`akd::storage::Database`] on the server's SQLite database.
#[derive(Clone, Debug)]
pub struct AkdSqliteStorage {
    writer: SqlxWriter,
    reader: SqlitePool,
}

impl AkdSqliteStorage {
    /// `writer` is the store's `sqlx` write connection (writes are serialised through it,
    /// in turns with the group-commit writer); `reader` may be a read-only pool on the same
    /// database file in WAL mode. The migrations must have been run.
    pub(crate) fn new(writer: SqlxWriter, reader: SqlitePool) -> Self {
        Self { writer, reader }
    }

    async fn record_by_id(&self, id: &[u8]) -> Result<Option<DbRecord>, StorageError> {
        let row = sqlx::query(RECORD_BY_ID)
            .bind(id)
            .fetch_optional(&self.reader)
            .await
            .map_err(sql_error)?;
        row.map(|row| decode(&row.try_get::<Vec<u8>, _>(0).map_err(sql_error)?))
            .transpose()
    }

    async fn value_state_by_key(
        &self,
        username: &[u8],
        epoch: u64,
    ) -> Result<Option<ValueState>, StorageError> {
        let Ok(epoch) = i64::try_from(epoch) else {
            return Ok(None);
        };
        let row = sqlx::query(VALUE_STATE_BY_KEY)
            .bind(username)
            .bind(epoch)
            .fetch_optional(&self.reader)
            .await
            .map_err(sql_error)?;
        row.map(|row| decode(&row.try_get::<Vec<u8>, _>(0).map_err(sql_error)?))
            .transpose()
    }

    /// Fetches the `record` column of every row of a query binding a JSON array.
    async fn records_for(
        &self,
        query: &'static str,
        json: String,
    ) -> Result<Vec<Vec<u8>>, StorageError> {
        let rows = sqlx::query(query)
            .bind(json)
            .fetch_all(&self.reader)
            .await
            .map_err(sql_error)?;
        rows.iter()
            .map(|row| row.try_get::<Vec<u8>, _>(0).map_err(sql_error))
            .collect()
    }

    /// The state chosen by `flag` for each label that has one.
    async fn states_by_flag(
        &self,
        usernames: &[AkdLabel],
        flag: ValueStateRetrievalFlag,
    ) -> Result<Vec<ValueState>, StorageError> {
        // Stored epochs and versions are at most i64::MAX (see `to_sql_int`).
        let (query, parameter) = match flag {
            ValueStateRetrievalFlag::MaxEpoch => (STATE_MAX_EPOCH, None),
            ValueStateRetrievalFlag::MinEpoch => (STATE_MIN_EPOCH, None),
            ValueStateRetrievalFlag::SpecificVersion(version) => match i64::try_from(version) {
                Ok(version) => (STATE_SPECIFIC_VERSION, Some(version)),
                Err(_) => return Ok(Vec::new()),
            },
            ValueStateRetrievalFlag::SpecificEpoch(epoch) => match i64::try_from(epoch) {
                Ok(epoch) => (STATE_SPECIFIC_EPOCH, Some(epoch)),
                Err(_) => return Ok(Vec::new()),
            },
            ValueStateRetrievalFlag::LeqEpoch(epoch) => (
                STATE_LEQ_EPOCH,
                Some(i64::try_from(epoch).unwrap_or(i64::MAX)),
            ),
        };
        if usernames.is_empty() {
            return Ok(Vec::new());
        }
        let labels: Vec<String> = usernames
            .iter()
            .map(|label| hex::encode(label.as_slice()))
            .collect();
        let mut sql = sqlx::query(query).bind(json(&labels)?);
        if let Some(parameter) = parameter {
            sql = sql.bind(parameter);
        }
        let rows = sql.fetch_all(&self.reader).await.map_err(sql_error)?;
        let mut states = Vec::with_capacity(rows.len());
        for row in &rows {
            if let Some(record) = row.try_get::<Option<Vec<u8>>, _>(0).map_err(sql_error)? {
                states.push(decode::<ValueState>(&record)?);
            }
        }
        Ok(states)
    }
}

#[async_trait]
impl Database for AkdSqliteStorage {
    async fn set(&self, record: DbRecord) -> Result<(), StorageError> {
        self.batch_set(vec![record], DbSetState::General).await
    }

    /// Writes all records in one transaction, in order (a later record with the same key
    /// replaces an earlier one). `state` makes no difference, as in the in-memory backend.
    async fn batch_set(
        &self,
        records: Vec<DbRecord>,
        _state: DbSetState,
    ) -> Result<(), StorageError> {
        if records.is_empty() {
            return Ok(());
        }
        let mut tx = self.writer.begin().await.map_err(sql_error)?;
        for record in &records {
            match record {
                DbRecord::ValueState(state) => {
                    sqlx::query(UPSERT_VALUE_STATE)
                        .bind(state.username.as_slice())
                        .bind(to_sql_int(state.epoch, "epoch")?)
                        .bind(to_sql_int(state.version, "version")?)
                        .bind(encode(state)?)
                        .execute(&mut *tx)
                        .await
                        .map_err(sql_error)?;
                }
                DbRecord::Azks(_) | DbRecord::TreeNode(_) => {
                    sqlx::query(UPSERT_RECORD)
                        .bind(record.get_full_binary_id())
                        .bind(encode(record)?)
                        .execute(&mut *tx)
                        .await
                        .map_err(sql_error)?;
                }
            }
        }
        tx.commit().await.map_err(sql_error)
    }

    async fn get<St: Storable>(&self, id: &St::StorageKey) -> Result<DbRecord, StorageError> {
        let bin_id = St::get_full_binary_key_id(id);
        // As in the in-memory backend, a value-state key that does not parse (akd refuses
        // an empty label here) falls through to the other records, where it is never found.
        if St::data_type() == StorageType::ValueState
            && let Ok(ValueStateKey(username, epoch)) = ValueState::key_from_full_binary(&bin_id)
        {
            return match self.value_state_by_key(&username, epoch).await? {
                Some(state) => Ok(DbRecord::ValueState(state)),
                None => Err(StorageError::NotFound(format!("ValueState {id:?}"))),
            };
        }
        match self.record_by_id(&bin_id).await? {
            Some(record) => Ok(record),
            None => Err(StorageError::NotFound(format!(
                "{:?} {:?}",
                St::data_type(),
                id
            ))),
        }
    }

    /// The records found, in the order of `ids`; missing ids are skipped.
    async fn batch_get<St: Storable>(
        &self,
        ids: &[St::StorageKey],
    ) -> Result<Vec<DbRecord>, StorageError> {
        let mut state_keys: Vec<(String, i64)> = Vec::new();
        let mut record_ids: Vec<String> = Vec::new();
        for id in ids {
            let bin_id = St::get_full_binary_key_id(id);
            if St::data_type() == StorageType::ValueState
                && let Ok(ValueStateKey(username, epoch)) =
                    ValueState::key_from_full_binary(&bin_id)
            {
                // An epoch beyond the integer range cannot have been stored.
                if let Ok(epoch) = i64::try_from(epoch) {
                    state_keys.push((hex::encode(username), epoch));
                }
                continue;
            }
            record_ids.push(hex::encode(bin_id));
        }

        let mut records = Vec::new();
        if !state_keys.is_empty() {
            for bytes in self
                .records_for(VALUE_STATES_BY_KEYS, json(&state_keys)?)
                .await?
            {
                records.push(DbRecord::ValueState(decode(&bytes)?));
            }
        }
        if !record_ids.is_empty() {
            for bytes in self.records_for(RECORDS_BY_IDS, json(&record_ids)?).await? {
                records.push(decode(&bytes)?);
            }
        }
        Ok(records)
    }

    /// All states of the label, by ascending epoch; `NotFound` if it has none.
    async fn get_user_data(&self, username: &AkdLabel) -> Result<KeyData, StorageError> {
        let rows = sqlx::query(USER_STATES)
            .bind(username.as_slice())
            .fetch_all(&self.reader)
            .await
            .map_err(sql_error)?;
        if rows.is_empty() {
            return Err(StorageError::NotFound(format!("ValueState {username:?}")));
        }
        let states = rows
            .iter()
            .map(|row| decode(&row.try_get::<Vec<u8>, _>(0).map_err(sql_error)?))
            .collect::<Result<Vec<ValueState>, _>>()?;
        Ok(KeyData { states })
    }

    /// - `MaxEpoch` / `MinEpoch`: the state with the greatest / smallest epoch;
    /// - `SpecificEpoch(e)`: the state at epoch `e`;
    /// - `LeqEpoch(e)`: the state with the greatest epoch `<= e`;
    /// - `SpecificVersion(v)`: the earliest-epoch state with version `v`;
    ///
    /// and `NotFound` when there is none.
    async fn get_user_state(
        &self,
        username: &AkdLabel,
        flag: ValueStateRetrievalFlag,
    ) -> Result<ValueState, StorageError> {
        self.states_by_flag(std::slice::from_ref(username), flag)
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| StorageError::NotFound(format!("ValueState {username:?}")))
    }

    /// For each label that has a state chosen by `flag` (as in `get_user_state`): its
    /// version and value. Labels without one are left out.
    async fn get_user_state_versions(
        &self,
        usernames: &[AkdLabel],
        flag: ValueStateRetrievalFlag,
    ) -> Result<HashMap<AkdLabel, (u64, AkdValue)>, StorageError> {
        Ok(self
            .states_by_flag(usernames, flag)
            .await?
            .into_iter()
            .map(|state| (state.username, (state.version, state.value)))
            .collect())
    }
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StorageError> {
    let mut bytes = Vec::new();
    ciborium::into_writer(value, &mut bytes)
        .map_err(|e| StorageError::Other(format!("encoding an AKD record: {e}")))?;
    Ok(bytes)
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StorageError> {
    ciborium::from_reader(bytes)
        .map_err(|e| StorageError::Other(format!("decoding a stored AKD record: {e}")))
}

fn json<T: Serialize + ?Sized>(value: &T) -> Result<String, StorageError> {
    serde_json::to_string(value)
        .map_err(|e| StorageError::Other(format!("encoding query keys: {e}")))
}

/// Epochs and versions are SQLite (signed 64-bit) integers so that SQL orders them.
fn to_sql_int(value: u64, what: &str) -> Result<i64, StorageError> {
    i64::try_from(value)
        .map_err(|_| StorageError::Other(format!("{what} {value} is too large for the AKD store")))
}

fn sql_error(error: sqlx::Error) -> StorageError {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => StorageError::Connection(error.to_string()),
        other => StorageError::Other(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use akd::append_only_zks::DEFAULT_AZKS_KEY;
    use akd::ecvrf::HardCodedAkdVRF;
    use akd::storage::StorageManager;
    use akd::storage::memory::AsyncInMemoryDatabase;
    use akd::tree_node::{NodeKey, TreeNodeWithPreviousValue};
    use akd::{
        AzksParallelismConfig, Directory, ExampleLabel, ExperimentalConfiguration, NodeLabel,
    };
    use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};

    use super::*;
    use crate::store::sqlite::SqliteStore;

    type Tc = ExperimentalConfiguration<ExampleLabel>;

    /// Opens writer and reader pools on `path` the way the server does, and migrates.
    async fn open_storage(path: &Path) -> AkdSqliteStorage {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(10));
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await
            .unwrap();
        sqlx::migrate!("./migrations/sqlite")
            .run(&writer)
            .await
            .unwrap();
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options.read_only(true))
            .await
            .unwrap();
        let writer = SqlxWriter::new(writer, crate::store::write_turn::WriteTurn::default());
        AkdSqliteStorage::new(writer, reader)
    }

    async fn close(storage: &AkdSqliteStorage) {
        storage.reader.close().await;
        storage.writer.close().await;
    }

    #[tokio::test]
    async fn akd_sqlite_passes_akd_storage_conformance_suite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.db");
        // The server's own store and the AKD storage share the database file.
        let store = SqliteStore::open(&path).await.unwrap();
        let storage = open_storage(&path).await;
        akd::storage::tests::run_test_cases_for_storage_impl(storage.clone()).await;
        close(&storage).await;
        store.close().await;
    }

    fn state(username: &[u8], value: &[u8], version: u64, epoch: u64) -> DbRecord {
        DbRecord::ValueState(DbRecord::build_user_state(
            username.to_vec(),
            value.to_vec(),
            version,
            256,
            [version as u8; 32],
            epoch,
        ))
    }

    fn node(label_byte: u8, epoch: u64) -> DbRecord {
        DbRecord::TreeNode(DbRecord::build_tree_node_with_previous_value(
            [label_byte; 32],
            8,
            epoch,
            1,
            [0; 32],
            0,
            1,
            None,
            None,
            [epoch as u8; 32],
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        ))
    }

    fn not_found<T>(result: Result<T, StorageError>) -> Result<T, bool> {
        result.map_err(|e| matches!(e, StorageError::NotFound(_)))
    }

    /// Runs the same operations on the in-memory reference backend and on SQLite and
    /// compares every answer, including the edge cases the conformance suite skips.
    #[tokio::test]
    async fn akd_sqlite_matches_the_in_memory_backend() {
        let dir = tempfile::tempdir().unwrap();
        let sqlite = open_storage(&dir.path().join("akd.db")).await;
        let memory = AsyncInMemoryDatabase::new();

        let batches = vec![
            vec![
                state(b"alice", b"a1", 1, 1),
                state(b"alice", b"a2", 2, 3),
                state(b"alice", b"a2'", 2, 4),
                state(b"alice", b"a3", 3, 6),
                state(b"", b"empty", 1, 2),
                state(b"bob", b"b0", 0, 0),
                DbRecord::Azks(DbRecord::build_azks(6, 12)),
                node(1, 1),
                node(2, 3),
            ],
            // Later records replace earlier ones with the same key, also within a batch.
            vec![
                state(b"bob", b"b1", 1, 5),
                state(b"bob", b"b1'", 1, 5),
                node(2, 5),
                DbRecord::Azks(DbRecord::build_azks(7, 13)),
            ],
            vec![],
        ];
        for batch in batches {
            memory
                .batch_set(batch.clone(), DbSetState::TransactionCommit)
                .await
                .unwrap();
            sqlite
                .batch_set(batch, DbSetState::TransactionCommit)
                .await
                .unwrap();
        }
        sqlite.set(state(b"carol", b"c1", 1, 7)).await.unwrap();
        memory.set(state(b"carol", b"c1", 1, 7)).await.unwrap();

        let labels: Vec<AkdLabel> = [&b"alice"[..], b"", b"bob", b"carol", b"nobody"]
            .iter()
            .map(|l| AkdLabel(l.to_vec()))
            .collect();
        let mut flags = vec![
            ValueStateRetrievalFlag::MaxEpoch,
            ValueStateRetrievalFlag::MinEpoch,
        ];
        for n in [0, 1, 2, 3, 4, 5, 6, 7, 100, i64::MAX as u64, u64::MAX] {
            flags.push(ValueStateRetrievalFlag::SpecificVersion(n));
            flags.push(ValueStateRetrievalFlag::SpecificEpoch(n));
            flags.push(ValueStateRetrievalFlag::LeqEpoch(n));
        }

        for label in &labels {
            assert_eq!(
                not_found(memory.get_user_data(label).await),
                not_found(sqlite.get_user_data(label).await),
                "get_user_data {label:?}"
            );
            for flag in &flags {
                assert_eq!(
                    not_found(memory.get_user_state(label, *flag).await),
                    not_found(sqlite.get_user_state(label, *flag).await),
                    "get_user_state {label:?} {flag:?}"
                );
            }
        }
        let mut queried = labels.clone();
        queried.push(AkdLabel::from("alice"));
        for flag in &flags {
            assert_eq!(
                memory.get_user_state_versions(&queried, *flag).await,
                sqlite.get_user_state_versions(&queried, *flag).await,
                "get_user_state_versions {flag:?}"
            );
        }
        assert_eq!(
            sqlite
                .get_user_state_versions(&[], ValueStateRetrievalFlag::MaxEpoch)
                .await,
            Ok(HashMap::new())
        );

        let state_keys: Vec<ValueStateKey> = [
            (&b"alice"[..], 3),
            (b"alice", 2),
            (b"", 2),
            (b"bob", 5),
            (b"alice", 1),
            (b"bob", u64::MAX),
            (b"alice", 3),
        ]
        .iter()
        .map(|(user, epoch)| ValueStateKey(user.to_vec(), *epoch))
        .collect();
        for key in &state_keys {
            assert_eq!(
                not_found(memory.get::<ValueState>(key).await),
                not_found(sqlite.get::<ValueState>(key).await),
                "get {key:?}"
            );
        }
        assert_eq!(
            memory.batch_get::<ValueState>(&state_keys).await,
            sqlite.batch_get::<ValueState>(&state_keys).await
        );

        let node_keys: Vec<NodeKey> = [3u8, 2, 1, 2]
            .iter()
            .map(|b| NodeKey(NodeLabel::new([*b; 32], 8)))
            .collect();
        for key in &node_keys {
            assert_eq!(
                not_found(memory.get::<TreeNodeWithPreviousValue>(key).await),
                not_found(sqlite.get::<TreeNodeWithPreviousValue>(key).await),
                "get {key:?}"
            );
        }
        assert_eq!(
            memory
                .batch_get::<TreeNodeWithPreviousValue>(&node_keys)
                .await,
            sqlite
                .batch_get::<TreeNodeWithPreviousValue>(&node_keys)
                .await
        );
        assert_eq!(
            sqlite.batch_get::<TreeNodeWithPreviousValue>(&[]).await,
            Ok(Vec::new())
        );
        assert_eq!(
            memory.get::<akd::Azks>(&DEFAULT_AZKS_KEY).await,
            sqlite.get::<akd::Azks>(&DEFAULT_AZKS_KEY).await
        );

        // Refused rather than silently reordered by SQLite's signed integers.
        assert!(matches!(
            sqlite.set(state(b"dave", b"d", 1, u64::MAX)).await,
            Err(StorageError::Other(_))
        ));
        close(&sqlite).await;
    }

    type TestDirectory = Directory<Tc, AkdSqliteStorage, HardCodedAkdVRF>;

    async fn directory(storage: AkdSqliteStorage) -> TestDirectory {
        Directory::<Tc, _, _>::new(
            StorageManager::new_no_cache(storage),
            HardCodedAkdVRF,
            AzksParallelismConfig::default(),
        )
        .await
        .unwrap()
    }

    async fn verified_lookup(directory: &TestDirectory, label: &str) -> akd::VerifyResult {
        let (proof, epoch_hash) = directory.lookup(AkdLabel::from(label)).await.unwrap();
        let vrf_public_key = directory.get_public_key().await.unwrap();
        akd::client::lookup_verify::<Tc>(
            vrf_public_key.as_bytes(),
            epoch_hash.hash(),
            epoch_hash.epoch(),
            AkdLabel::from(label),
            proof,
        )
        .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn akd_directory_state_survives_reopening_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.db");

        let storage = open_storage(&path).await;
        let published = {
            let akd = directory(storage.clone()).await;
            akd.publish(vec![
                (AkdLabel::from("alice"), AkdValue::from("alice key 1")),
                (AkdLabel::from("bob"), AkdValue::from("bob key 1")),
            ])
            .await
            .unwrap();
            let published = akd
                .publish(vec![
                    (AkdLabel::from("alice"), AkdValue::from("alice key 2")),
                    (AkdLabel::from("carol"), AkdValue::from("carol key 1")),
                ])
                .await
                .unwrap();
            assert_eq!(published.epoch(), 2);
            published
        };
        close(&storage).await;

        let storage = open_storage(&path).await;
        let akd = directory(storage.clone()).await;
        assert_eq!(akd.get_epoch_hash().await.unwrap(), published);

        let alice = verified_lookup(&akd, "alice").await;
        assert_eq!(
            (alice.epoch, alice.version, alice.value),
            (2, 2, AkdValue::from("alice key 2"))
        );
        let bob = verified_lookup(&akd, "bob").await;
        assert_eq!(
            (bob.epoch, bob.version, bob.value),
            (1, 1, AkdValue::from("bob key 1"))
        );

        // The reopened directory keeps publishing on top of the stored tree.
        let third = akd
            .publish(vec![(AkdLabel::from("bob"), AkdValue::from("bob key 2"))])
            .await
            .unwrap();
        assert_eq!(third.epoch(), 3);
        let bob = verified_lookup(&akd, "bob").await;
        assert_eq!(
            (bob.epoch, bob.version, bob.value),
            (3, 2, AkdValue::from("bob key 2"))
        );
        close(&storage).await;
    }
}
