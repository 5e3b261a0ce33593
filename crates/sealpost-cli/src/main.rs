//! `sealpost`: the command-line client.
//!
//! Every command prints human-readable text, or with `--json` one JSON object per line.
//! Every failure prints one line on stderr (a JSON error object under `--json`) and exits
//! with status 1; usage errors exit with 2. All protocol work happens in `sealpost-core`.

mod cli;
mod output;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;
use sealpost_core::{Client, CoreError};

use crate::cli::{AccountCommand, Args, Command, DeviceCommand, GroupCommand};
use crate::output::Output;

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SEALPOST_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off")),
        )
        .with_writer(std::io::stderr)
        .init();
    let out = Output::new(args.json);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            out.error(&anyhow::anyhow!("cannot start the runtime: {err}"));
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args, &out)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            out.error(&err);
            ExitCode::FAILURE
        }
    }
}

fn home_dir(home: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(home) = home {
        return Ok(home);
    }
    directories::ProjectDirs::from("org", "Sealpost", "sealpost")
        .map(|dirs| dirs.data_dir().to_owned())
        .context("cannot find a home directory for Sealpost; pass --home DIR")
}

fn parse_device_id(id: &str) -> anyhow::Result<sealpost_core::uuid::Uuid> {
    id.parse()
        .with_context(|| format!("{id:?} is not a device id (see `sealpost devices`)"))
}

/// A default device name: the host's name, else "device".
fn default_device_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty() && name.chars().count() <= 64)
        .unwrap_or_else(|| "device".to_owned())
}

fn open(home: &std::path::Path) -> anyhow::Result<Client> {
    match Client::open(home) {
        Err(CoreError::NotRegistered) => Err(anyhow::anyhow!(
            "no account in {}; run `sealpost register USERNAME --server URL` first",
            home.display()
        )),
        other => Ok(other?),
    }
}

