//! The `halfling` binary: see `halfling --help`.

fn main() {
    restore_default_sigpipe();
    if let Err(err) = halfling::cli::run() {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

/// Rust ignores SIGPIPE, so `halfling report ... | head` would panic on the closed pipe; a
/// command-line tool should instead end quietly, as the default signal action does.
fn restore_default_sigpipe() {
    #[cfg(unix)]
    {
        extern "C" {
            fn signal(signum: i32, handler: usize) -> usize;
        }
        const SIGPIPE: i32 = 13;
        const SIG_DFL: usize = 0;
        // SAFETY: resets one signal's disposition to the default before any thread starts.
        unsafe {
            signal(SIGPIPE, SIG_DFL);
        }
    }
}
