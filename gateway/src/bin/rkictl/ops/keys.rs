//! Organizations, key sources (BDKs) and KEKs: the key owner's ceremonies, components read
//! without echo into zeroizing buffers.

use super::*;

pub fn orgs(c: &Client, cmd: OrgsCommand, json_out: bool) -> Result<Output, String> {
    match cmd {
        OrgsCommand::Create { name } => {
            let v = c.post("/v1/orgs", &json!({"name": name}))?;
            Ok(if json_out {
                Output::Json(v)
            } else {
                Output::Text(format!(
                    "organization {name} created\nadmin token (shown once; keep it secret): {}",
                    s(&v["admin_token"])
                ))
            })
        }
        OrgsCommand::List => {
            let v = c.get("/v1/orgs")?;
            if json_out {
                return Ok(Output::Json(v));
            }
            let rows = v["orgs"]
                .as_array()
                .map(|a| a.iter().map(|o| vec![s(&o["id"]), s(&o["name"]), time(&o["created_at"])]).collect())
                .unwrap_or_default();
            Ok(Output::Text(table(&["ID", "NAME", "CREATED"], rows)))
        }
    }
}

/// Reads components: from the file, or typed at a prompt with echo off. Each is `(key, KCV)`, the
/// key's hex in a zeroizing buffer, as is the file's text.
pub(super) fn read_components(file: Option<PathBuf>) -> Result<Vec<(Zeroizing<String>, String)>, String> {
    let text: Zeroizing<String> = match file {
        Some(path) => Zeroizing::new(std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?),
        None => {
            if !std::io::stdin().is_terminal() {
                return Err("components come from --components-file or a terminal prompt".into());
            }
            let mut text = Zeroizing::new(String::with_capacity(512));
            for i in 1..=3 {
                eprint!("component {i} as `HEXKEY KCV` (empty line to finish after 2): ");
                let _ = std::io::stderr().flush();
                let line = read_hidden()?;
                eprintln!();
                if line.trim().is_empty() {
                    break;
                }
                text.push_str(line.trim());
                text.push('\n');
            }
            text
        }
    };
    let hex = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit());
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .enumerate()
        .map(|(i, l)| {
            let mut parts = l.split_whitespace();
            match (parts.next(), parts.next(), parts.next()) {
                (Some(key), Some(kcv), None) if hex(key) && hex(kcv) => {
                    Ok((Zeroizing::new(key.to_string()), kcv.into()))
                }
                _ => Err(format!("component {}: expected `HEXKEY KCV`, both in hex", i + 1)),
            }
        })
        .collect()
}

/// The JSON body of a ceremony request: `fields` (public) and the components, written into one
/// zeroizing buffer (sized up front, so it never reallocates and leaves a copy behind). Keys and
/// KCVs are hex, checked by [`read_components`], so they need no escaping.
pub(super) fn ceremony_body(
    fields: &Value,
    components: &[(Zeroizing<String>, String)],
) -> Result<Zeroizing<String>, String> {
    let fields = serde_json::to_string(fields).map_err(|e| e.to_string())?;
    let head = fields.strip_suffix('}').ok_or("request fields are not a JSON object")?;
    let size = head.len() + 32 + components.iter().map(|(k, c)| k.len() + c.len() + 32).sum::<usize>();
    let mut body = Zeroizing::new(String::with_capacity(size));
    body.push_str(head);
    body.push_str(if head.len() > 1 { ",\"components\":[" } else { "\"components\":[" });
    for (i, (key, kcv)) in components.iter().enumerate() {
        body.push_str(if i == 0 { "{\"key\":\"" } else { ",{\"key\":\"" });
        body.push_str(key);
        body.push_str("\",\"kcv\":\"");
        body.push_str(kcv);
        body.push_str("\"}");
    }
    body.push_str("]}");
    Ok(body)
}

/// Reads one line from the terminal without echo (stty), so a component is not shown.
pub(super) fn read_hidden() -> Result<Zeroizing<String>, String> {
    let stty = |arg: &str| std::process::Command::new("stty").arg(arg).stdin(std::process::Stdio::inherit()).status();
    let echo_off = stty("-echo").map(|s| s.success()).unwrap_or(false);
    let mut line = Zeroizing::new(String::with_capacity(256));
    let read = std::io::stdin().lock().read_line(&mut line);
    if echo_off {
        let _ = stty("echo");
    }
    read.map_err(|e| e.to_string())?;
    Ok(line)
}

