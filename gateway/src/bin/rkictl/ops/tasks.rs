//! Download tasks: preview, create, list, show, stop, watch.

use super::*;

pub(super) fn preview_text(p: &Preview) -> String {
    let mut out = format!(
        "key source {}, slot {}, expires after {} days\nready: {}\n",
        p.key_source.as_deref().unwrap_or("-"),
        p.slot,
        p.expiry_days,
        p.ready.len()
    );
    if !p.never_seen.is_empty() {
        out.push_str(&format!("  of which never seen online (firmware unknown): {}\n", p.never_seen.len()));
    }
    out.push_str(&format!("not ready: {}\n", p.not_ready.len()));
    for d in p.not_ready.iter().take(50) {
        out.push_str(&format!("  {:<20} {}\n", d.sn, d.reasons.join(", ")));
    }
    if p.not_ready.len() > 50 {
        out.push_str(&format!("  … and {} more (use --json for all)\n", p.not_ready.len() - 50));
    }
    out
}

pub(super) fn task_line(t: &Task) -> Vec<String> {
    let c = &t.counts;
    vec![
        t.id.to_string(),
        t.key_source.clone(),
        t.slot.to_string(),
        t.status.clone(),
        t.outcome.clone(),
        format!("{}/{}", c.succeeded, c.total),
        c.failed.to_string(),
        c.expired.to_string(),
        c.terminated.to_string(),
        t.open().to_string(),
        time(&json!(t.created_at)),
        time(&json!(t.expires_at)),
    ]
}

pub(super) const TASK_HEADERS: [&str; 12] = [
    "TASK",
    "KEY SOURCE",
    "SLOT",
    "STATUS",
    "OUTCOME",
    "SUCCEEDED",
    "FAILED",
    "EXPIRED",
    "TERMINATED",
    "OPEN",
    "CREATED",
    "EXPIRES",
];

pub fn tasks(c: &Client, cmd: TasksCommand, json_out: bool) -> Result<Output, String> {
    match cmd {
        TasksCommand::Preview(args) => {
            let v: PreviewAnswer = c.post_as("/v1/tasks/preview", &args.into_json()?)?;
            Ok(if json_out { Output::Json(to_json(&v)?) } else { Output::Text(preview_text(&v.preview)) })
        }
        TasksCommand::Create(args) => {
            let v: TaskCreated = c.post_as("/v1/tasks", &args.into_json()?)?;
            if json_out {
                return Ok(Output::Json(to_json(&v)?));
            }
            let mut out = preview_text(&v.preview);
            out.push_str(&format!("task {} created with {} execution(s)", v.task.id, v.task.counts.total));
            Ok(Output::Text(out))
        }
        TasksCommand::List { status } => {
            let v: TaskList = c.get_as(&format!("/v1/tasks?status={status}"))?;
            if json_out {
                return Ok(Output::Json(to_json(&v)?));
            }
            let sm = &v.summary;
            let mut out = format!(
                "unfinished {}  done {}  |  succeeded {}  failed {}  expired {}  terminated {}  open {}\n\n",
                sm.unfinished, sm.done, sm.succeeded, sm.failed, sm.expired, sm.terminated, sm.open
            );
            let rows = v.tasks.iter().map(task_line).collect();
            out.push_str(&table(&TASK_HEADERS, rows));
            Ok(Output::Text(out))
        }
        TasksCommand::Show { id } => {
            let v: TaskDetail = c.get_as(&format!("/v1/tasks/{id}"))?;
            if json_out {
                return Ok(Output::Json(to_json(&v)?));
            }
            let mut out = table(&TASK_HEADERS, vec![task_line(&v.task)]);
            out.push('\n');
            let rows = v
                .executions
                .iter()
                .map(|e| {
                    vec![
                        e.sn.clone(),
                        e.state.clone(),
                        e.result
                            .filter(|r| *r != 0)
                            .map(|r| format!("{r} ({})", e.result_meaning.as_deref().unwrap_or("")))
                            .unwrap_or_default(),
                        if e.online { "online".into() } else { "offline".into() },
                        e.delivery_count.to_string(),
                        e.key_id.clone(),
                        e.kcv.clone(),
                        time(&json!(e.deadline)),
                        // A delivery the terminal refuses, and why.
                        e.last_refusal
                            .as_ref()
                            .map(|r| format!("{} at {}", r.code, time(&json!(r.at))))
                            .unwrap_or_default(),
                    ]
                })
                .collect();
            out.push_str(&table(
                &["SN", "STATE", "ERROR", "CONNECTION", "SENT", "KSN / KEY ID", "KCV", "EXPIRES", "REFUSED"],
                rows,
            ));
            Ok(Output::Text(out))
        }
        TasksCommand::Stop { id, yes } => {
            if !yes {
                if !std::io::stdin().is_terminal() {
                    return Err("refusing to stop without confirmation: pass --yes".into());
                }
                eprint!("stop task {id}? its open executions end as manually terminated [y/N] ");
                let mut answer = String::new();
                std::io::stdin().lock().read_line(&mut answer).map_err(|e| e.to_string())?;
                if !answer.trim().eq_ignore_ascii_case("y") {
                    return Err("not stopped".into());
                }
            }
            let v: TaskStopped = c.post_as(&format!("/v1/tasks/{id}/stop"), &json!({}))?;
            Ok(if json_out {
                Output::Json(to_json(&v)?)
            } else {
                Output::Text(format!("task {id}: {} execution(s) terminated; {}", v.terminated, v.task.outcome))
            })
        }
        TasksCommand::Watch { id, timeout_seconds } => {
            let started = Instant::now();
            loop {
                // The task and its counts alone: a fleet-wide task has thousands of executions.
                let v: TaskDetail = c.get_as(&format!("/v1/tasks/{id}?limit=0"))?;
                let (t, cn) = (&v.task, &v.task.counts);
                let open = t.open();
                eprint!(
                    "\rtask {id}: {}/{} succeeded, {} failed, {} expired, {} terminated, {} open ({:.0}s)   ",
                    cn.succeeded,
                    cn.total,
                    cn.failed,
                    cn.expired,
                    cn.terminated,
                    open,
                    started.elapsed().as_secs_f64()
                );
                if open == 0 {
                    eprintln!();
                    return Ok(if json_out {
                        // Done: the whole task, every execution.
                        Output::Json(to_json(&c.get_as::<TaskDetail>(&format!("/v1/tasks/{id}"))?)?)
                    } else {
                        Output::Text(format!("task {id} done: {}", t.outcome))
                    });
                }
                if timeout_seconds > 0 && started.elapsed() > Duration::from_secs(timeout_seconds) {
                    eprintln!();
                    return Err(format!("task {id} still has {open} open execution(s) after {timeout_seconds}s"));
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
}
