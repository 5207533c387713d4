//! Developer and release chores: `cargo xtask fetch-model NAME`, `cargo xtask convert-weights`,
//! `cargo xtask release`.

mod release;

use std::process::ExitCode;

use std::path::PathBuf;
use std::time::Instant;

use easykv_models::convert::gguf_to_hf_dir;
use easykv_models::fetch::{easykv_home, fetch_model, known_model, resolve_model, KNOWN_MODELS};
use easykv_models::WeightDType;

const USAGE: &str = "usage: cargo xtask fetch-model <NAME>   (names: see `cargo xtask list-models`)
       cargo xtask list-models
       cargo xtask convert-weights --input MODEL.gguf --output DIR [--dtype f32|f16|bf16]
       cargo xtask release [--features cpu,cuda,wgpu] [--dry-run]";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["fetch-model", name] => fetch(name),
        ["convert-weights", rest @ ..] => convert(rest),
        ["release", rest @ ..] => release::release(rest, USAGE),
        ["list-models"] => {
            for m in KNOWN_MODELS {
                println!("{:<22} {} ({} bytes)", m.alias, m.file_name, m.size);
            }
            Ok(())
        }
        _ => Err(USAGE.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn fetch(name: &str) -> Result<(), String> {
    let model = known_model(name).ok_or_else(|| {
        let names: Vec<_> = KNOWN_MODELS.iter().map(|m| m.alias).collect();
        format!("unknown model '{name}' (known: {})", names.join(", "))
    })?;
    let path = fetch_model(model, &easykv_home(), &mut |m| eprintln!("{m}")).map_err(|e| e.to_string())?;
    println!("{}", path.display());
    Ok(())
}

/// `convert-weights --input X.gguf --output DIR [--dtype f32|f16|bf16]`.
fn convert(args: &[&str]) -> Result<(), String> {
    let (mut input, mut output, mut dtype) = (None, None, WeightDType::F32);
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        match *flag {
            "--input" => input = Some(PathBuf::from(value)),
            "--output" => output = Some(PathBuf::from(value)),
            "--dtype" => dtype = value.parse()?,
            other => return Err(format!("unknown flag {other}\n{USAGE}")),
        }
    }
    let (Some(input), Some(output)) = (input, output) else {
        return Err(format!("convert-weights needs --input and --output\n{USAGE}"));
    };
    if input.is_dir() {
        return Err(format!(
            "{} is already a model directory: easykv loads it as it is (--model {0})",
            input.display()
        ));
    }
    let input = resolve_model(&input.to_string_lossy(), &mut |m| eprintln!("{m}")).map_err(|e| e.to_string())?;
    let t = Instant::now();
    gguf_to_hf_dir(&input, &output, dtype, &mut |m| eprintln!("{m}")).map_err(|e| e.to_string())?;
    eprintln!("wrote {} in {:.1} s", output.display(), t.elapsed().as_secs_f64());
    Ok(())
}
