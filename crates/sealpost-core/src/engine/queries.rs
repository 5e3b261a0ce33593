//! Read-only views of the local store: conversations and history.

use rusqlite::{Connection, OptionalExtension as _, params};
use serde::Serialize;

use super::Engine;
use crate::error::CoreError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConversationKind {
    Direct,
    Group,
}

/// One conversation as the user sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConversationSummary {
    pub group_id: String,
    pub kind: ConversationKind,
    /// The group's name, or the other user's username for a direct conversation.
    pub name: String,
    /// `active`, `left` or `removed`.
    pub status: String,
}

/// One line of history: a message or a notice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HistoryEntry {
    /// The message id (chosen by its sender; the same on every device).
    pub id: String,
    /// The conversation's name as shown by `conversations`.
    pub conversation: String,
    pub group_id: String,
    /// Username of the sender; empty for notices.
    pub sender: String,
    pub sender_device: Option<String>,
    /// `text` or `notice`.
    pub kind: String,
    pub text: String,
    /// Sender's clock, milliseconds since the Unix epoch.
    pub sent_at: i64,
    pub outgoing: bool,
}

fn summary_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<ConversationSummary> {
    let kind: String = row.get("kind")?;
    let name: Option<String> = row.get("name")?;
    let peer: Option<String> = row.get("peer")?;
    let kind = if kind == "direct" {
        ConversationKind::Direct
    } else {
        ConversationKind::Group
    };
    Ok(ConversationSummary {
        group_id: row.get("group_id")?,
        kind,
        name: match kind {
            ConversationKind::Direct => peer.unwrap_or_default(),
            ConversationKind::Group => name.unwrap_or_default(),
        },
        status: row.get("status")?,
    })
}

const HISTORY_COLUMNS: &str = "h.id, h.group_id, h.sender, h.sender_device, h.kind, h.text, h.sent_at_ms, h.outgoing, \
     CASE WHEN c.kind = 'direct' THEN c.peer ELSE c.name END AS label";

fn entry_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<HistoryEntry> {
    let group_id: String = row.get("group_id")?;
    let label: Option<String> = row.get("label")?;
    Ok(HistoryEntry {
        id: row.get("id")?,
        conversation: label.unwrap_or_else(|| group_id.clone()),
        group_id,
        sender: row.get("sender")?,
        sender_device: row.get("sender_device")?,
        kind: row.get("kind")?,
        text: row.get("text")?,
        sent_at: row.get("sent_at_ms")?,
        outgoing: row.get::<_, i64>("outgoing")? != 0,
    })
}

/// Reads one history entry by message id.
pub(crate) fn history_entry(
    conn: &Connection,
    id: &str,
) -> Result<Option<HistoryEntry>, CoreError> {
    let sql = format!(
        "SELECT {HISTORY_COLUMNS} FROM history h LEFT JOIN conversations c ON c.group_id = h.group_id WHERE h.id = ?"
    );
    Ok(conn
        .prepare_cached(&sql)?
        .query_row([id], entry_from_row)
        .optional()?)
}

