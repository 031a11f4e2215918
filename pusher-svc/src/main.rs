//! pusher-svc binary: parse config, bind, run until SIGTERM/SIGINT.

use pusher_svc::Config;
use shared::cli;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: Config = cli::parse();
    if let Err(reason) = config.validate() {
        cli::exit_config_error(reason);
    }
    let telemetry = match shared::telemetry::init(config.log_format, "info", "pusher-svc") {
        Ok(telemetry) => telemetry,
        Err(reason) => cli::exit_config_error(reason),
    };
    if let Some(addr) = config.admin_addr.0
        && let Err(reason) = shared::metrics::install(addr)
    {
        cli::exit_config_error(reason);
    }
    let listener = match tokio::net::TcpListener::bind(config.listen_addr).await {
        Ok(listener) => listener,
        Err(error) => cli::exit_config_error(format!(
            "cannot listen on --listen-addr {}: {error}",
            config.listen_addr
        )),
    };
    let result = pusher_svc::run(config, listener, shared::shutdown::signal()).await;
    telemetry.shutdown().await;
    result
}
