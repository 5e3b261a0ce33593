//! Multi-device accounts: linking, messages on every device, revocation, forged
//! certificates and link-code misuse.

use sealpost_core::engine::Engine;
use sealpost_core::transport::Transport;
use sealpost_core::{Client, CoreError};
use sealpost_proto::Bytes64;
use sealpost_proto::api::{ClaimKeyPackagesResponse, ClaimedKeyPackage};

use crate::common::{Env, TEST_KEY_PACKAGES, copy_dir, failures, now, peek_application, texts};

/// Tries to link a device with `code` and returns the error it must fail with.
async fn failed_link(home: &std::path::Path, code: &str, url: &str) -> CoreError {
    match Client::link(home, code, url, "x", TEST_KEY_PACKAGES).await {
        Ok(_) => panic!("linking with {code:?} succeeded"),
        Err(err) => err,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linked_device_takes_part_in_every_conversation() {
    let env = Env::new().await;
    let alice = env.client("alice").await;
    let bob = env.client("bob").await;
    alice.send_direct("bob", "hello").await.unwrap();
    alice.create_group("club", &["bob".into()]).await.unwrap();
    bob.sync().await.unwrap();
    bob.send_group("club", "before the link").await.unwrap();
    let before = peek_application(&alice).await;

    let phone = env.link_device(&alice, "alice-phone").await;
    assert_eq!(phone.whoami().unwrap().username, "alice");
    let joined = phone.sync().await.unwrap();
    assert!(texts(&joined).is_empty(), "{joined:?}");
    assert_eq!(
        joined
            .iter()
            .filter(|e| e.text.contains("this device joined"))
            .count(),
        2,
        "{joined:?}"
    );
    // A device added later cannot decrypt what was sent before it joined.
    let result = phone.process_raw(&before).unwrap();
    assert!(texts(&result).is_empty(), "{result:?}");
    assert_eq!(failures(&result).len(), 1, "{result:?}");

    // Both of alice's devices receive, in the 1:1 and in the group.
    bob.send_direct("alice", "to both of you").await.unwrap();
    bob.send_group("club", "club to both").await.unwrap();
    for device in [&alice, &phone] {
        let got = texts(&device.sync().await.unwrap());
        assert!(got.contains(&"to both of you".to_owned()), "{got:?}");
        assert!(got.contains(&"club to both".to_owned()), "{got:?}");
    }
    // Sending from the new device reaches bob and alice's other device.
    phone.send_direct("bob", "from the phone").await.unwrap();
    phone.send_group("club", "phone in the club").await.unwrap();
    let at_bob = bob.sync().await.unwrap();
    assert_eq!(texts(&at_bob), ["from the phone", "phone in the club"]);
    assert!(
        at_bob
            .iter()
            .filter(|e| e.kind == "text")
            .all(|e| e.sender == "alice")
    );
    let at_laptop = alice.sync().await.unwrap();
    let own: Vec<_> = at_laptop.iter().filter(|e| e.kind == "text").collect();
    assert_eq!(own.len(), 2, "{at_laptop:?}");
    assert!(own.iter().all(|e| e.outgoing && e.sender == "alice"));
    assert!(failures(&at_laptop).is_empty());

    let devices = alice.devices().await.unwrap();
    assert_eq!(devices.len(), 2);
    assert!(
        devices
            .iter()
            .any(|d| d.name == "alice-phone" && !d.current)
    );
    assert_eq!(devices.iter().filter(|d| d.current).count(), 1);
    // Everyone agrees on the group.
    assert_eq!(
        bob.group_snapshot("club").unwrap(),
        phone.group_snapshot("club").unwrap()
    );
    // Linking is legitimate: no device raises a security alert about it.
    for client in [&alice, &phone, &bob] {
        client.sync().await.unwrap();
        assert!(client.alerts().unwrap().is_empty(), "{:?}", client.alerts());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_device_is_locked_out_and_decrypts_nothing_later() {
    let env = Env::new().await;
    let alice = env.client("alice").await;
    let bob = env.client("bob").await;
    alice.create_group("club", &["bob".into()]).await.unwrap();
    bob.sync().await.unwrap();
    let phone = env.link_device(&alice, "alice-phone").await;
    phone.sync().await.unwrap();
    let phone_id = phone.whoami().unwrap().device_id.parse().unwrap();
    drop(phone);
    let snapshot = env.home("phone-snapshot");
    copy_dir(&env.home("alice-phone"), &snapshot);

    alice.remove_device(phone_id).await.unwrap();
    assert_eq!(alice.devices().await.unwrap().len(), 1);
    for member in alice.group_snapshot("club").unwrap().members {
        assert!(!member.ends_with(&phone_id.to_string()));
    }

    // The server refuses the removed device's token and its logins.
    let engine = Engine::open(&sealpost_core::client::database_path(&snapshot)).unwrap();
    let transport = Transport::new(&env.server.url()).unwrap();
    transport.set_token(engine.token().unwrap());
    let refused = transport.whoami().await.unwrap_err();
    assert_eq!(
        refused.server_code(),
        Some(sealpost_proto::ErrorCode::Unauthorized)
    );
    drop(engine);
    let phone = Client::open(&env.home("alice-phone")).unwrap();
    assert!(matches!(phone.sync().await, Err(CoreError::DeviceRevoked)));

    // Later messages do not open with the removed device's keys.
    bob.send_group("club", "after the removal").await.unwrap();
    let raw = peek_application(&alice).await;
    let old_phone = Client::open(&snapshot).unwrap();
    let result = old_phone.process_raw(&raw).unwrap();
    assert!(texts(&result).is_empty(), "{result:?}");
    assert_eq!(failures(&result).len(), 1, "{result:?}");
    assert_eq!(texts(&alice.sync().await.unwrap()), ["after the removal"]);
    let notices = bob.sync().await.unwrap();
    assert!(
        notices.iter().any(|e| e.text == "alice's devices changed"),
        "{notices:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_device_certificates_are_rejected_by_every_client() {
    let env = Env::new().await;
    let alice = env.client("alice").await;
    let bob = env.client("bob").await;
    let mallory = env.client("mallory").await;
    let ghost = env.client("ghost").await;
    let club = alice
        .create_group("club", &["bob".into(), "mallory".into()])
        .await
        .unwrap()
        .group_id;
    bob.sync().await.unwrap();
    mallory.sync().await.unwrap();
    let before = alice.group_snapshot("club").unwrap();

    // A "device of bob" whose certificate names bob's account key but was signed by
    // someone else.
    let bob_key: [u8; 32] = hex::decode(bob.whoami().unwrap().account_key)
        .unwrap()
        .try_into()
        .unwrap();
    let (forged, cert) = sealpost_core::adversarial::forged_key_package("bob", bob_key).unwrap();

    // An honest client handed the forged KeyPackage refuses to add it.
    let mut engine =
        Engine::open(&sealpost_core::client::database_path(&env.home("alice"))).unwrap();
    let claim = ClaimKeyPackagesResponse {
        username: "bob".into(),
        account_key: Bytes64(bob_key.to_vec()),
        key_packages: vec![ClaimedKeyPackage {
            device_id: cert.device_id,
            certificate: Bytes64(cert.encode()),
            key_package: Bytes64(forged.clone()),
        }],
    };
    let refused = engine.begin_reconcile(&club, &[claim], &[], now());
    assert!(
        matches!(refused, Err(CoreError::InvalidCertificate(_))),
        "{refused:?}"
    );
    drop(engine);

    // A malicious member commits it anyway (declaring a real device id to the server).
    let ghost_device = ghost.whoami().unwrap().device_id.parse().unwrap();
    drop(mallory);
    {
        let mut engine =
            Engine::open(&sealpost_core::client::database_path(&env.home("mallory"))).unwrap();
        engine
            .begin_add_unverified(&club, &[(ghost_device, forged)], now())
            .unwrap();
    }
    let mallory = Client::open(&env.home("mallory")).unwrap();
    mallory.sync().await.unwrap();

    for (name, client) in [("alice", &alice), ("bob", &bob)] {
        let seen = client.sync().await.unwrap();
        let rejected = failures(&seen);
        assert_eq!(rejected.len(), 1, "{name}: {seen:?}");
        assert!(rejected[0].contains("certificate"), "{name}: {rejected:?}");
        // The forged device is not a member for the honest clients.
        assert_eq!(client.group_snapshot("club").unwrap(), before, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_codes_are_single_use_expire_and_resist_guessing() {
    let env = Env::new().await;
    let alice = env.client("alice").await;
    let url = env.server.url();

    // A mistyped code is refused; five wrong tries destroy the session for good.
    let code = alice.create_link().await.unwrap();
    let right = code.display();
    let mut wrong: Vec<char> = right.chars().collect();
    let i = wrong.len() - 10;
    wrong[i] = if wrong[i] == 'A' { 'B' } else { 'A' };
    let wrong: String = wrong.into_iter().collect();
    for attempt in 0..5 {
        let home = env.home(&format!("guess{attempt}"));
        let err = failed_link(&home, &wrong, &url).await;
        let text = err.to_string();
        if attempt < 4 {
            assert!(text.contains("does not match"), "{attempt}: {text}");
        } else {
            assert!(text.contains("unknown, expired or already used"), "{text}");
        }
    }
    let err = failed_link(&env.home("late"), &right, &url).await;
    assert!(
        err.to_string().contains("unknown, expired or already used"),
        "{err}"
    );

    // A used code does not work twice.
    let code = alice.create_link().await.unwrap();
    let (home, shown) = (env.home("phone"), code.display());
    let (linked, phone) = tokio::join!(
        alice.complete_link(&code, |_| {}),
        Client::link(&home, &shown, &url, "phone", TEST_KEY_PACKAGES),
    );
    linked.unwrap();
    phone.unwrap();
    let err = failed_link(&env.home("again"), &code.display(), &url).await;
    assert!(
        err.to_string().contains("unknown, expired or already used"),
        "{err}"
    );
    assert_eq!(alice.devices().await.unwrap().len(), 2);

    // Garbage is not a code.
    let err = failed_link(&env.home("garbage"), "not-a-code", &url).await;
    assert!(err.to_string().contains("not a valid link code"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_link_code_fails_clearly() {
    let env = Env::with_config(|config| config.link_ttl = std::time::Duration::ZERO).await;
    let alice = env.client("alice").await;
    let code = alice.create_link().await.unwrap();
    let err = failed_link(&env.home("late"), &code.display(), &env.server.url()).await;
    assert!(
        err.to_string().contains("unknown, expired or already used"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_commands_via_cli() {
    use std::io::{BufRead as _, BufReader};
    use std::process::{Command, Stdio};

    let env = Env::new().await;
    env.cli_register("alice");
    env.cli_register("bob");
    env.cli("alice", &["send", "bob", "hello"]).assert_ok();

    // `device link` prints the code, then waits for the new device.
    let mut existing = Command::new(env!("CARGO_BIN_EXE_sealpost"))
        .arg("--home")
        .arg(env.home("alice"))
        .args(["--json", "device", "link"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(existing.stdout.take().unwrap());
    let mut first = String::new();
    tokio::task::block_in_place(|| stdout.read_line(&mut first)).unwrap();
    let code: serde_json::Value = serde_json::from_str(&first).unwrap();
    let code = code["link_code"].as_str().unwrap().to_owned();
    let url = env.server.url();
    env.cli(
        "alice-tablet",
        &[
            "link",
            &code,
            "--server",
            &url,
            "--name",
            "tablet",
            "--key-packages",
            "8",
        ],
    )
    .assert_ok();
    let status = tokio::task::block_in_place(|| existing.wait()).unwrap();
    assert!(status.success());
    let mut rest = String::new();
    tokio::task::block_in_place(|| std::io::Read::read_to_string(&mut stdout, &mut rest)).unwrap();
    let linked: serde_json::Value = serde_json::from_str(rest.trim()).unwrap();
    assert_eq!(linked["name"], "tablet");
    assert_eq!(linked["conversations"], 1);

    let devices = env
        .cli("alice-tablet", &["--json", "devices"])
        .assert_ok()
        .json_lines();
    assert_eq!(devices.len(), 2);
    let tablet = devices.iter().find(|d| d["current"] == true).unwrap();
    assert_eq!(tablet["name"], "tablet");
    let tablet_id = tablet["device_id"].as_str().unwrap().to_owned();

    env.cli("alice", &["device", "rename", &tablet_id, "old tablet"])
        .assert_ok();
    let devices = env
        .cli("alice", &["--json", "devices"])
        .assert_ok()
        .json_lines();
    assert!(
        devices.iter().any(|d| d["name"] == "old tablet"),
        "{devices:?}"
    );

    // The tablet got the 1:1 and reads new messages; then it is removed.
    env.cli("bob", &["send", "alice", "hi both"]).assert_ok();
    let at_tablet = env
        .cli("alice-tablet", &["--json", "sync"])
        .assert_ok()
        .json_lines();
    assert!(
        at_tablet.iter().any(|l| l["text"] == "hi both"),
        "{at_tablet:?}"
    );
    let out = env.cli("alice", &["device", "remove", "not-an-id"]);
    assert!(
        !out.success && out.stderr.contains("not a device id"),
        "{}",
        out.stderr
    );
    let out = env.cli(
        "alice",
        &["device", "remove", &uuid::Uuid::new_v4().to_string()],
    );
    assert!(
        !out.success && out.stderr.contains("no such device"),
        "{}",
        out.stderr
    );
    env.cli("alice", &["device", "remove", &tablet_id])
        .assert_ok();
    let out = env.cli("alice-tablet", &["sync"]);
    assert!(!out.success);
    assert!(
        out.stderr.contains("removed from its account"),
        "{}",
        out.stderr
    );
    assert_eq!(
        env.cli("alice", &["--json", "devices"])
            .assert_ok()
            .json_lines()
            .len(),
        1
    );
}
