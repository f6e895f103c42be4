//! The admin API's task requests and answers, typed. The handlers build these, and `rkictl` and
//! the end-to-end harness read them with the same types, so the three cannot drift apart; a field
//! renamed here fails to compile in all three.

use serde::{Deserialize, Serialize};

use crate::engine;
use crate::store::{ExecutionRow, TaskRow};

pub use crate::store::TaskCounts;

/// `POST /v1/tasks` and `POST /v1/tasks/preview`: which devices (`sns` or `group`), which key
/// source (default: the one assigned to the devices), the slot (default 1) and the expiry in days
/// (default 30, at most 180). A repeated `request_id` returns the task it created first.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sns: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_source: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiry_days: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<i64>,
}

/// A task as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Task {
    /// The task's number within its organization (1, 2, …).
    pub id: i64,
    pub org_id: i64,
    pub key_source_id: i64,
    pub key_source: String,
    pub slot: u16,
    pub key_type: String,
    pub created_at: i64,
    pub expires_at: i64,
    pub created_by: String,
    pub stopped_at: Option<i64>,
    pub request_id: Option<i64>,
    pub counts: TaskCounts,
    /// `unfinished` while an execution is open, then `done`.
    pub status: String,
    /// `in progress`, `succeeded`, `finished with failures` or `manually terminated`.
    pub outcome: String,
}

impl Task {
    pub fn from_row(t: &TaskRow) -> Self {
        let open = t.counts.open() > 0;
        let outcome = if open {
            "in progress"
        } else if t.stopped_at.is_some() {
            "manually terminated"
        } else if t.counts.succeeded == t.counts.total {
            "succeeded"
        } else {
            "finished with failures"
        };
        Task {
            id: t.number,
            org_id: t.org_id,
            key_source_id: t.key_source_id,
            key_source: t.key_source.clone(),
            slot: t.slot,
            key_type: t.key_type.clone(),
            created_at: t.created_at,
            expires_at: t.expires_at,
            created_by: t.created_by.clone(),
            stopped_at: t.stopped_at,
            request_id: t.request_id,
            counts: t.counts.clone(),
            status: if open { "unfinished" } else { "done" }.into(),
            outcome: outcome.into(),
        }
    }

    /// Executions not ended yet.
    pub fn open(&self) -> i64 {
        self.counts.open()
    }
}

/// A device that is not ready for a task, and why (each reason's code and its meaning).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NotReadyDevice {
    pub sn: String,
    pub reasons: Vec<String>,
    pub meanings: Vec<String>,
}

/// Which devices of a target are ready for a task.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Preview {
    pub key_source: Option<String>,
    pub slot: u16,
    pub expiry_days: u16,
    pub ready: Vec<String>,
    pub not_ready: Vec<NotReadyDevice>,
    /// Ready, but never reported their firmware.
    pub never_seen: Vec<String>,
}

impl From<&engine::Preview> for Preview {
    fn from(p: &engine::Preview) -> Self {
        Preview {
            key_source: p.key_source.clone(),
            slot: p.slot,
            expiry_days: p.expiry_days,
            ready: p.ready.clone(),
            not_ready: p
                .not_ready
                .iter()
                .map(|d| NotReadyDevice {
                    sn: d.sn.clone(),
                    reasons: d.reasons.iter().map(|r| r.to_string()).collect(),
                    meanings: d.meanings.iter().map(|m| m.to_string()).collect(),
                })
                .collect(),
            never_seen: p.never_seen.clone(),
        }
    }
}

/// `POST /v1/tasks/preview`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PreviewAnswer {
    pub preview: Preview,
}

/// `POST /v1/tasks`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskCreated {
    pub task: Task,
    pub preview: Preview,
}

/// The organization's tasks, by state.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TaskSummary {
    pub unfinished: i64,
    pub done: i64,
    pub succeeded: i64,
    pub failed: i64,
    pub expired: i64,
    pub terminated: i64,
    pub open: i64,
}

/// `GET /v1/tasks`: one page, newest first.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskList {
    pub tasks: Vec<Task>,
    pub summary: TaskSummary,
    /// Pass as `cursor` for the next page; `None` on the last.
    pub next_cursor: Option<i64>,
}

/// A terminal's signed refusal of a download or an unlock.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Refusal {
    pub frame: String,
    pub code: String,
    pub meaning: String,
    pub refused_counter: u64,
    pub accepted_counter: u64,
    pub at: i64,
}

impl From<engine::LastRefusal> for Refusal {
    fn from(r: engine::LastRefusal) -> Self {
        Refusal {
            frame: r.frame.into(),
            code: r.code.into(),
            meaning: r.meaning.into(),
            refused_counter: r.refused_counter,
            accepted_counter: r.accepted_counter,
            at: r.at,
        }
    }
}

/// One device's share of a task.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Execution {
    pub id: i64,
    /// The task's number.
    pub task_id: i64,
    pub sn: String,
    /// `queued`, `delivered`, `succeeded`, `failed`, `expired` or `terminated`.
    pub state: String,
    pub slot: u16,
    pub key_type: String,
    /// The KSN (TDES) or initial key ID (AES), hex.
    pub key_id: String,
    pub kcv: String,
    pub created_at: i64,
    pub deadline: i64,
    pub delivered_at: Option<i64>,
    pub delivery_count: i64,
    pub ended_at: Option<i64>,
    /// The terminal's result code (0: installed).
    pub result: Option<i32>,
    pub result_meaning: Option<String>,
    pub error_remedy: Option<String>,
    pub online: bool,
    /// Why a delivery does not end: the terminal's latest signed refusal, if any.
    pub last_refusal: Option<Refusal>,
}

impl Execution {
    pub fn from_row(e: &ExecutionRow, task_number: i64, online: bool, last_refusal: Option<Refusal>) -> Self {
        Execution {
            id: e.id,
            task_id: task_number,
            sn: e.sn.clone(),
            state: e.state.as_str().into(),
            slot: e.slot,
            key_type: e.key_type.clone(),
            key_id: hex::encode_upper(&e.key_id),
            kcv: e.kcv.clone(),
            created_at: e.created_at,
            deadline: e.deadline,
            delivered_at: e.delivered_at,
            delivery_count: e.delivery_count,
            ended_at: e.ended_at,
            result: e.result,
            result_meaning: e.result.map(|r| rki_protocol::terminal::result_meaning(r).to_string()),
            error_remedy: e
                .result
                .and_then(rki_protocol::terminal::TerminalError::from_code)
                .map(|t| t.remedy().to_string()),
            online,
            last_refusal,
        }
    }
}

/// `GET /v1/tasks/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskDetail {
    pub task: Task,
    pub executions: Vec<Execution>,
    pub executions_total: i64,
    pub executions_offset: usize,
}

/// `POST /v1/tasks/{id}/stop`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskStopped {
    pub terminated: usize,
    pub task: Task,
}
