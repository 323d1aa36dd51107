//! Unit parsers shared by the gateway's configuration and `[commands]`:
//! durations, sizes and rates as written in the TOML file. A leaf module: it
//! depends on nothing else in the crate.

use std::time::Duration;

/// A rate: `count` events per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub per: Duration,
}

/// Parses a duration such as `"2s"`, `"12h"`, `"500ms"`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

/// Parses a size such as `"1MiB"`, `"16KiB"`, `"100MB"` or `"512"` (bytes).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '_')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .replace('_', "")
        .parse()
        .map_err(|_| format!("invalid size {s:?}"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => return Err(format!("invalid size unit {other:?} in {s:?}")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

/// Parses a rate such as `"50/s"`, `"5/min"`, `"1000/h"`.
pub fn parse_rate(s: &str) -> Result<Rate, String> {
    let (count, unit) = s
        .split_once('/')
        .ok_or_else(|| format!("invalid rate {s:?}: expected N/s, N/min or N/h"))?;
    let count: u32 = count
        .trim()
        .parse()
        .map_err(|_| format!("invalid rate {s:?}"))?;
    let per = match unit.trim() {
        "s" | "sec" | "second" => Duration::from_secs(1),
        "m" | "min" | "minute" => Duration::from_secs(60),
        "h" | "hour" => Duration::from_secs(3600),
        other => return Err(format!("invalid rate unit {other:?} in {s:?}")),
    };
    if count == 0 {
        return Err(format!("rate {s:?} allows nothing"));
    }
    Ok(Rate { count, per })
}
