//! Client crypto (issue 6, scenario 6): the Sealpost engine next to raw OpenMLS doing the
//! same MLS work, with the same ciphersuite, crypto provider (RustCrypto) and group
//! configuration, in the same criterion group so the engine's overhead is visible.
//!
//! Rows of every group:
//! - `engine`: the Sealpost engine API a front end calls (its own SQLite file, WAL).
//! - `raw_sqlite`: `MlsGroup` kept in memory, state in `openmls_sqlite_storage` (JSON codec)
//!   on a WAL SQLite file with `synchronous=FULL`, each operation in one IMMEDIATE
//!   transaction, which is the least a durable, atomic client does.
//! - `raw_memory`: the same with `openmls_rust_crypto`'s `MemoryStorage` (reference only).
//!
//! Databases are created in `$SEALPOST_BENCH_DIR` if set, else in cargo's target tmp dir
//! (on disk, so fsync is real). `SEALPOST_BENCH_DIR=/dev/shm` (tmpfs, fsync free) shows the
//! CPU cost without the disk. Peers that only feed the measured side (senders, adders)
//! keep their store in /dev/shm when it exists, to keep setup fast.
//!
//! `SEALPOST_BENCH_CLOCK=cpu` measures this thread's CPU time (user + system,
//! `CLOCK_THREAD_CPUTIME_ID`) instead of wall time: on a machine shared with other
//! work it is far steadier, and it still counts SQLite's system calls; it does not count
//! waiting for the disk, so use it together with tmpfs.
//!
//! `cargo bench -p sealpost-core --bench crypto [-- <filter>]`, e.g. `-- encrypt`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::cell::Cell;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clock::Clock;
use common::{NOW, Phantom, User, World, message_envelope, text_of_len, welcome_envelope};
use criterion::{
    Bencher, BenchmarkGroup, BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group,
    criterion_main,
};
use sealpost_core::payload::ConversationInfo;
use sealpost_proto::api::{ClaimKeyPackagesResponse, Envelope};
use sealpost_proto::limits::MAILBOX_FETCH_MAX;

/// Size of the text of one message (the CBOR payload adds ~40 bytes).
const TEXT_LEN: usize = 150;
/// Group sizes for "add N members in one commit".
const ADD_SIZES: [usize; 3] = [10, 100, 1000];
/// Messages in the backlog benchmark.
const BACKLOG: usize = 1000;

fn bench_dir() -> PathBuf {
    let base = std::env::var_os("SEALPOST_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")));
    std::fs::create_dir_all(&base).unwrap();
    base
}

fn scratch_dir() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        bench_dir()
    }
}

/// A fresh directory for one store; removed when dropped.
fn store_in(base: &Path) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("sealpost-bench-")
        .tempdir_in(base)
        .unwrap()
}

/// Wall time, or this thread's CPU time with `SEALPOST_BENCH_CLOCK=cpu`.
mod clock {
    use std::sync::OnceLock;
    use std::time::{Duration, Instant};

    use criterion::measurement::{Measurement, ValueFormatter, WallTime};

    fn use_cpu() -> bool {
        static CPU: OnceLock<bool> = OnceLock::new();
        *CPU.get_or_init(|| std::env::var("SEALPOST_BENCH_CLOCK").as_deref() == Ok("cpu"))
    }

    /// The current reading of the selected clock.
    pub fn now() -> Duration {
        if use_cpu() {
            let time = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
            Duration::new(time.tv_sec as u64, time.tv_nsec as u32)
        } else {
            static START: OnceLock<Instant> = OnceLock::new();
            START.get_or_init(Instant::now).elapsed()
        }
    }

    pub struct Clock(WallTime);

    impl Default for Clock {
        fn default() -> Self {
            Self(WallTime)
        }
    }

    impl Measurement for Clock {
        type Intermediate = Duration;
        type Value = Duration;

        fn start(&self) -> Duration {
            now()
        }

        fn end(&self, start: Duration) -> Duration {
            now() - start
        }

        fn add(&self, v1: &Duration, v2: &Duration) -> Duration {
            *v1 + *v2
        }

        fn zero(&self) -> Duration {
            Duration::ZERO
        }

        fn to_f64(&self, value: &Duration) -> f64 {
            value.as_nanos() as f64
        }

