//! Key-transparency benchmarks (`cargo bench -p sealpost-server --bench kt`): publish time
//! for 1,000 and 10,000 updates, lookup proof generation and verification time, and proof
//! sizes, on the SQLite storage the server ships with. Prints a table.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use akd::directory::Directory;
use akd::storage::StorageManager;
use akd::{AkdLabel, AkdValue, AzksParallelismConfig, HistoryParams};
use sealpost_proto::kt::DirectoryEntry;
use sealpost_server::kt::{FileVrf, KtConfiguration};
use sealpost_server::store::akd_sqlite::AkdSqliteStorage;
use sealpost_server::store::sqlite::SqliteStore;
use uuid::Uuid;

fn entry(i: u64, version: u8) -> AkdValue {
    let cert = vec![version; 150];
    AkdValue(DirectoryEntry::new([i as u8; 32], vec![(Uuid::from_u128(i as u128), cert)]).encode())
}

fn cbor_len<T: serde::Serialize>(value: &T) -> usize {
    let mut out = Vec::new();
    ciborium::into_writer(value, &mut out).unwrap();
    out.len()
}

async fn directory(dir: &std::path::Path) -> Directory<KtConfiguration, AkdSqliteStorage, FileVrf> {
    let store = SqliteStore::open(&dir.join("bench.db")).await.unwrap();
    let vrf = FileVrf::load_or_create(&dir.join("vrf.key")).unwrap();
    Directory::new(
        StorageManager::new_no_cache(store.akd_storage()),
        vrf,
        AzksParallelismConfig::disabled(),
    )
    .await
    .unwrap()
}

fn row(what: &str, value: String) {
    println!("| {what:<52} | {value:>14} |");
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` runs us briefly with no flag.
    let quick = !std::env::args().any(|a| a == "--bench");
    let sizes: &[u64] = if quick { &[100] } else { &[1_000, 10_000] };
    println!("| measurement | value |");
    println!("|---|---|");
    for &n in sizes {
        let tmp = tempfile::tempdir().unwrap();
        let directory = directory(tmp.path()).await;
        let labels: Vec<AkdLabel> = (0..n)
            .map(|i| AkdLabel::from(format!("user{i}").as_str()))
            .collect();
        let updates: Vec<_> = labels
            .iter()
            .enumerate()
            .map(|(i, l)| (l.clone(), entry(i as u64, 1)))
            .collect();
        let start = Instant::now();
        directory.publish(updates).await.unwrap();
        row(
            &format!("publish epoch of {n} new accounts (SQLite)"),
            ms(start.elapsed()),
        );
        let updates: Vec<_> = labels
            .iter()
            .enumerate()
            .map(|(i, l)| (l.clone(), entry(i as u64, 2)))
            .collect();
        let start = Instant::now();
        directory.publish(updates).await.unwrap();
        row(
            &format!("publish epoch of {n} changed accounts (SQLite)"),
            ms(start.elapsed()),
        );

        let vrf_public = directory.get_public_key().await.unwrap();
        let samples = 200.min(n as usize);
        let mut generate = Duration::ZERO;
        let mut verify = Duration::ZERO;
        let mut size = 0;
        for label in labels.iter().take(samples) {
            let start = Instant::now();
            let (proof, root) = directory.lookup(label.clone()).await.unwrap();
            generate += start.elapsed();
            size += cbor_len(&proof);
            let start = Instant::now();
            akd::client::lookup_verify::<KtConfiguration>(
                vrf_public.as_bytes(),
                root.hash(),
                root.epoch(),
                label.clone(),
                proof,
            )
            .unwrap();
            verify += start.elapsed();
        }
        let k = samples as u32;
        row(
            &format!("lookup proof: generate, {n} accounts"),
            us(generate / k),
        );
        row(
            &format!("lookup proof: verify, {n} accounts"),
            us(verify / k),
        );
        row(
            &format!("lookup proof: size (CBOR), {n} accounts"),
            format!("{} B", size / samples),
        );

        let (history, root) = directory
            .key_history(&labels[0], HistoryParams::Complete)
            .await
            .unwrap();
        let history_size = cbor_len(&history);
        let start = Instant::now();
        akd::client::key_history_verify::<KtConfiguration>(
            vrf_public.as_bytes(),
            root.hash(),
            root.epoch(),
            labels[0].clone(),
            history,
            akd::HistoryVerificationParams::default(),
        )
        .unwrap();
        row(
            &format!("history proof (2 versions): verify, {n} accounts"),
            us(start.elapsed()),
        );
        row(
            &format!("history proof (2 versions): size, {n} accounts"),
            format!("{history_size} B"),
        );

        let start = Instant::now();
        let audit = directory.audit(1, 2).await.unwrap();
        let generate = start.elapsed();
        row(
            &format!("append-only proof of one {n}-update epoch: generate"),
            ms(generate),
        );
        row(
            &format!("append-only proof of one {n}-update epoch: size"),
            format!("{} KB", cbor_len(&audit) / 1024),
        );
    }
}
