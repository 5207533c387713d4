//! Developer and release chores: `cargo xtask fetch-model NAME`.

use std::process::ExitCode;

use easykv_models::fetch::{easykv_home, fetch_model, known_model, KNOWN_MODELS};

const USAGE: &str = "usage: cargo xtask fetch-model <NAME>   (names: see `cargo xtask list-models`)
       cargo xtask list-models";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["fetch-model", name] => fetch(name),
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
