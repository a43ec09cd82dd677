//! The `halfling` binary: see `halfling --help`.

fn main() {
    if let Err(err) = halfling::cli::run() {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}