        fn formatter(&self) -> &dyn ValueFormatter {
            self.0.formatter()
        }
    }
}

/// Times `routine` only: first runs `setup` for every iteration of the sample (untimed),
/// then `routine` on each prepared input in order (criterion's `iter_batched` cannot
/// lend one mutable state to both).
fn timed<S, I, O>(
    b: &mut Bencher<'_, Clock>,
    state: &mut S,
    mut setup: impl FnMut(&mut S) -> I,
    mut routine: impl FnMut(&mut S, I) -> O,
) {
    b.iter_custom(|iters| {
        let inputs: Vec<I> = (0..iters).map(|_| setup(state)).collect();
        let mut outputs = Vec::with_capacity(inputs.len());
        let start = clock::now();
        for input in inputs {
            outputs.push(routine(state, input));
        }
        let elapsed = clock::now() - start;
        drop(black_box(outputs));
        elapsed
    })
}

/// Raw OpenMLS: the same work as the engine without the engine.
mod raw {
    use openmls::prelude::tls_codec::{Deserialize as _, Serialize as _};
    use openmls::prelude::{
        BasicCredential, CredentialWithKey, Extension, Extensions, KeyPackage, MlsGroup,
        MlsGroupCreateConfig, MlsGroupJoinConfig, MlsMessageBodyIn, MlsMessageIn, MlsMessageOut,
        PURE_PLAINTEXT_WIRE_FORMAT_POLICY, ProcessedMessageContent, ProtocolVersion,
        SenderRatchetConfiguration, StagedWelcome, UnknownExtension,
    };
    use openmls_basic_credential::SignatureKeyPair;
    use openmls_rust_crypto::{OpenMlsRustCrypto, RustCrypto};
    use openmls_sqlite_storage::{Codec, SqliteStorageProvider};
    use openmls_traits::OpenMlsProvider;
    use rusqlite::{Connection, TransactionBehavior};
    use sealpost_core::engine::CIPHERSUITE;
    use sealpost_core::payload::{CONVERSATION_INFO_EXTENSION, ConversationInfo};

    use crate::common::sealpost_capabilities;

    /// The JSON codec the storage provider's own tests use (and the engine too).
    #[derive(Default)]
    pub struct JsonCodec;

    impl Codec for JsonCodec {
        type Error = serde_json::Error;

        fn to_vec<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, Self::Error> {
            serde_json::to_vec(value)
        }

        fn from_slice<T: serde::de::DeserializeOwned>(slice: &[u8]) -> Result<T, Self::Error> {
            serde_json::from_slice(slice)
        }
    }

    /// Where a raw client keeps its MLS state.
    pub trait Backend {
        type Provider<'a>: OpenMlsProvider
        where
            Self: 'a;

