//! Devices, groups and key-source assignments.

use super::*;

pub fn devices(c: &Client, cmd: DevicesCommand, json_out: bool) -> Result<Output, String> {
    match cmd {
        DevicesCommand::Import { org, file, dry_run } => {
            let text = std::fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?;
            let path = format!("/v1/orgs/{}/devices/import?dry_run={dry_run}", enc(&org));
            let v = c.post_text(&path, &text)?;
            Ok(if json_out {
                Output::Json(v)
            } else if dry_run {
                Output::Text(format!(
                    "{} valid, {} new, {} already registered to {org}; nothing uploaded (dry run)",
                    s(&v["valid"]),
                    s(&v["new"]),
                    s(&v["already_registered"]),
                ))
            } else {
                Output::Text(format!(
                    "{} valid, {} uploaded to {org}, {} already registered",
                    s(&v["valid"]),
                    s(&v["imported"]),
                    s(&v["already_registered"]),
                ))
            })
        }
        DevicesCommand::List { sn, group, limit } => {
            // Pages of at most 1,000 (the API's largest), following next_cursor up to `limit`.
            let mut devices: Vec<Value> = Vec::new();
            let mut cursor: Option<String> = None;
            let mut total = Value::Null;
            while (devices.len() as i64) < limit {
                let page = (limit - devices.len() as i64).min(1000);
                let mut path = format!("/v1/devices?limit={page}");
                if let Some(sn) = &sn {
                    path.push_str(&format!("&sn={}", enc(sn)));
                }
                if let Some(g) = &group {
                    path.push_str(&format!("&group={}", enc(g)));
                }
                if let Some(c) = &cursor {
                    path.push_str(&format!("&cursor={}", enc(c)));
                }
                let v = c.get(&path)?;
                devices.extend(v["devices"].as_array().cloned().unwrap_or_default());
                total = v["total"].clone();
                match v["next_cursor"].as_str() {
                    Some(next) => cursor = Some(next.to_string()),
                    None => break,
                }
            }
            let v = json!({ "devices": devices, "total": total });
            if json_out {
                return Ok(Output::Json(v));
            }
            let rows = v["devices"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|d| {
                            vec![
                                s(&d["sn"]),
                                s(&d["model"]),
                                s(&d["rom_version"]),
                                s(&d["app_version"]),
                                if d["online"].as_bool() == Some(true) { "online".into() } else { "offline".into() },
                                time(&d["last_seen"]),
                                s(&d["lock"]),
                                d["assigned_key_source"]
                                    .as_str()
                                    .map(|k| format!("assigned ({k})"))
                                    .unwrap_or("unassigned".into()),
                                s(&d["task"]),
                            ]
                        })
                        .collect()
                })
                .unwrap_or_default();
            let mut out =
                table(&["SN", "MODEL", "ROM", "APP", "CONNECTION", "LAST SEEN", "LOCK", "ASSIGNMENT", "TASK"], rows);
            out.push_str(&format!("{} device(s) in the organization", s(&v["total"])));
            Ok(Output::Text(out))
        }
        DevicesCommand::Show { sn } => {
            let v = c.get(&format!("/v1/devices/{}", enc(&sn)))?;
            if json_out {
                return Ok(Output::Json(v));
            }
            let d = &v["device"];
            let mut out = String::new();
            for k in [
                "sn",
                "model",
                "rom_version",
                "app_version",
                "region",
                "online",
                "lock",
                "unlock_pending",
                "debug_mode",
                "initialised",
                "task",
            ] {
                out.push_str(&format!("{k:<16} {}\n", s(&d[k])));
            }
            out.push_str(&format!("{:<16} {}\n", "last_seen", time(&d["last_seen"])));
            if d["last_unlock_refusal"].is_object() {
                let r = &d["last_unlock_refusal"];
                out.push_str(&format!(
                    "{:<16} {} at {}: {}\n",
                    "unlock_refused",
                    s(&r["code"]),
                    time(&r["at"]),
                    s(&r["meaning"])
                ));
            }
            let slots: Vec<Vec<String>> = d["slots"]
                .as_array()
                .map(|a| {
                    a.iter().map(|x| vec![s(&x["slot"]), s(&x["key_type"]), s(&x["key_id"]), s(&x["kcv"])]).collect()
                })
                .unwrap_or_default();
            out.push_str("\nkey slots (as the device last reported them)\n");
            out.push_str(&table(&["INDEX", "KEY TYPE", "KSN / KEY ID", "KCV"], slots));
            Ok(Output::Text(out))
        }
        DevicesCommand::Unlock { sn } => {
            let v = c.post(&format!("/v1/devices/{}/unlock", enc(&sn)), &json!({}))?;
            Ok(if json_out { Output::Json(v) } else { Output::Text(format!("unlock for {sn}: {}", s(&v["unlock"]))) })
        }
    }
}

pub fn groups(c: &Client, cmd: GroupsCommand, json_out: bool) -> Result<Output, String> {
    match cmd {
        GroupsCommand::Create { name, description } => {
            let v = c.post("/v1/groups", &json!({"name": name, "description": description}))?;
            Ok(if json_out { Output::Json(v) } else { Output::Text(format!("group {name} created")) })
        }
        GroupsCommand::List => {
            let v = c.get("/v1/groups")?;
            if json_out {
                return Ok(Output::Json(v));
            }
            let rows = v["groups"]
                .as_array()
                .map(|a| a.iter().map(|g| vec![s(&g["name"]), s(&g["members"]), s(&g["description"])]).collect())
                .unwrap_or_default();
            Ok(Output::Text(table(&["GROUP", "DEVICES", "DESCRIPTION"], rows)))
        }
        GroupsCommand::Add { name, sns } => {
            let v = c.post(&format!("/v1/groups/{}/devices", enc(&name)), &json!({"sns": sns}))?;
            Ok(if json_out {
                Output::Json(v)
            } else {
                Output::Text(format!("{} device(s) added to {name}", s(&v["added"])))
            })
        }
    }
}

pub fn assign(c: &Client, key_source: Option<String>, target: TargetArgs, json_out: bool) -> Result<Output, String> {
    let body = target.into_json(json!({"key_source": key_source}))?;
    let v = c.post("/v1/assignments", &body)?;
    Ok(if json_out {
        Output::Json(v)
    } else {
        Output::Text(format!(
            "{} device(s) assigned to {}",
            s(&v["assigned"]),
            key_source.unwrap_or("nothing (unassigned)".into())
        ))
    })
}
