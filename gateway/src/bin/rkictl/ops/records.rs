//! Download records, billing counts and GUDIDs.

use super::*;

pub fn records(
    c: &Client,
    sn: Option<String>,
    task: Option<i64>,
    format: &str,
    json_out: bool,
) -> Result<Output, String> {
    let mut path = String::from("/v1/records?");
    if let Some(sn) = sn {
        path.push_str(&format!("sn={}&", enc(&sn)));
    }
    if let Some(t) = task {
        path.push_str(&format!("task={t}&"));
    }
    if format == "csv" && !json_out {
        return c.get_text(&format!("{path}format=csv")).map(|t| Output::Text(t.trim_end().to_string()));
    }
    let v = c.get(&path)?;
    if json_out || format == "json" {
        return Ok(Output::Json(v));
    }
    let rows = v["records"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| {
                    vec![
                        s(&r["sn"]),
                        s(&r["key_source"]),
                        s(&r["key_type"]),
                        s(&r["injection"]),
                        s(&r["result"]),
                        r["error_code"]
                            .as_i64()
                            .map(|e| format!("{e} ({})", s(&r["error_meaning"])))
                            .unwrap_or_default(),
                        time(&r["at"]),
                        s(&r["key_id"]),
                        s(&r["kcv"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(Output::Text(table(
        &["SN", "KEY SOURCE", "KEY TYPE", "INJECTION", "RESULT", "ERROR", "TIME", "KSN / KEY ID", "KCV"],
        rows,
    )))
}

pub fn billing(c: &Client, json_out: bool) -> Result<Output, String> {
    let v = c.get("/v1/billing")?;
    if json_out {
        return Ok(Output::Json(v));
    }
    let rows = v["billing"]
        .as_array()
        .map(|a| a.iter().map(|b| vec![s(&b["month"]), s(&b["key_source"]), s(&b["keys"])]).collect())
        .unwrap_or_default();
    Ok(Output::Text(table(&["MONTH", "KEY SOURCE", "KEYS INJECTED"], rows)))
}

pub fn gudids(c: &Client, cmd: GudidsCommand, json_out: bool) -> Result<Output, String> {
    match cmd {
        GudidsCommand::Provision { sns } => {
            let v = c.post("/v1/gudids", &json!({"sns": sns}))?;
            if json_out {
                return Ok(Output::Json(v));
            }
            let rows = v["gudids"]
                .as_array()
                .map(|a| a.iter().map(|g| vec![s(&g["sn"]), s(&g["gudid"]), time(&g["expires_at"])]).collect())
                .unwrap_or_default();
            let mut out = table(&["SN", "GUDID (shown once)", "EXPIRES"], rows);
            let replaced = v["gudids"]
                .as_array()
                .map(|a| a.iter().filter(|g| g["revoked"].as_array().is_some_and(|r| !r.is_empty())).count())
                .unwrap_or(0);
            if replaced > 0 {
                out.push_str(&format!("revoked the earlier live GUDID of {replaced} SN(s): only the new one works\n"));
            }
            out.push_str("type each GUDID into its terminal; each works once, within 72 hours");
            Ok(Output::Text(out))
        }
        GudidsCommand::List { sn, live } => {
            let mut query = Vec::new();
            if let Some(sn) = sn {
                query.push(format!("sn={}", enc(&sn)));
            }
            if live {
                query.push("live=true".to_string());
            }
            let path =
                if query.is_empty() { "/v1/gudids".to_string() } else { format!("/v1/gudids?{}", query.join("&")) };
            let v = c.get(&path)?;
            if json_out {
                return Ok(Output::Json(v));
            }
            let rows = v["gudids"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|g| {
                            vec![
                                s(&g["id"]),
                                s(&g["sn"]),
                                s(&g["status"]),
                                s(&g["provisioned_by"]),
                                time(&g["provisioned_at"]),
                                time(&g["expires_at"]),
                                time(&g["used_at"]),
                                time(&g["revoked_at"]),
                            ]
                        })
                        .collect()
                })
                .unwrap_or_default();
            Ok(Output::Text(table(
                &["ID", "SN", "STATUS", "PROVISIONED BY", "PROVISIONED", "EXPIRES", "USED", "REVOKED"],
                rows,
            )))
        }
        GudidsCommand::Revoke { id } => {
            let v = c.post(&format!("/v1/gudids/{id}/revoke"), &json!({}))?;
            if json_out {
                return Ok(Output::Json(v));
            }
            let g = &v["gudid"];
            Ok(Output::Text(format!(
                "GUDID {} of {} revoked: it no longer initialises the terminal",
                s(&g["id"]),
                s(&g["sn"])
            )))
        }
    }
}