        /// Runs `f` with a provider: for SQLite in one IMMEDIATE transaction, committed
        /// afterwards.
        fn run<T>(&mut self, f: impl for<'a> FnOnce(&Self::Provider<'a>) -> T) -> T;
    }

    pub struct Memory(OpenMlsRustCrypto);

    impl Memory {
        pub fn new() -> Self {
            Self(OpenMlsRustCrypto::default())
        }
    }

    impl Backend for Memory {
        type Provider<'a> = OpenMlsRustCrypto;

        fn run<T>(&mut self, f: impl for<'a> FnOnce(&Self::Provider<'a>) -> T) -> T {
            f(&self.0)
        }
    }

    pub struct SqliteProvider<'a> {
        crypto: &'a RustCrypto,
        storage: SqliteStorageProvider<JsonCodec, &'a Connection>,
    }

    impl<'a> OpenMlsProvider for SqliteProvider<'a> {
        type CryptoProvider = RustCrypto;
        type RandProvider = RustCrypto;
        type StorageProvider = SqliteStorageProvider<JsonCodec, &'a Connection>;

        fn storage(&self) -> &Self::StorageProvider {
            &self.storage
        }

        fn crypto(&self) -> &Self::CryptoProvider {
            self.crypto
        }

        fn rand(&self) -> &Self::RandProvider {
            self.crypto
        }
    }

    pub struct Sqlite {
        conn: Connection,
        crypto: RustCrypto,
        _home: tempfile::TempDir,
    }

    impl Sqlite {
        /// A new WAL database with `synchronous=FULL` (as the engine opens its store) in
        /// the benchmarks' directory.
        pub fn new() -> Self {
            let home = crate::store_in(&crate::bench_dir());
            let mut conn = Connection::open(home.path().join("raw.db")).unwrap();
            conn.pragma_update(None, "journal_mode", "WAL").unwrap();
            conn.pragma_update(None, "synchronous", "FULL").unwrap();
            // The engine's cache settings, so that only the engine's own work differs.
            conn.pragma_update(None, "cache_size", -16384).unwrap();
            conn.pragma_update(None, "temp_store", "MEMORY").unwrap();
            SqliteStorageProvider::<JsonCodec, &mut Connection>::new(&mut conn)
                .run_migrations()
                .unwrap();
            Self {
                conn,
                crypto: RustCrypto::default(),
                _home: home,
            }
        }
    }

    impl Backend for Sqlite {
        type Provider<'a> = SqliteProvider<'a>;

        fn run<T>(&mut self, f: impl for<'a> FnOnce(&Self::Provider<'a>) -> T) -> T {
            let tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .unwrap();
            let result = {
                let provider = SqliteProvider {
                    crypto: &self.crypto,
                    storage: SqliteStorageProvider::new(&tx),
                };
                f(&provider)
            };
            tx.commit().unwrap();
            result
        }
    }

    /// The group configuration the engine uses.
    fn create_config() -> MlsGroupCreateConfig {
        let info = ConversationInfo::Group {
            name: "bench".into(),
        }
        .encode()
        .unwrap();
        MlsGroupCreateConfig::builder()
            .ciphersuite(CIPHERSUITE)
            .wire_format_policy(PURE_PLAINTEXT_WIRE_FORMAT_POLICY)
            .use_ratchet_tree_extension(true)
            .max_past_epochs(3)
            .sender_ratchet_configuration(SenderRatchetConfiguration::new(32, 10_000))
            .capabilities(sealpost_capabilities())
            .with_group_context_extensions(
                Extensions::single(Extension::Unknown(
                    CONVERSATION_INFO_EXTENSION,
                    UnknownExtension(info),
                ))
                .unwrap(),
            )
            .build()
    }

    fn join_config() -> MlsGroupJoinConfig {
        MlsGroupJoinConfig::builder()
            .wire_format_policy(PURE_PLAINTEXT_WIRE_FORMAT_POLICY)
            .use_ratchet_tree_extension(true)
            .max_past_epochs(3)
            .sender_ratchet_configuration(SenderRatchetConfiguration::new(32, 10_000))
            .build()
    }

    /// What arrives from the network: a KeyPackage to parse and verify.
    pub fn wire(package: &KeyPackage) -> Vec<u8> {
        MlsMessageOut::from(package.clone())
            .tls_serialize_detached()
            .unwrap()
    }

    /// A client with one group.
    pub struct Client<B: Backend> {
        pub backend: B,
        signer: SignatureKeyPair,
        credential: CredentialWithKey,
        pub group: Option<MlsGroup>,
    }

    impl<B: Backend> Client<B> {
        /// A client whose credential is a Sealpost device certificate of the usual size.
        pub fn new(backend: B, name: &str) -> Self {
            let account = sealpost_core::identity::AccountKey::generate();
            let signer = SignatureKeyPair::new(CIPHERSUITE.signature_algorithm()).unwrap();
            let certificate = account
                .certify(
                    name,
                    uuid::Uuid::new_v4(),
                    signer.public().try_into().unwrap(),
                )
                .encode();
            Self {
                backend,
                credential: CredentialWithKey {
                    credential: BasicCredential::new(certificate).into(),
                    signature_key: signer.public().to_vec().into(),
                },
                signer,
                group: None,
            }
        }

        pub fn key_package(&mut self) -> Vec<u8> {
            let (signer, credential) = (&self.signer, self.credential.clone());
            let bundle = self.backend.run(|provider| {
                KeyPackage::builder()
                    .leaf_node_capabilities(sealpost_capabilities())
                    .build(CIPHERSUITE, provider, signer, credential)
                    .unwrap()
            });
            wire(bundle.key_package())
        }

        /// Creates a new group (replacing the current one).
        pub fn create_group(&mut self) {
            let (signer, credential) = (&self.signer, self.credential.clone());
            self.group = Some(self.backend.run(|provider| {
                MlsGroup::new(provider, signer, &create_config(), credential).unwrap()
            }));
        }

        /// Adds the members (KeyPackages off the wire, parsed and verified here) in one
        /// commit and merges it; returns the commit and the Welcome as sent.
        pub fn add(&mut self, key_packages: &[Vec<u8>]) -> (Vec<u8>, Vec<u8>) {
            let (signer, group) = (&self.signer, self.group.as_mut().unwrap());
            self.backend.run(|provider| {
                let packages: Vec<KeyPackage> = key_packages
                    .iter()
                    .map(|bytes| {
                        let MlsMessageBodyIn::KeyPackage(package) =
                            MlsMessageIn::tls_deserialize_exact(bytes)
                                .unwrap()
                                .extract()
                        else {
                            panic!("not a KeyPackage")
                        };
                        package
                            .validate(provider.crypto(), ProtocolVersion::Mls10)
                            .unwrap()
                    })
                    .collect();
                let (commit, welcome, _) = group.add_members(provider, signer, &packages).unwrap();
                group.merge_pending_commit(provider).unwrap();
                (
                    commit.tls_serialize_detached().unwrap(),
                    welcome.tls_serialize_detached().unwrap(),
                )
            })
        }

        pub fn join(&mut self, welcome: &[u8]) {
            self.group = Some(self.backend.run(|provider| {
                let MlsMessageBodyIn::Welcome(welcome) =
                    MlsMessageIn::tls_deserialize_exact(welcome)
                        .unwrap()
                        .extract()
                else {
                    panic!("not a Welcome")
                };
                StagedWelcome::build_from_welcome(provider, &join_config(), welcome)
                    .unwrap()
                    .replace_old_group()
                    .build()
                    .unwrap()
                    .into_group(provider)
                    .unwrap()
            }));
        }

        pub fn encrypt(&mut self, payload: &[u8]) -> Vec<u8> {
            let (signer, group) = (&self.signer, self.group.as_mut().unwrap());
            self.backend.run(|provider| {
                group
                    .create_message(provider, signer, payload)
                    .unwrap()
                    .tls_serialize_detached()
                    .unwrap()
            })
        }

        pub fn decrypt(&mut self, message: &[u8]) -> Vec<u8> {
            let group = self.group.as_mut().unwrap();
            self.backend.run(|provider| {
                let protocol = MlsMessageIn::tls_deserialize_exact(message)
                    .unwrap()
                    .try_into_protocol_message()
                    .unwrap();
                let processed = group.process_message(provider, protocol).unwrap();
                let ProcessedMessageContent::ApplicationMessage(message) = processed.into_content()
                else {
                    panic!("not an application message")
                };
                message.into_bytes()
            })
        }

        /// Decrypts many messages in one transaction.
        pub fn decrypt_all(&mut self, messages: &[Vec<u8>]) -> usize {
            let group = self.group.as_mut().unwrap();
            self.backend.run(|provider| {
                let mut bytes = 0;
                for message in messages {
                    let protocol = MlsMessageIn::tls_deserialize_exact(message)
                        .unwrap()
                        .try_into_protocol_message()
                        .unwrap();
                    let processed = group.process_message(provider, protocol).unwrap();
                    let ProcessedMessageContent::ApplicationMessage(message) =
                        processed.into_content()
                    else {
                        panic!("not an application message")
                    };
                    bytes += message.into_bytes().len();
                }
                bytes
            })
        }
    }

    /// `sender` and `receiver` share a two-member group.
    pub fn pair<A: Backend, B: Backend>(sender: &mut Client<A>, receiver: &mut Client<B>) {
        sender.create_group();
        let package = receiver.key_package();
        let (_, welcome) = sender.add(&[package]);
        receiver.join(&welcome);
    }
}

