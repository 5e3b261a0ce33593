//! Printing results as text or JSON lines, and errors as one line on stderr.
//!
//! A closed stdout (for example `sealpost sync | head -1`) is not an error: output stops
//! quietly instead of panicking.

use std::io::Write as _;

use sealpost_core::client::{DeviceEntry, WhoAmI};
use sealpost_core::engine::contacts::SafetyNumber;
use sealpost_core::engine::conversations::MemberDevice;
use sealpost_core::safety;
use sealpost_core::{ConversationSummary, CoreError, HistoryEntry};
use serde::Serialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

pub struct Output {
    json: bool,
}

fn timestamp(ms: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}

#[derive(Serialize)]
struct JsonEntry<'a> {
    id: &'a str,
    conversation: &'a str,
    group_id: &'a str,
    sender: &'a str,
    text: &'a str,
    kind: &'a str,
    sent_at: String,
    sent_at_ms: i64,
    outgoing: bool,
}

impl Output {
    pub fn new(json: bool) -> Self {
        Self { json }
    }

    fn line(&self, text: &str) {
        let mut stdout = std::io::stdout().lock();
        // A closed pipe ends output; nothing else can fail usefully here.
        let _ = writeln!(stdout, "{text}");
    }

    fn json_line<T: Serialize>(&self, value: &T) {
        if let Ok(text) = serde_json::to_string(value) {
            self.line(&text);
        }
    }

    pub fn error(&self, err: &anyhow::Error) {
        let code = err
            .downcast_ref::<CoreError>()
            .map(CoreError::code)
            .unwrap_or("error");
        let message = format!("{err:#}");
        let mut stderr = std::io::stderr().lock();
        if self.json {
            let body = serde_json::json!({"error": {"code": code, "message": message}});
            let _ = writeln!(stderr, "{body}");
        } else {
            let _ = writeln!(stderr, "error: {message}");
        }
    }

    pub fn whoami(&self, me: &WhoAmI, verb: &str) {
        if self.json {
            self.json_line(me);
        } else {
            let prefix = if verb.is_empty() {
                String::new()
            } else {
                format!("{verb} ")
            };
            self.line(&format!(
                "{prefix}{} (device {}) on {}",
                me.username, me.device_id, me.server
            ));
        }
    }

    fn entry(&self, entry: &HistoryEntry) {
        if self.json {
            self.json_line(&JsonEntry {
                id: &entry.id,
                conversation: &entry.conversation,
                group_id: &entry.group_id,
                sender: &entry.sender,
                text: &entry.text,
                kind: &entry.kind,
                sent_at: timestamp(entry.sent_at),
                sent_at_ms: entry.sent_at,
                outgoing: entry.outgoing,
            });
        } else if entry.kind == "notice" {
            self.line(&format!(
                "{} [{}] * {}",
                timestamp(entry.sent_at),
                entry.conversation,
                entry.text
            ));
        } else {
            self.line(&format!(
                "{} [{}] {}: {}",
                timestamp(entry.sent_at),
                entry.conversation,
                entry.sender,
                entry.text
            ));
        }
    }

    pub fn entries(&self, entries: &[HistoryEntry]) {
        for entry in entries {
            self.entry(entry);
        }
    }

    pub fn sent(&self, entry: &HistoryEntry) {
        if self.json {
            self.entry(entry);
        } else {
            self.line(&format!("sent to {}", entry.conversation));
        }
    }

    pub fn conversations(&self, conversations: &[ConversationSummary]) {
        for conversation in conversations {
            if self.json {
                self.json_line(conversation);
            } else {
                let kind = match conversation.kind {
                    sealpost_core::ConversationKind::Direct => "1:1",
                    sealpost_core::ConversationKind::Group => "group",
                };
                let status = if conversation.status == "active" {
                    String::new()
                } else {
                    format!(" ({})", conversation.status)
                };
                self.line(&format!("{kind:5} {}{status}", conversation.name));
            }
        }
    }

    pub fn members(&self, members: &[MemberDevice]) {
        for member in members {
            if self.json {
                self.json_line(&serde_json::json!({
                    "username": member.username,
                    "device_id": member.device_id,
                }));
            } else {
                self.line(&format!(
                    "{} (device {})",
                    member.username, member.device_id
                ));
            }
        }
    }

    /// A progress line on stderr (stdout stays machine-readable).
    pub fn progress(&self, text: &str) {
        if !self.json {
            let _ = writeln!(std::io::stderr().lock(), "{text}");
        }
    }

    /// A progress bar on stderr when it is a terminal and output is text.
    pub fn progress_bar(&self) -> Option<indicatif::ProgressBar> {
        if self.json || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            return None;
        }
        let bar = indicatif::ProgressBar::new(0);
        if let Ok(style) =
            indicatif::ProgressStyle::with_template("{msg} {bar:40} {pos}/{len} epochs ({eta})")
        {
            bar.set_style(style);
        }
        bar.set_message("auditing");
        Some(bar)
    }

    pub fn link_code(&self, code: &str) {
        if self.json {
            self.json_line(&serde_json::json!({"link_code": code, "expires_in_secs": 600}));
        } else {
            self.line("On the new device, run:");
            self.line(&format!("  sealpost link {code} --server URL"));
            if let Some(qr) = qr(code) {
                self.line(&qr);
            }
            self.line("The code works once, for 10 minutes. Waiting for the new device…");
        }
    }

    pub fn devices(&self, devices: &[DeviceEntry]) {
        for device in devices {
            if self.json {
                self.json_line(device);
            } else {
                let marker = if device.current { " (this device)" } else { "" };
                self.line(&format!(
                    "{}  {}  created {}{marker}",
                    device.device_id, device.name, device.created
                ));
            }
        }
    }

    pub fn safety_number(&self, number: &SafetyNumber) {
        if self.json {
            self.json_line(number);
            return;
        }
        self.line(&format!("Safety number with {}:", number.username));
        self.line(&format!("  {}", safety::format_groups(&number.number)));
        if let Some(qr) = qr(&safety::qr_payload(&number.number)) {
            self.line(&qr);
        }
        if number.key_changed {
            self.line(&format!(
                "WARNING: {}'s key changed since you verified it. If this number is right, run `sealpost verify {} --accept-new-key`.",
                number.username, number.username
            ));
        } else if number.verified {
            self.line(&format!("{} is verified.", number.username));
        } else {
            self.line(&format!(
                "Compare it with {} (in person or on a call), then run `sealpost verify {} NUMBER`.",
                number.username, number.username
            ));
        }
    }

    pub fn done<T: Serialize>(&self, text: &str, value: &T) {
        if self.json {
            self.json_line(value);
        } else {
            self.line(text);
        }
    }
}

/// A QR code drawn with Unicode half blocks, or `None` if the text does not fit one.
fn qr(text: &str) -> Option<String> {
    let code = qrcode::QrCode::new(text.as_bytes()).ok()?;
    Some(
        code.render::<qrcode::render::unicode::Dense1x2>()
            .quiet_zone(true)
            .build(),
    )
}
