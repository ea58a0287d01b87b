//! The `sidecache` binary: CLI, exit codes, runtime, telemetry, signals.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use sidecache::{reload, telemetry, tls, Config, Sidecache};
use tokio::signal::unix::{signal, SignalKind};

/// A sidecar caching and rate-limiting reverse proxy.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Path of the configuration file.
    #[arg(long, short, default_value = "proxy.toml", env = "SIDECACHE_CONFIG")]
    config: PathBuf,
    /// Validate the configuration, print a summary, and exit (0 valid, 2 invalid).
    #[arg(long)]
    check: bool,
}

/// Exit code for an invalid configuration (as `--check` documents).
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(&cli.config) {
        Ok(config) => config,
        Err(errors) => {
            eprintln!("{}: invalid configuration:", cli.config.display());
            for e in &errors.0 {
                eprintln!("  {e}");
            }
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if cli.check {
        println!("ok: {}", config.summary());
        return ExitCode::SUCCESS;
    }
    tls::install_crypto_provider();
    let telemetry = match telemetry::init(&config.log, config.telemetry.as_ref()) {
        Ok(telemetry) => telemetry,
        Err(e) => {
            eprintln!("sidecache: {:#}", anyhow::Error::new(e));
            return ExitCode::FAILURE;
        }
    };
    let code = match serve(config, cli.config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "sidecache stopped");
            eprintln!("sidecache: {e:#}");
            ExitCode::FAILURE
        }
    };
    // After the drain: the last requests' spans leave too, within a bound.
    telemetry.shutdown();
    code
}

fn serve(config: Config, path: PathBuf) -> anyhow::Result<()> {
    // The proxy's own worker threads carry the traffic; this runtime only runs the admin
    // listener, signals, reloads and background work.
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    runtime.block_on(async {
        // SIGHUP reloads; its handler is in place before the listeners open (SIGHUP's default
        // action ends the process).
        let hangup = signal(SignalKind::hangup())?;
        tracing::info!(version = env!("CARGO_PKG_VERSION"), config = config.summary(), hash = %config.hash, "starting");
        let sidecache = Sidecache::bind(config).await?;
        let watch = reload::watch(path, hangup, sidecache.reloader());
        sidecache.run(shutdown_signal()).await?;
        watch.abort();
        tracing::info!("stopped");
        Ok(())
    })
}

/// Resolves on the first SIGTERM (Kubernetes) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler installs");
    tokio::select! {
        _ = term.recv() => tracing::info!(signal = "SIGTERM", "shutdown requested"),
        _ = tokio::signal::ctrl_c() => tracing::info!(signal = "SIGINT", "shutdown requested"),
    }
}