/// The payload a raw client sends: the size of the engine's CBOR payload for the text.
fn raw_payload(n: usize) -> Vec<u8> {
    text_of_len(n, TEXT_LEN + 40).into_bytes()
}

/// Two engines in a 1:1 conversation, each with its own world.
struct EnginePair {
    sender: User,
    receiver: User,
    group_id: String,
    _world: World,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

impl EnginePair {
    fn new(sender_dir: &Path, receiver_dir: &Path) -> Self {
        let mut world = World::new();
        let (a, b) = (store_in(sender_dir), store_in(receiver_dir));
        let mut sender = User::register(&mut world, &a.path().join("db"), "alice");
        let mut receiver = User::register(&mut world, &b.path().join("db"), "bob");
        let group_id = common::start_direct(&world, &mut sender, &mut receiver);
        // Both have seen the directory's current root, so gossip checks find it.
        receiver.learn(&world, "alice");
        sender.learn(&world, "bob");
        Self {
            sender,
            receiver,
            group_id,
            _world: world,
            _dirs: (a, b),
        }
    }

    /// The sender encrypts message `n` and the server would deliver this envelope.
    fn next_envelope(&mut self, n: usize) -> Envelope {
        let message = self
            .sender
            .engine
            .encrypt_text(&self.group_id, &text_of_len(n, TEXT_LEN), None, NOW * 1000)
            .unwrap();
        self.sender
            .engine
            .message_accepted(message.request.message_id)
            .unwrap();
        message_envelope(&message, n as u64)
    }
}

/// Two raw clients in a two-member group; the one to measure uses `B`.
fn raw_pair<A: raw::Backend, B: raw::Backend>(
    sender: A,
    receiver: B,
) -> (raw::Client<A>, raw::Client<B>) {
    let mut sender = raw::Client::new(sender, "alice");
    let mut receiver = raw::Client::new(receiver, "bob");
    raw::pair(&mut sender, &mut receiver);
    (sender, receiver)
}

/// A group of benchmarks of one quick operation: 1 s warm-up, 4 s of measurement.
fn single_operation_group<'a>(
    c: &'a mut Criterion<Clock>,
    name: &str,
) -> criterion::BenchmarkGroup<'a, Clock> {
    let mut group = c.benchmark_group(name);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(4));
    group
}

