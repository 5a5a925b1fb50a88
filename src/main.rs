//! The sagad binary: configuration (exit 64 when it is bad), logs to stderr, bind, then
//! `app::serve` until SIGINT or SIGTERM (a second one ends the drain: exit 130 or 143), or
//! until the ledger cannot be made durable (exit 74, for a supervisor to restart it).
//! Everything else lives in the library.

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

/// Resolves on the first SIGINT or SIGTERM, which starts the drain. A second one, or one that
/// arrives once sagad stops for another reason (a ledger fault), ends it at once: the drain is
/// bounded only by --shutdown-grace, and an operator who signals again wants it over now.
/// Ending without the drain is safe: every answered write is already durable, as after SIGKILL.
fn shutdown_signal() -> impl Future<Output = ()> + Send {
    let (first_tx, first_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let Some(mut signals) = Signals::listen() else {
            // Unwatched signals keep their default action, which ends sagad at once.
            return;
        };
        let first = signals.next().await;
        // The receiver is gone once sagad stops on its own: then even a first signal is one
        // that wants it over now.
        let (name, code) = match first_tx.send(()) {
            Ok(()) => signals.next().await,
            Err(()) => first,
        };
        tracing::warn!(
            signal = name,
            exit_code = code,
            "second signal: stopping now, without finishing the drain"
        );
        std::process::exit(i32::from(code));
    });
    async move {
        if first_rx.await.is_err() {
            // No signal can be watched: serve until something else stops sagad.
            std::future::pending::<()>().await;
        }
    }
}

/// SIGINT and SIGTERM as they arrive, each with the exit code a shell gives a process that
/// signal ended (128 + its number).
struct Signals {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    fn listen() -> Option<Signals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            match (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
            ) {
                (Ok(interrupt), Ok(terminate)) => Some(Signals {
                    interrupt,
                    terminate,
                }),
                (Err(e), _) | (_, Err(e)) => {
                    tracing::warn!(error = %e, "cannot watch SIGINT and SIGTERM: no drain on a signal");
                    None
                }
            }
        }
        #[cfg(not(unix))]
        {
            Some(Signals {})
        }
    }

    async fn next(&mut self) -> (&'static str, u8) {
        #[cfg(unix)]
        {
            tokio::select! {
                Some(()) = self.interrupt.recv() => ("SIGINT", 130),
                Some(()) = self.terminate.recv() => ("SIGTERM", 143),
                else => std::future::pending().await,
            }
        }
        #[cfg(not(unix))]
        {
            match tokio::signal::ctrl_c().await {
                Ok(()) => ("Ctrl-C", 130),
                Err(_) => std::future::pending().await,
            }
        }
    }
}
