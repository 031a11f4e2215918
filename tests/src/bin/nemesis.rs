//! `cargo run --release -p tests --bin nemesis -- --duration 10m [--seed N]`: randomized
//! combined faults against the real binaries, with a checker (see `--help` and
//! docs/nemesis.md). Prints the seed first and one summary line last; exits 1 on any
//! violation, printing the seed and the fault schedule that replays it.

use clap::Parser;
use tests::nemesis::{self, Options};

#[tokio::main]
async fn main() {
    let options = Options::parse();
    let seed = options.seed.unwrap_or_else(nemesis::random_seed);
    println!("nemesis: seed {seed}");
    println!(
        "nemesis: replay with {}",
        nemesis::replay_command(seed, &options)
    );
    match &options.bin_dir {
        Some(dir) => tests::set_bin_dir(dir.clone()),
        None => tests::set_bin_dir(tests::build_services()),
    }
    // Pusher's per-job events (debug) are the run counts; the rest stays at info.
    tests::set_log_filter("info,pusher_svc::jobs=debug");
    let report = nemesis::run(&options, seed).await;
    if !report.violations.is_empty() {
        println!("\nviolations ({}):", report.violations.len());
        for violation in report.violations.iter().take(50) {
            println!("  {violation}");
        }
        println!("\nfault schedule of seed {seed} (start, length, kind, target):");
        for fault in &report.schedule {
            println!("  {fault}");
        }
        println!("\nreplay: {}", report.replay(&options));
    }
    println!("{}", report.summary);
    std::process::exit(if report.violations.is_empty() { 0 } else { 1 });
}