// Every benchmark builds its state on first use (`get_or_insert_with` in the routine), so
// that a filtered run does not pay for the setup of the benchmarks it leaves out.

fn encrypt(c: &mut Criterion<Clock>) {
    let mut group = single_operation_group(c, "encrypt");
    let n = Cell::new(0);

    let mut engines = None;
    group.bench_function("engine", |b| {
        let pair = engines.get_or_insert_with(|| EnginePair::new(&bench_dir(), &scratch_dir()));
        b.iter(|| {
            n.set(n.get() + 1);
            let text = text_of_len(n.get(), TEXT_LEN);
            pair.sender
                .engine
                .encrypt_text(&pair.group_id, &text, None, NOW * 1000)
                .unwrap()
        })
    });
    drop(engines);

    fn raw_encrypt<B: raw::Backend>(
        group: &mut BenchmarkGroup<'_, Clock>,
        name: &str,
        backend: fn() -> B,
        n: &Cell<usize>,
    ) {
        let mut clients = None;
        group.bench_function(name, |b| {
            let (sender, _) =
                clients.get_or_insert_with(|| raw_pair(backend(), raw::Memory::new()));
            b.iter(|| {
                n.set(n.get() + 1);
                sender.encrypt(&raw_payload(n.get()))
            })
        });
    }
    raw_encrypt(&mut group, "raw_sqlite", raw::Sqlite::new, &n);
    raw_encrypt(&mut group, "raw_memory", raw::Memory::new, &n);
    group.finish();
}

fn decrypt(c: &mut Criterion<Clock>) {
    let mut group = single_operation_group(c, "decrypt");
    let n = Cell::new(0);

    // The engine's per-envelope entry point; the sync path's batches are in `backlog`.
    let mut engines = None;
    group.bench_function("engine", |b| {
        let pair = engines.get_or_insert_with(|| EnginePair::new(&scratch_dir(), &bench_dir()));
        timed(
            b,
            pair,
            |pair| {
                n.set(n.get() + 1);
                pair.next_envelope(n.get())
            },
            |pair, envelope| {
                pair.receiver
                    .engine
                    .process_envelope(&envelope, NOW)
                    .unwrap()
            },
        )
    });
    drop(engines);

    fn raw_decrypt<B: raw::Backend>(
        group: &mut BenchmarkGroup<'_, Clock>,
        name: &str,
        backend: fn() -> B,
        n: &Cell<usize>,
    ) {
        let mut clients = None;
        group.bench_function(name, |b| {
            let clients = clients.get_or_insert_with(|| raw_pair(raw::Memory::new(), backend()));
            timed(
                b,
                clients,
                |(sender, _)| {
                    n.set(n.get() + 1);
                    sender.encrypt(&raw_payload(n.get()))
                },
                |(_, receiver), message| receiver.decrypt(&message),
            )
        });
    }
    raw_decrypt(&mut group, "raw_sqlite", raw::Sqlite::new, &n);
    raw_decrypt(&mut group, "raw_memory", raw::Memory::new, &n);
    group.finish();
}

