//! The sagad binary: configuration (exit 64 when it is bad), logs to stderr, bind, then
//! `app::serve` until SIGINT or SIGTERM, or until the ledger cannot be made durable (exit 74,
//! for a supervisor to restart it). Everything else lives in the library.

use std::io::IsTerminal;
use std::process::ExitCode;

use sagad::app;
use sagad::config::{self, Config, LogFormat, ProcessEnvironment};
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

// sagad allocates many small, short-lived buffers on several threads (requests, records,
// commands); glibc's malloc spent ~20% of sagad's CPU on them under load (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// sysexits' EX_USAGE: the configuration is wrong, so restarting will not help.
const EXIT_BAD_CONFIG: u8 = 64;
/// sysexits' EX_IOERR: the ledger could not be made durable; a restart recovers it from what
/// is on disk, so a supervisor should start sagad again.
const EXIT_LEDGER_FAULT: u8 = 74;

fn main() -> ExitCode {
    let config = match Config::load(std::env::args_os(), &ProcessEnvironment) {
        Ok(config) => config,
        Err(config::Error::Usage(e)) => {
            let code = if e.use_stderr() { EXIT_BAD_CONFIG } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
        Err(e) => {
            eprintln!("sagad: bad configuration: {e}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    init_logging(&config);

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("sagad: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let listener = match TcpListener::bind(config.listen).await {
            Ok(listener) => listener,
            Err(e) => {
                eprintln!("sagad: cannot listen on {}: {e}", config.listen);
                return ExitCode::FAILURE;
            }
        };
        match app::serve(listener, config, shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e @ app::Error::LedgerFault(_)) => {
                eprintln!("sagad: {e}");
                ExitCode::from(EXIT_LEDGER_FAULT)
            }
            Err(e) => {
                eprintln!("sagad: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

fn init_logging(config: &Config) {
    let filter = EnvFilter::try_new(&config.log_filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let colours = config::log_colours(std::io::stderr().is_terminal(), &ProcessEnvironment);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colours)
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// Resolves on the first SIGINT or SIGTERM.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = interrupt => {},
                    _ = terminate.recv() => {},
                }
            }
            Err(_) => {
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}
