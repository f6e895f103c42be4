//! `rkictl`: the operator's command line. Each subcommand group lives in its own module; this
//! file only parses, dispatches, prints and sets the exit code.
//!
//! Exit codes: 0 done, 1 refused input or failed command (one line on stderr), 2 bad usage.

mod key;

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
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Offline key calculator: DUKPT initial keys, check values, TR-31 key blocks.
    #[command(subcommand)]
    Key(key::KeyCommand),
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
    let result = match cli.command {
        Command::Key(command) => key::run(command),
    };
    match result {
        Ok(output) => exit_after(print(&output, cli.json), ExitCode::SUCCESS),
        Err(reason) => {
            eprintln!("rkictl: {}", one_line(&reason));
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