/// Devices without engines for large groups, published in the directory.
fn phantoms(world: &mut World, count: usize) -> Vec<Phantom> {
    let phantoms: Vec<Phantom> = (0..count)
        .map(|i| Phantom::new(&format!("member{i:04}")))
        .collect();
    world.publish(phantoms.iter().map(|p| (p.name.clone(), p.entry())));
    phantoms
}

/// An engine that has looked up (and verified) every phantom, as before adding them.
fn adder(world: &mut World, dir: &Path, phantoms: &[Phantom]) -> (User, tempfile::TempDir) {
    let home = store_in(dir);
    let mut user = User::register(world, &home.path().join("db"), "adder");
    for phantom in phantoms {
        user.learn(world, &phantom.name);
    }
    (user, home)
}

fn create_group(c: &mut Criterion<Clock>) {
    let mut group = single_operation_group(c, "create_group");
    let n = Cell::new(0);

    // Creating a conversation always adds its first member: measured as create + add one
    // member + merge on every row.
    let mut engine = None;
    group.bench_function("engine", |b| {
        let (_, creator, claim, _) = engine.get_or_insert_with(|| {
            let mut world = World::new();
            let members = phantoms(&mut world, 1);
            let (creator, home) = adder(&mut world, &bench_dir(), &members);
            (world, creator, members[0].claim(), home)
        });
        b.iter(|| {
            n.set(n.get() + 1);
            let info = ConversationInfo::Group {
                name: format!("group {}", n.get()),
            };
            let commit = creator
                .engine
                .create_conversation(info, std::slice::from_ref(claim), NOW)
                .unwrap();
            creator.engine.commit_accepted(&commit, NOW).unwrap();
            commit
        })
    });
    drop(engine);

    fn raw_create<B: raw::Backend>(
        group: &mut BenchmarkGroup<'_, Clock>,
        name: &str,
        backend: fn() -> B,
    ) {
        let mut state = None;
        group.bench_function(name, |b| {
            let (creator, package) = state.get_or_insert_with(|| {
                let package = raw::wire(&Phantom::new("member0000").key_package());
                (raw::Client::new(backend(), "adder"), package)
            });
            b.iter(|| {
                creator.create_group();
                creator.add(std::slice::from_ref(package))
            })
        });
    }
    raw_create(&mut group, "raw_sqlite", raw::Sqlite::new);
    raw_create(&mut group, "raw_memory", raw::Memory::new);
    group.finish();
}

/// Settings for a group of one size: few samples for the large ones.
fn size_settings(group: &mut BenchmarkGroup<'_, Clock>, size: usize) {
    if size >= 1000 {
        group.sample_size(10);
        group.sampling_mode(SamplingMode::Flat);
        group.warm_up_time(Duration::from_millis(500));
        group.measurement_time(Duration::from_secs(5));
    } else if size >= 100 {
        group.sample_size(10);
        group.sampling_mode(SamplingMode::Flat);
        group.warm_up_time(Duration::from_millis(500));
        group.measurement_time(Duration::from_secs(3));
    } else {
        group.sample_size(20);
        group.sampling_mode(SamplingMode::Flat);
        group.warm_up_time(Duration::from_secs(1));
        group.measurement_time(Duration::from_secs(3));
    }
}

/// What the membership benchmarks share: members published in a directory, their
/// KeyPackages (claimed once: an adder does not care whether a KeyPackage was used
/// before), and the clients that add them.
struct Members {
    world: World,
    phantoms: Vec<Phantom>,
    claims: Vec<ClaimKeyPackagesResponse>,
    packages: Vec<Vec<u8>>,
}

