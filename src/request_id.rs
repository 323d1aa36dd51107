//! Request ids: 26-character, time-ordered (ULID layout). A leaf module: the
//! connection layer (answers to unparsable requests) and the gateway both
//! stamp ids, and neither depends on the other for it.

use http::HeaderValue;
use std::time::Instant;

/// A 26-character, time-ordered request id (ULID layout: 48-bit milliseconds,
/// 80 random bits, Crockford base32).
pub fn new_request_id() -> HeaderValue {
    request_id_at(Instant::now())
}

/// [`new_request_id`] for a request that arrived at `at`: the wall-clock
/// milliseconds come from one reading at start-up plus the monotonic time
/// since, so no second clock reading per request.
pub fn request_id_at(at: Instant) -> HeaderValue {
    const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
    static ANCHOR: std::sync::OnceLock<(u64, Instant)> = std::sync::OnceLock::new();
    let (wall, mono) = *ANCHOR.get_or_init(|| {
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(0))
            .unwrap_or(0);
        (wall, Instant::now())
    });
    let since = u64::try_from(at.saturating_duration_since(mono).as_millis()).unwrap_or(0);
    let ms = wall.saturating_add(since);
    let mut out = [0u8; 26];
    // 10 characters of milliseconds (the top two bits of the first are 0),
    // then 16 of randomness: 12 from one 64-bit draw, 4 from a 32-bit one.
    let (time, random) = out.split_at_mut(10);
    for (i, c) in time.iter_mut().enumerate() {
        *c = ALPHABET[((ms >> (45 - 5 * i)) & 31) as usize];
    }
    let mut draws = [fastrand::u64(..), u64::from(fastrand::u32(..))];
    for (i, c) in random.iter_mut().enumerate() {
        let draw = &mut draws[usize::from(i >= 12)];
        *c = ALPHABET[(*draw & 31) as usize];
        *draw >>= 5;
    }
    // Base32 characters are always a valid header value.
    HeaderValue::from_bytes(&out).unwrap_or(HeaderValue::from_static("0"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_ulid_shaped() {
        let a = new_request_id();
        let b = new_request_id();
        assert_eq!(a.len(), 26);
        assert_ne!(a, b);
        // The first 10 characters are the wall-clock milliseconds.
        let ms = a.as_bytes()[..10].iter().fold(0u128, |acc, c| {
            let digit = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ"
                .iter()
                .position(|x| x == c)
                .unwrap() as u128;
            (acc << 5) | digit
        });
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis();
        assert!(now.abs_diff(ms) < 5_000, "id time {ms}, now {now}");
    }
}
