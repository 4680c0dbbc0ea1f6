//! `stalls`: how long this machine takes a CPU away from a process that never blocks. It reads
//! the clock in a tight loop and records every gap between two reads longer than `--over`:
//! time the process wanted the CPU and did not run. Run pinned (`taskset`), alone and again
//! while the other CPU is busy: a tail latency target cannot beat the stalls the machine itself
//! puts in a request's way. Prints one JSON line. It sees a process that never blocks; a server
//! asleep in `epoll_wait` also waits for its CPU to be woken, which this does not measure.

use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::json;

#[derive(Parser)]
struct Args {
    /// Seconds to watch.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Smallest gap to count, in microseconds.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..))]
    over: u64,
    /// Only keep the CPU busy and report nothing (the load on the other CPU).
    #[arg(long)]
    busy: bool,
}

fn main() {
    let args = Args::parse();
    let duration = Duration::try_from_secs_f64(args.duration)
        .ok()
        .filter(|d| *d <= Duration::from_secs(600))
        .expect("--duration: 0 to 600 seconds");
    let over = Duration::from_micros(args.over);
    let start = Instant::now();
    let (mut last, mut gaps) = (start, Vec::new());
    loop {
        let now = Instant::now();
        if now - last > over && !args.busy {
            gaps.push((last - start, now - last));
        }
        last = now;
        if now - start >= duration {
            break;
        }
    }
    if args.busy {
        return;
    }
    let stalled: Duration = gaps.iter().map(|(_, gap)| *gap).sum();
    let us = |d: Duration| d.as_micros() as u64;
    gaps.sort_by_key(|(_, gap)| std::cmp::Reverse(*gap));
    let worst: Vec<_> = gaps
        .iter()
        .take(10)
        .map(|(at, gap)| json!({ "at_ms": at.as_millis() as u64, "us": us(*gap) }))
        .collect();
    let report = json!({
        "duration_s": args.duration,
        "over_us": args.over,
        "gaps": gaps.len(),
        "gaps_over_1ms": gaps.iter().filter(|(_, gap)| *gap > Duration::from_millis(1)).count(),
        "stalled_us": us(stalled),
        "stalled_pct": 100.0 * stalled.as_secs_f64() / (last - start).as_secs_f64(),
        "worst": worst,
    });
    println!("{report}");
}