impl Members {
    fn new(count: usize) -> Self {
        let mut world = World::new();
        let phantoms = phantoms(&mut world, count);
        let claims = phantoms.iter().map(Phantom::claim).collect();
        let packages = phantoms
            .iter()
            .map(|p| raw::wire(&p.key_package()))
            .collect();
        Self {
            world,
            phantoms,
            claims,
            packages,
        }
    }
}

fn add_members(c: &mut Criterion<Clock>) {
    let max = *ADD_SIZES.iter().max().unwrap();
    let mut group = c.benchmark_group("add_members");
    let n = Cell::new(0);
    // Member 0 is in the group before the timed commit adds `size` others.
    let mut members = None;
    let mut engine = None;
    let mut raw_sqlite = None;
    let mut raw_memory = None;
    for size in ADD_SIZES {
        size_settings(&mut group, size);
        group.throughput(Throughput::Elements(size as u64));
        group.bench_with_input(BenchmarkId::new("engine", size), &size, |b, &size| {
            let members = members.get_or_insert_with(|| Members::new(max + 1));
            let (adder, _) = engine
                .get_or_insert_with(|| adder(&mut members.world, &bench_dir(), &members.phantoms));
            timed(
                b,
                &mut adder.engine,
                |engine| {
                    n.set(n.get() + 1);
                    let info = ConversationInfo::Group {
                        name: format!("group {}", n.get()),
                    };
                    let commit = engine
                        .create_conversation(info, &members.claims[..1], NOW)
                        .unwrap();
                    engine.commit_accepted(&commit, NOW).unwrap();
                    commit.group_id
                },
                |engine, group_id| {
                    let commit = engine
                        .begin_add(&group_id, &members.claims[1..=size], NOW)
                        .unwrap();
                    engine.commit_accepted(&commit, NOW).unwrap();
                    commit
                },
            )
        });
        fn raw_add<B: raw::Backend>(
            group: &mut BenchmarkGroup<'_, Clock>,
            name: &str,
            size: usize,
            members: &mut Option<Members>,
            client: &mut Option<raw::Client<B>>,
            backend: fn() -> B,
        ) {
            group.bench_with_input(BenchmarkId::new(name, size), &size, |b, &size| {
                let max = *ADD_SIZES.iter().max().unwrap();
                let members = members.get_or_insert_with(|| Members::new(max + 1));
                let client = client.get_or_insert_with(|| raw::Client::new(backend(), "adder"));
                let (first, others) = members.packages.split_first().unwrap();
                timed(
                    b,
                    client,
                    |client| {
                        client.create_group();
                        client.add(std::slice::from_ref(first));
                        client.group.take()
                    },
                    |client, group| {
                        client.group = group;
                        client.add(&others[..size])
                    },
                )
            });
        }
        raw_add(
            &mut group,
            "raw_sqlite",
            size,
            &mut members,
            &mut raw_sqlite,
            raw::Sqlite::new,
        );
        raw_add(
            &mut group,
            "raw_memory",
            size,
            &mut members,
            &mut raw_memory,
            raw::Memory::new,
        );
    }
    group.finish();
}

