//! The audit log and the test clock.

use super::*;

pub fn audit(c: &Client, limit: i64, json_out: bool) -> Result<Output, String> {
    let v = c.get(&format!("/v1/audit?limit={limit}"))?;
    if json_out {
        return Ok(Output::Json(v));
    }
    let rows = v["audit"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| {
                    vec![
                        time(&e["at"]),
                        s(&e["actor"]),
                        s(&e["token_id"]),
                        s(&e["action"]),
                        s(&e["object"]),
                        e["details"].to_string(),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(Output::Text(table(&["TIME", "WHO", "TOKEN", "ACTION", "OBJECT", "DETAILS"], rows)))
}

pub fn clock(c: &Client, cmd: ClockCommand, json_out: bool) -> Result<Output, String> {
    match cmd {
        ClockCommand::Advance { seconds } => clock_step(c, i64::from(seconds), json_out),
        ClockCommand::Step { seconds } => clock_step(c, seconds, json_out),
    }
}

pub(super) fn clock_step(c: &Client, seconds: i64, json_out: bool) -> Result<Output, String> {
    let v = c.post("/v1/admin/clock", &json!({"advance_seconds": seconds}))?;
    Ok(if json_out {
        Output::Json(v)
    } else {
        Output::Text(format!(
            "clock now {} (offset {} ms); {} execution(s) expired",
            time(&v["now"]),
            s(&v["offset_ms"]),
            s(&v["expired"])
        ))
    })
}
