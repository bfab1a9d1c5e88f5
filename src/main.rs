use clap::Parser;

/// mimalloc instead of glibc's malloc: under webhook load, glibc's malloc
/// and free were a third of this process's CPU (perf, docs/PERFORMANCE.md).
/// Built without transparent huge pages (`no_thp`): on a kernel that grants
/// them on `madvise`, its arenas cost an idle `slate work` 13 MiB of RSS.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = slate::cli::Cli::parse();
    let config = match slate::config::Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("configuration error: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    let level = match cli.command {
        slate::cli::Command::Bench { .. } => "warn",
        _ => "info",
    };
    slate::telemetry::init_with(config.log_format, level);
    slate::telemetry::log_panics();
    match slate::cli::run(cli, config).await {
        Ok(code) => std::process::ExitCode::from(code as u8),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