async fn run(args: Args, out: &Output) -> anyhow::Result<()> {
    let home = home_dir(args.home)?;
    match args.command {
        Command::Register {
            username,
            server,
            key_packages,
            name,
            kt_key,
        } => {
            let client =
                Client::register_pinned(&home, &username, &server, key_packages, kt_key.as_deref())
                    .await?;
            let me = client.whoami()?;
            let device_id = me.device_id.parse().context("device id")?;
            client
                .rename_device(device_id, &name.unwrap_or_else(default_device_name))
                .await?;
            out.whoami(&me, "registered");
        }
        Command::Link {
            code,
            server,
            name,
            key_packages,
        } => {
            let name = name.unwrap_or_else(default_device_name);
            let client = Client::link(&home, &code, &server, &name, key_packages).await?;
            out.whoami(&client.whoami()?, "linked");
        }
        Command::Audit { from, to } => {
            let client = open(&home)?;
            let bar = out.progress_bar();
            let summary = client
                .audit(from, to, |done, total| {
                    if let Some(bar) = &bar {
                        bar.set_length(total);
                        bar.set_position(done);
                    }
                })
                .await;
            if let Some(bar) = &bar {
                bar.finish_and_clear();
            }
            let summary = summary?;
            out.done(
                &format!(
                    "the key directory is append-only from epoch {} to {} ({} epochs verified)",
                    summary.from, summary.to, summary.epochs
                ),
                &summary,
            );
        }
        Command::Devices => out.devices(&open(&home)?.devices().await?),
        Command::Device(command) => {
            let client = open(&home)?;
            match command {
                DeviceCommand::Link => {
                    let code = client.create_link().await?;
                    out.link_code(&code.display());
                    let linked = client
                        .complete_link(&code, |name| {
                            out.progress(&format!(
                                "{name} joined; adding it to your conversations…"
                            ))
                        })
                        .await?;
                    out.done(
                        &format!(
                            "linked {} (device {}); added to {} conversation(s)",
                            linked.name, linked.device_id, linked.conversations
                        ),
                        &linked,
                    );
                }
                DeviceCommand::Rename { id, name } => {
                    let device_id = parse_device_id(&id)?;
                    client.rename_device(device_id, &name).await?;
                    out.done(
                        &format!("renamed device {id} to {name:?}"),
                        &serde_json::json!({"device_id": id, "name": name}),
                    );
                }
                DeviceCommand::Remove { id } => {
                    let device_id = parse_device_id(&id)?;
                    client.remove_device(device_id).await?;
                    out.done(
                        &format!("removed device {id}"),
                        &serde_json::json!({"device_id": id, "removed": true}),
                    );
                }
            }
        }
        Command::SafetyNumber { user } => {
            let number = open(&home)?.safety_number(&user).await?;
            out.safety_number(&number);
        }
        Command::Verify {
            user,
            number,
            accept_new_key,
        } => {
            let client = open(&home)?;
            if accept_new_key {
                client.accept_new_key(&user).await?;
                out.done(
                    &format!(
                        "accepted {user}'s new key; compare safety numbers again to verify {user}"
                    ),
                    &serde_json::json!({"user": user, "accepted_new_key": true, "verified": false}),
                );
            } else {
                let Some(number) = number else {
                    anyhow::bail!(
                        "usage: sealpost verify USER NUMBER, or sealpost verify USER --accept-new-key"
                    );
                };
                client.verify(&user, &number).await?;
                out.done(
                    &format!("{user} is verified"),
                    &serde_json::json!({"user": user, "verified": true}),
                );
            }
        }
        Command::Account(AccountCommand::Delete { yes }) => {
            if !yes {
                anyhow::bail!(
                    "this deletes your account and every device from the server; add --yes to confirm"
                );
            }
            let client = open(&home)?;
            client.delete_account().await?;
            drop(client);
            for suffix in ["", "-wal", "-shm"] {
                let mut path = sealpost_core::client::database_path(&home).into_os_string();
                path.push(suffix);
                let _ = std::fs::remove_file(path);
            }
            out.done("account deleted", &serde_json::json!({"deleted": true}));
        }
        Command::Whoami => out.whoami(&open(&home)?.whoami()?, ""),
        Command::Send { group, args } => {
            let client = open(&home)?;
            let entry = match (group, args.as_slice()) {
                (Some(name), [text]) => client.send_group(&name, text).await?,
                (None, [user, text]) => client.send_direct(user, text).await?,
                (Some(_), _) => anyhow::bail!("usage: sealpost send --group NAME TEXT"),
                (None, _) => anyhow::bail!("usage: sealpost send USERNAME TEXT"),
            };
            out.sent(&entry);
        }
        Command::Sync { follow } => {
            let client = open(&home)?;
            if follow {
                let stop = async {
                    let _ = tokio::signal::ctrl_c().await;
                };
                client.follow(|entries| out.entries(&entries), stop).await?;
            } else {
                out.entries(&client.sync().await?);
            }
        }
        Command::Conversations => out.conversations(&open(&home)?.conversations()?),
        Command::History {
            conversation,
            limit,
        } => out.entries(&open(&home)?.history(&conversation, limit)?),
        Command::Group(group) => {
            let client = open(&home)?;
            match group {
                GroupCommand::Create { name, members } => {
                    let conversation = client.create_group(&name, &members).await?;
                    out.done(
                        &format!("created group {:?}", conversation.name),
                        &conversation,
                    );
                }
                GroupCommand::Add { name, user } => {
                    client.add_member(&name, &user).await?;
                    out.done(
                        &format!("added {user} to {name:?}"),
                        &serde_json::json!({"group": name, "added": user}),
                    );
                }
                GroupCommand::Remove { name, user } => {
                    client.remove_member(&name, &user).await?;
                    out.done(
                        &format!("removed {user} from {name:?}"),
                        &serde_json::json!({"group": name, "removed": user}),
                    );
                }
                GroupCommand::Leave { name } => {
                    client.leave(&name).await?;
                    out.done(
                        &format!("left {name:?}"),
                        &serde_json::json!({"group": name, "left": true}),
                    );
                }
                GroupCommand::Members { name } => out.members(&client.members(&name).await?),
            }
        }
    }
    Ok(())
}
