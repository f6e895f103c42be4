//! Download records (JSON or CSV, streamed page by page) and billing counts.

use super::*;

#[derive(Deserialize, Default)]
pub(super) struct RecordQuery {
    sn: Option<String>,
    task: Option<i64>,
    format: Option<String>,
    limit: Option<i64>,
    offset: Option<i64>,
    /// The `next_cursor` of the previous page.
    cursor: Option<i64>,
}

pub(super) const RECORD_CSV_HEADER: &str =
    "sn,key_source,key_type,injection,result,error_code,error_meaning,time,key_id,kcv,task_id,execution_id\n";

pub(super) fn record_csv_line(r: &RecordRow) -> String {
    let meaning = r.error_code.map(rki_protocol::terminal::result_meaning).unwrap_or("");
    format!(
        "{},{},{},{},{},{},{},{},{},{},{},{}\n",
        csv_field(&r.sn),
        csv_field(&r.key_source),
        csv_field(&r.key_type),
        csv_field(&r.injection),
        csv_field(&r.result),
        r.error_code.map(|c| c.to_string()).unwrap_or_default(),
        csv_field(meaning),
        r.at,
        csv_field(&r.key_id),
        csv_field(&r.kcv),
        r.task_number,
        r.execution_id
    )
}

pub(super) fn record_json(r: &RecordRow) -> Value {
    let mut v = serde_json::to_value(r).unwrap_or(Value::Null);
    v["error_meaning"] = json!(r.error_code.map(rki_protocol::terminal::result_meaning));
    v["error_remedy"] =
        json!(r.error_code.and_then(rki_protocol::terminal::TerminalError::from_code).map(|t| t.remedy()));
    v
}

/// `GET /v1/records`. With `limit` (at most [`PAGE_MAX`]): one page, newest first, with
/// `next_cursor`. Without: the whole export (`format=json`, the default, or `csv`), streamed from
/// the store [`EXPORT_PAGE`] records at a time, so its memory does not grow with the history.
pub(super) async fn list_records(
    State(state): St,
    caller: Caller,
    Query(q): Query<RecordQuery>,
) -> ApiResult<Response> {
    let org = caller.org()?;
    let task = match q.task {
        Some(number) => Some(task_id(&state, org, number).await?),
        None => None,
    };
    let csv = match q.format.as_deref() {
        Some("csv") => true,
        None | Some("json") => false,
        Some(other) => return Err(ApiError::bad("bad_format", format!("format {other:?}: use json or csv"))),
    };
    if let Some(limit) = q.limit {
        let limit = page_limit(Some(limit), PAGE_MAX)?;
        let filter =
            RecordFilter { sn: q.sn, task_id: task, limit, offset: q.offset.unwrap_or(0).max(0), before_id: q.cursor };
        let rows = blocking(&state, move |s| s.list_records(org, &filter)).await?;
        let next_cursor = (rows.len() as i64 == limit).then(|| rows.last().map(|r| r.id)).flatten();
        if csv {
            let body: String =
                std::iter::once(RECORD_CSV_HEADER.to_string()).chain(rows.iter().map(record_csv_line)).collect();
            return Ok(([(header::CONTENT_TYPE, "text/csv")], body).into_response());
        }
        let records: Vec<Value> = rows.iter().map(record_json).collect();
        return Ok(Json(json!({ "records": records, "next_cursor": next_cursor })).into_response());
    }
    let permit = state.expensive()?;
    let base = RecordFilter { sn: q.sn, task_id: task, limit: EXPORT_PAGE, offset: 0, before_id: None };
    let store = state.engine.store.clone();
    // (next page's cursor, whether the first line is out, done)
    let pages = futures_util::stream::unfold((None::<i64>, false, false), move |(cursor, started, done)| {
        let store = store.clone();
        let filter = RecordFilter { before_id: cursor, ..base.clone() };
        async move {
            if done {
                return None;
            }
            let read = tokio::task::spawn_blocking(move || store.list_records(org, &filter)).await;
            let rows = match read {
                Ok(Ok(rows)) => rows,
                Ok(Err(e)) => return Some((Err(std::io::Error::other(e.to_string())), (cursor, started, true))),
                Err(e) => return Some((Err(std::io::Error::other(e.to_string())), (cursor, started, true))),
            };
            let last = rows.len() < EXPORT_PAGE as usize;
            let mut chunk = String::new();
            if !started {
                chunk.push_str(if csv { RECORD_CSV_HEADER } else { "{\"records\":[" });
            }
            for (i, r) in rows.iter().enumerate() {
                if csv {
                    chunk.push_str(&record_csv_line(r));
                } else {
                    if started || i > 0 {
                        chunk.push(',');
                    }
                    chunk.push_str(&record_json(r).to_string());
                }
            }
            let started = true;
            if last && !csv {
                chunk.push_str("]}");
            }
            let next = rows.last().map(|r| r.id).or(cursor);
            Some((Ok::<_, std::io::Error>(chunk), (next, started, last)))
        }
    });
    let body = axum::body::Body::from_stream(futures_util::StreamExt::map(pages, move |chunk| {
        let _held = &permit;
        chunk
    }));
    let content_type = if csv { "text/csv" } else { "application/json" };
    Ok(([(header::CONTENT_TYPE, content_type)], body).into_response())
}

/// One CSV cell. A cell that a spreadsheet would read as a formula (it begins with `=`, `+`, `-`,
/// `@`, a tab or a carriage return) gets a leading `'`, so an attacker-chosen name cannot become a
/// live formula in an operator's spreadsheet (OWASP, "CSV injection"); then the usual quoting.
pub(super) fn csv_field(s: &str) -> String {
    let neutral;
    let s = if s.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        neutral = format!("'{s}");
        neutral.as_str()
    } else {
        s
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

pub(super) async fn billing(State(state): St, caller: Caller) -> ApiResult<Json<Value>> {
    let org = caller.org()?;
    let rows = blocking(&state, move |s| s.billing(org)).await?;
    Ok(Json(json!({ "billing": rows })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_cells_that_a_spreadsheet_would_run_are_neutralised() {
        assert_eq!(csv_field("=HYPERLINK(\"x\")"), "\"'=HYPERLINK(\"\"x\"\")\"");
        assert_eq!(csv_field("+1"), "'+1");
        assert_eq!(csv_field("-11208"), "'-11208");
        assert_eq!(csv_field("@SUM(A1)"), "'@SUM(A1)");
        assert_eq!(csv_field("bdk1"), "bdk1");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
    }
}
