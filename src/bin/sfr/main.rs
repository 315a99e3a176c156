//! `sfr`: the command-line tool. Thin: parses arguments, calls the library, prints results.
mod bench;

use clap::{Parser, Subcommand};
use serde_json::json;
use sfr::io::nifti;
use sfr::{Error, Result};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "sfr", version, about = "SFR: SAM-enabled semi-supervised 3D medical image segmentation")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print a volume's dims, dtype, geometry (LPS) and value range as JSON.
    Info { file: PathBuf },
    /// Re-write a volume (NIfTI in, NIfTI out), keeping voxels and geometry.
    Convert { input: PathBuf, output: PathBuf },
    /// Run the benchmarks and print one JSON object.
    Bench {
        /// Print JSON (the only format; accepted for scripts that pass it).
        #[arg(long)]
        json: bool,
    },
}

/// `-0.0 + 0.0 == 0.0`: keeps "-0.0" (a sign flip of an exact zero) out of printed geometry.
fn tidy<const N: usize>(a: [f64; N]) -> [f64; N] {
    a.map(|x| x + 0.0)
}

fn info(file: &PathBuf) -> Result<serde_json::Value> {
    let v = nifti::read(file)?;
    let g = v.geometry();
    let (min, max) = v.min_max().unwrap_or((f64::NAN, f64::NAN));
    Ok(json!({
        "file": file,
        "dims": v.dims(),
        "dtype": v.dtype().name(),
        "spacing": tidy(g.spacing),
        "origin": tidy(g.origin),
        "direction": tidy(g.direction),
        "min": min,
        "max": max,
    }))
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Info { file } => {
            println!("{}", serde_json::to_string_pretty(&info(&file)?).map_err(|e| Error::invalid(e.to_string()))?);
        }
        Command::Convert { input, output } => {
            let v = nifti::read(&input)?;
            nifti::write_any(&output, &v)?;
            eprintln!("wrote {} ({} {:?})", output.display(), v.dtype().name(), v.dims());
        }
        Command::Bench { json: _ } => {
            println!("{}", serde_json::to_string_pretty(&bench::run()).map_err(|e| Error::invalid(e.to_string()))?);
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