fn join_welcome(c: &mut Criterion<Clock>) {
    let max = *ADD_SIZES.iter().max().unwrap();
    let mut group = c.benchmark_group("join_welcome");
    let n = Cell::new(0);
    // The joiner is one of `size` members added in one commit to a new group.
    let mut members = None;
    let mut engines = None;
    let mut raw_sqlite = None;
    let mut raw_memory = None;
    for size in ADD_SIZES {
        size_settings(&mut group, size);
        group.throughput(Throughput::Elements(size as u64));
        group.bench_with_input(BenchmarkId::new("engine", size), &size, |b, &size| {
            let members = members.get_or_insert_with(|| Members::new(max));
            let engines = engines.get_or_insert_with(|| {
                let home = store_in(&bench_dir());
                let world = &mut members.world;
                let joiner = User::register(world, &home.path().join("db"), "joiner");
                let (mut adder, adder_home) = adder(world, &scratch_dir(), &members.phantoms);
                adder.learn(world, "joiner");
                (joiner, adder, home, adder_home)
            });
            timed(
                b,
                engines,
                |(joiner, adder, _, _)| {
                    n.set(n.get() + 1);
                    let mut batch = vec![joiner.claim()];
                    batch.extend_from_slice(&members.claims[..size - 1]);
                    let info = ConversationInfo::Group {
                        name: format!("group {}", n.get()),
                    };
                    let commit = adder.engine.create_conversation(info, &batch, NOW).unwrap();
                    adder.engine.commit_accepted(&commit, NOW).unwrap();
                    welcome_envelope(&commit, n.get() as u64)
                },
                |(joiner, _, _, _), welcome| joiner.engine.process_envelope(&welcome, NOW).unwrap(),
            )
        });
        fn raw_join<B: raw::Backend>(
            group: &mut BenchmarkGroup<'_, Clock>,
            name: &str,
            size: usize,
            members: &mut Option<Members>,
            clients: &mut Option<(raw::Client<B>, raw::Client<raw::Memory>)>,
            backend: fn() -> B,
        ) {
            group.bench_with_input(BenchmarkId::new(name, size), &size, |b, &size| {
                let max = *ADD_SIZES.iter().max().unwrap();
                let members = members.get_or_insert_with(|| Members::new(max));
                let clients = clients.get_or_insert_with(|| {
                    (
                        raw::Client::new(backend(), "joiner"),
                        raw::Client::new(raw::Memory::new(), "adder"),
                    )
                });
                let others = &members.packages[..size - 1];
                timed(
                    b,
                    clients,
                    |(joiner, adder)| {
                        let mut batch = vec![joiner.key_package()];
                        batch.extend_from_slice(others);
                        adder.create_group();
                        adder.add(&batch).1
                    },
                    |(joiner, _), welcome| joiner.join(&welcome),
                )
            });
        }
        raw_join(
            &mut group,
            "raw_sqlite",
            size,
            &mut members,
            &mut raw_sqlite,
            raw::Sqlite::new,
        );
        raw_join(
            &mut group,
            "raw_memory",
            size,
            &mut members,
            &mut raw_memory,
            raw::Memory::new,
        );
    }
    group.finish();
}

fn backlog(c: &mut Criterion<Clock>) {
    let mut group = c.benchmark_group("backlog");
    group.sample_size(10);
    group.sampling_mode(SamplingMode::Flat);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(8));
    group.throughput(Throughput::Elements(BACKLOG as u64));
    let n = Cell::new(0);

    // A backlog of messages from one sender, fetched and processed the way the client's
    // sync path does it: `process_batch` on mailbox pages of MAILBOX_FETCH_MAX.
    let mut engines = None;
    group.bench_function(BenchmarkId::new("engine", BACKLOG), |b| {
        let pair = engines.get_or_insert_with(|| EnginePair::new(&scratch_dir(), &bench_dir()));
        timed(
            b,
            pair,
            |pair| {
                (0..BACKLOG)
                    .map(|_| {
                        n.set(n.get() + 1);
                        pair.next_envelope(n.get())
                    })
                    .collect::<Vec<_>>()
            },
            |pair, envelopes| {
                for page in envelopes.chunks(MAILBOX_FETCH_MAX) {
                    black_box(pair.receiver.engine.process_batch(page, NOW).unwrap());
                }
            },
        )
    });
    drop(engines);

    // Raw OpenMLS with the same pages, each in one transaction.
    fn raw_backlog<B: raw::Backend>(
        group: &mut BenchmarkGroup<'_, Clock>,
        name: &str,
        backend: fn() -> B,
        n: &Cell<usize>,
    ) {
        let mut clients = None;
        group.bench_function(BenchmarkId::new(name, BACKLOG), |b| {
            let clients = clients.get_or_insert_with(|| raw_pair(raw::Memory::new(), backend()));
            timed(
                b,
                clients,
                |(sender, _)| {
                    (0..BACKLOG)
                        .map(|_| {
                            n.set(n.get() + 1);
                            sender.encrypt(&raw_payload(n.get()))
                        })
                        .collect::<Vec<_>>()
                },
                |(_, receiver), messages| {
                    for page in messages.chunks(MAILBOX_FETCH_MAX) {
                        black_box(receiver.decrypt_all(page));
                    }
                },
            )
        });
    }
    raw_backlog(&mut group, "raw_sqlite", raw::Sqlite::new, &n);
    raw_backlog(&mut group, "raw_memory", raw::Memory::new, &n);
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().with_measurement(Clock::default());
    targets = encrypt, decrypt, create_group, add_members, join_welcome, backlog
}
criterion_main!(benches);