impl Engine {
    /// All conversations, active first, then by name.
    pub fn conversations(&self) -> Result<Vec<ConversationSummary>, CoreError> {
        let mut statement = self.conn.prepare(
            "SELECT group_id, kind, name, peer, status FROM conversations \
             ORDER BY status != 'active', COALESCE(name, peer), group_id",
        )?;
        let rows = statement.query_map([], summary_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Finds a conversation by group name, by the other user's name (1:1), or by group id.
    /// For a 1:1 with several groups (both sides started one at once), the one with the
    /// smallest group id is chosen, which both sides agree on.
    pub fn find_conversation(&self, name: &str) -> Result<ConversationSummary, CoreError> {
        let all = self.conversations()?;
        let pick = |kind: ConversationKind, active_only: bool| {
            let mut matches: Vec<&ConversationSummary> = all
                .iter()
                .filter(|c| c.kind == kind && c.name == name)
                .filter(|c| !active_only || c.status == "active")
                .collect();
            matches.sort_by(|a, b| a.group_id.cmp(&b.group_id));
            matches
        };
        let groups = pick(ConversationKind::Group, true);
        if groups.len() > 1 {
            return Err(CoreError::AmbiguousConversation(name.to_owned()));
        }
        if let Some(found) = groups.first() {
            return Ok((*found).clone());
        }
        if let Some(found) = pick(ConversationKind::Direct, true).first() {
            return Ok((*found).clone());
        }
        if let Some(found) = all.iter().find(|c| c.group_id == name) {
            return Ok(found.clone());
        }
        // Fall back to inactive conversations, so history stays readable after leaving.
        for kind in [ConversationKind::Group, ConversationKind::Direct] {
            if let Some(found) = pick(kind, false).first() {
                return Ok((*found).clone());
            }
        }
        Err(CoreError::UnknownConversation(name.to_owned()))
    }

    /// The last `limit` entries of a conversation, oldest first. A 1:1 shows every group
    /// with that user.
    pub fn history(
        &self,
        conversation: &ConversationSummary,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>, CoreError> {
        let sql = format!(
            "SELECT * FROM (SELECT h.seq, {HISTORY_COLUMNS} FROM history h \
             JOIN conversations c ON c.group_id = h.group_id \
             WHERE (c.kind = 'direct' AND ?1 = 'direct' AND c.peer = ?2) OR h.group_id = ?3 \
             ORDER BY h.seq DESC LIMIT ?4) ORDER BY seq"
        );
        let kind = match conversation.kind {
            ConversationKind::Direct => "direct",
            ConversationKind::Group => "group",
        };
        let mut statement = self.conn.prepare(&sql)?;
        let rows = statement.query_map(
            params![
                kind,
                conversation.name,
                conversation.group_id,
                limit.min(i64::MAX as usize) as i64
            ],
            entry_from_row,
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

impl Engine {
    /// History entries not yet shown by `sync` (messages and notices that arrived, in
    /// arrival order), marking them shown.
    ///
    /// What was shown is a watermark (`shown_through` in `meta`, the `seq` of the last
    /// entry returned): every entry after it with `shown = 0` is new. Entries are only
    /// ever appended; the only ones deleted are the user's own failed messages, which are
    /// inserted shown and never become the watermark, so a `seq` reused after deleting
    /// the last row is always after it.
    pub fn take_unshown(&mut self) -> Result<Vec<HistoryEntry>, CoreError> {
        let tx = self.conn.transaction()?;
        let through = crate::store::meta_text(&tx, "shown_through")?
            .and_then(|text| text.parse::<i64>().ok())
            .unwrap_or(0);
        let sql = format!(
            "SELECT h.seq, {HISTORY_COLUMNS} FROM history h \
             LEFT JOIN conversations c ON c.group_id = h.group_id \
             WHERE h.seq > ?1 AND h.shown = 0 ORDER BY h.seq"
        );
        let (entries, last) = {
            let mut statement = tx.prepare_cached(&sql)?;
            let mut rows = statement.query([through])?;
            let mut entries = Vec::new();
            let mut last = None;
            while let Some(row) = rows.next()? {
                last = Some(row.get::<_, i64>("seq")?);
                entries.push(entry_from_row(row)?);
            }
            (entries, last)
        };
        if let Some(last) = last {
            crate::store::meta_set(&tx, "shown_through", last.to_string().as_bytes())?;
        }
        tx.commit()?;
        Ok(entries)
    }
}

impl Engine {
    /// Entries of the security pseudo-conversation (alerts), oldest first.
    pub fn alerts(&self) -> Result<Vec<HistoryEntry>, CoreError> {
        let sql = format!(
            "SELECT {HISTORY_COLUMNS} FROM history h LEFT JOIN conversations c ON c.group_id = h.group_id \
             WHERE h.group_id = ? ORDER BY h.seq"
        );
        let mut statement = self.conn.prepare(&sql)?;
        let rows = statement.query_map([super::transparency::SECURITY], entry_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}
