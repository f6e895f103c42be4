//! `rkictl`: the operator's command line. Each subcommand group lives in its own module; this
//! file only parses, dispatches, prints and sets the exit code.
//!
//! Exit codes: 0 done, 1 refused input or failed command (one line on stderr), 2 bad usage.

mod backend;
mod key;
mod ops;

use std::io::{self, Write};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde_json::Value;

#[derive(Debug, Parser)]
#[command(name = "rkictl", version, about = "RKI gateway operator tool")]
struct Cli {
    /// Print the result as one JSON object.
    #[arg(long, global = true)]
    json: bool,
    #[command(flatten)]
    api: ops::ApiArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Offline key calculator: DUKPT initial keys, check values, TR-31 key blocks.
    #[command(subcommand)]
    Key(key::KeyCommand),
    /// Devices: upload from CSV (key owner), list with their states, show, unlock.
    #[command(subcommand)]
    Devices(ops::DevicesCommand),
    /// Device groups.
    #[command(subcommand)]
    Groups(ops::GroupsCommand),
    /// Assign a key source to devices or a group (without --key-source: unassign).
    Assign {
        #[arg(long)]
        key_source: Option<String>,
        #[command(flatten)]
        target: ops::TargetArgs,
    },
    /// Download tasks: preview, create, list (unfinished/done), show, stop, watch.
    #[command(subcommand)]
    Tasks(ops::TasksCommand),
    /// Download records: SN, key source, key type, auto/manual, result, time, KSN, KCV.
    Records {
        #[arg(long)]
        sn: Option<String>,
        #[arg(long)]
        task: Option<i64>,
        #[arg(long, default_value = "table", value_parser = ["table", "csv", "json"])]
        format: String,
    },
    /// Keys injected per key source and month (billing).
    Billing,
    /// GUDIDs for device initialisation.
    #[command(subcommand)]
    Gudids(ops::GudidsCommand),
    /// Organizations (key owner).
    #[command(subcommand)]
    Orgs(ops::OrgsCommand),
    /// Key sources (BDKs): authorize from components or import a TR-31 block (key owner), list.
    #[command(subcommand)]
    KeySources(ops::KeySourcesCommand),
    /// Key-encryption keys (key owner): create from components, list.
    #[command(subcommand)]
    Keks(ops::KeksCommand),
    /// The audit log of operator and key-owner actions.
    Audit {
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
    /// Test only: the gateway's adjustable clock.
    #[command(subcommand)]
    Clock(ops::ClockCommand),
    /// RKI backend credentials: create (the secret is shown once), list, revoke.
    #[command(subcommand)]
    Backends(backend::BackendsCommand),
    /// Act as an RKI backend over MQTT: `watch` prints the organization's events, acking them.
    #[command(subcommand)]
    Backend(backend::BackendCommand),
}

/// What a command prints: named values in order; one JSON object with `--json`, otherwise
/// `name: value` lines.
pub type Output = Vec<(&'static str, Value)>;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) if !error.use_stderr() => {
            // --help and --version.
            return exit_after(write!(io::stdout().lock(), "{error}"), ExitCode::SUCCESS);
        }
        Err(error) => {
            eprintln!("rkictl: {}", one_line(&error.to_string()));
            return ExitCode::from(2);
        }
    };
    let client = ops::Client::new(&cli.api);
    let json = cli.json;
    let api_result = match cli.command {
        Command::Key(command) => {
            return match key::run(command) {
                Ok(output) => exit_after(print(&output, json), ExitCode::SUCCESS),
                Err(reason) => {
                    eprintln!("rkictl: {}", one_line(&reason));
                    ExitCode::from(1)
                }
            };
        }
        Command::Devices(c) => ops::devices(&client, c, json),
        Command::Groups(c) => ops::groups(&client, c, json),
        Command::Assign { key_source, target } => ops::assign(&client, key_source, target, json),
        Command::Tasks(c) => ops::tasks(&client, c, json),
        Command::Records { sn, task, format } => ops::records(&client, sn, task, &format, json),
        Command::Billing => ops::billing(&client, json),
        Command::Gudids(c) => ops::gudids(&client, c, json),
        Command::Orgs(c) => ops::orgs(&client, c, json),
        Command::KeySources(c) => ops::key_sources(&client, c, json),
        Command::Keks(c) => ops::keks(&client, c, json),
        Command::Audit { limit } => ops::audit(&client, limit, json),
        Command::Clock(c) => ops::clock(&client, c, json),
        Command::Backends(c) => backend::backends(&client, c, json),
        Command::Backend(c) => {
            return match backend::watch(c) {
                Ok(()) => ExitCode::SUCCESS,
                Err(reason) => {
                    eprintln!("rkictl: {}", one_line(&reason));
                    ExitCode::from(1)
                }
            };
        }
    };
    let result: Result<(), String> = api_result.and_then(|output| {
        let mut out = io::stdout().lock();
        match output {
            ops::Output::Json(v) => writeln!(out, "{v}"),
            ops::Output::Text(t) => writeln!(out, "{t}"),
        }
        .map_err(|e| e.to_string())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(reason) => {
            // API errors may carry one line per bad CSV line after the first.
            eprintln!("rkictl: {reason}");
            ExitCode::from(1)
        }
    }
}

/// A closed stdout (`rkictl … | head`) is a failed command, not a panic.
fn exit_after(written: io::Result<()>, code: ExitCode) -> ExitCode {
    match written {
        Ok(()) => code,
        Err(_) => ExitCode::from(1),
    }
}

fn print(output: &Output, json: bool) -> io::Result<()> {
    let mut out = io::stdout().lock();
    if json {
        let object: serde_json::Map<String, Value> =
            output.iter().map(|(name, value)| ((*name).to_owned(), value.clone())).collect();
        writeln!(out, "{}", Value::Object(object))
    } else {
        for (name, value) in output {
            write_readable(&mut out, name, value, "")?;
        }
        Ok(())
    }
}

/// `name: value`, nested objects indented under their name.
fn write_readable(out: &mut impl Write, name: &str, value: &Value, indent: &str) -> io::Result<()> {
    match value {
        Value::Object(fields) if !fields.is_empty() => {
            writeln!(out, "{indent}{name}:")?;
            for (inner_name, inner) in fields {
                write_readable(out, inner_name, inner, &format!("{indent}  "))?;
            }
            Ok(())
        }
        Value::Object(_) | Value::Null => writeln!(out, "{indent}{name}: (none)"),
        Value::String(text) => writeln!(out, "{indent}{name}: {text}"),
        other => writeln!(out, "{indent}{name}: {other}"),
    }
}

/// Clap's messages run over several lines (the error, then usage and a hint): keep the error.
fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .take_while(|line| !line.starts_with("Usage:") && !line.starts_with("For more information"))
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
        .trim_start_matches("error: ")
        .to_owned()
}