pub fn key_sources(c: &Client, cmd: KeySourcesCommand, json_out: bool) -> Result<Output, String> {
    match cmd {
        KeySourcesCommand::Authorize { org, name, algorithm, components_file, kcv } => {
            let components = read_components(components_file)?;
            let mut fields = json!({"name": name, "algorithm": algorithm});
            if let Some(k) = kcv {
                fields["kcv"] = json!(k);
            }
            let body = ceremony_body(&fields, &components)?;
            let v = c.post_secret(&format!("/v1/orgs/{}/key-sources", enc(&org)), &body)?;
            Ok(if json_out {
                Output::Json(v)
            } else {
                let k = &v["key_source"];
                Output::Text(format!(
                    "key source {} authorized for {org}: {} KCV {}",
                    s(&k["name"]),
                    s(&k["algorithm"]),
                    s(&k["kcv"])
                ))
            })
        }
        KeySourcesCommand::Import { org, name, algorithm, kek, key_block, kcv } => {
            let mut body = json!({"name": name, "algorithm": algorithm, "kek": kek, "key_block": key_block});
            if let Some(k) = kcv {
                body["kcv"] = json!(k);
            }
            let v = c.post(&format!("/v1/orgs/{}/key-sources", enc(&org)), &body)?;
            Ok(if json_out {
                Output::Json(v)
            } else {
                let k = &v["key_source"];
                Output::Text(format!(
                    "key source {} imported for {org} under KEK {kek}: {} KCV {}",
                    s(&k["name"]),
                    s(&k["algorithm"]),
                    s(&k["kcv"])
                ))
            })
        }
        KeySourcesCommand::List => {
            let v = c.get("/v1/key-sources")?;
            if json_out {
                return Ok(Output::Json(v));
            }
            let rows = v["key_sources"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|k| vec![s(&k["name"]), s(&k["algorithm"]), s(&k["kcv"]), time(&k["created_at"])])
                        .collect()
                })
                .unwrap_or_default();
            Ok(Output::Text(table(&["KEY SOURCE", "ALGORITHM", "KCV", "AUTHORIZED"], rows)))
        }
    }
}

pub fn keks(c: &Client, cmd: KeksCommand, json_out: bool) -> Result<Output, String> {
    match cmd {
        KeksCommand::Create { org, name, algorithm, components_file, kcv } => {
            let components = read_components(components_file)?;
            let mut fields = json!({"name": name, "algorithm": algorithm});
            if let Some(k) = kcv {
                fields["kcv"] = json!(k);
            }
            let body = ceremony_body(&fields, &components)?;
            let v = c.post_secret(&format!("/v1/orgs/{}/keks", enc(&org)), &body)?;
            Ok(if json_out {
                Output::Json(v)
            } else {
                let k = &v["kek"];
                Output::Text(format!(
                    "KEK {} entered for {org}: {} KCV {}",
                    s(&k["name"]),
                    s(&k["algorithm"]),
                    s(&k["kcv"])
                ))
            })
        }
        KeksCommand::List => {
            let v = c.get("/v1/keks")?;
            if json_out {
                return Ok(Output::Json(v));
            }
            let rows = v["keks"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|k| {
                            vec![s(&k["org"]), s(&k["name"]), s(&k["algorithm"]), s(&k["kcv"]), time(&k["created_at"])]
                        })
                        .collect()
                })
                .unwrap_or_default();
            Ok(Output::Text(table(&["ORG", "KEK", "ALGORITHM", "KCV", "CREATED"], rows)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ceremony_body_is_the_json_of_its_fields_and_components() {
        let dir = std::env::temp_dir().join(format!("rkictl-components-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("components.txt");
        std::fs::write(&file, "# custodians A and B\n0123456789ABCDEFFEDCBA9876543210 08D7B4\n\n 00000000000000000000000000000000  8CA64D \n")
            .expect("write");
        let components = read_components(Some(file.clone())).expect("components");
        let body = ceremony_body(&json!({"name": "bdk \"1\"", "kcv": "08D7B4"}), &components).expect("body");
        let parsed: Value = serde_json::from_str(&body).expect("JSON");
        let expected = json!({"name": "bdk \"1\"", "kcv": "08D7B4", "components": [
            {"key": "0123456789ABCDEFFEDCBA9876543210", "kcv": "08D7B4"},
            {"key": "00000000000000000000000000000000", "kcv": "8CA64D"},
        ]});
        assert_eq!(parsed, expected);
        for bad in ["0123\"456 08D7B4\n", "0123456789ABCDEF\n", "01 02 03\n"] {
            std::fs::write(&file, bad).expect("write");
            assert!(read_components(Some(file.clone())).is_err(), "{bad:?} accepted");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
