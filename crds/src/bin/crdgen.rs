//! Writes every Tidepool CRD to `crds/yaml/<name>.yaml` (or to the directory
//! given as the first argument), replacing what is there.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let dir = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("yaml"));
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("cannot create {}: {e}", dir.display());
        return ExitCode::FAILURE;
    }
    for crd in tidepool_crds::generate::all() {
        let path = dir.join(tidepool_crds::generate::file_name(&crd));
        let yaml = match tidepool_crds::generate::render(&crd) {
            Ok(yaml) => yaml,
            Err(e) => {
                eprintln!("cannot render {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
        };
        if let Err(e) = std::fs::write(&path, yaml) {
            eprintln!("cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        println!("wrote {}", path.display());
    }
    ExitCode::SUCCESS
}
