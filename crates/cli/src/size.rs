//! Sizes on the command line and in human-readable output.
//!
//! Every unit is a power of 1024, whatever its spelling: `64K`, `64KiB` and `64KB` all mean
//! 65 536 bytes, `10G` is 10 × 1024³ bytes. This is what LVM (`lvcreate -L 10G`), Docker's
//! `dm.basesize` and qemu-img understand, and it keeps a pool's block size (64 KiB) a round
//! number in every unit. Fractions are refused so that a size is always a whole number of bytes.

const UNITS: [(char, u32); 5] = [('k', 1), ('m', 2), ('g', 3), ('t', 4), ('p', 5)];

/// How sizes are written, for error messages.
const HOW: &str = "1024-based, optionally followed by iB or B; e.g. 4096, 512M, 10G, 10GiB";

/// Parse a size such as `10G`, `10GiB`, `512M`, `64K`, `4096` or `4096B` into bytes.
///
/// Units are case-insensitive and 1024-based; spaces between the number and the unit are
/// allowed. Errors (as text, for clap) quote the input and say what to write instead:
/// `invalid size '12X': unknown unit 'X': use bytes or K/M/G/T/P (…)`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits_end);
    if num.is_empty() {
        return Err(format!(
            "invalid size '{s}': no number: use bytes or K/M/G/T/P after a whole number \
             ({HOW})"
        ));
    }
    let n: u64 = num.parse().map_err(|_| {
        format!(
            "invalid size '{s}': number too large (at most {})",
            u64::MAX
        )
    })?;
    if unit.starts_with(['.', ',']) {
        return Err(format!(
            "invalid size '{s}': fractions are not accepted: use a smaller unit (1536M, not \
             1.5G)"
        ));
    }
    let unit = unit.trim_start().to_ascii_lowercase();
    let shift = if unit.is_empty() || unit == "b" {
        0
    } else {
        let mut chars = unit.chars();
        let letter = chars.next().expect("unit is not empty");
        let rest = chars.as_str();
        let power = UNITS
            .iter()
            .find(|(c, _)| *c == letter)
            .map(|(_, p)| *p)
            .filter(|_| matches!(rest, "" | "b" | "ib"))
            .ok_or_else(|| {
                format!(
                    "invalid size '{s}': unknown unit '{}': use bytes or K/M/G/T/P ({HOW})",
                    &t[digits_end..].trim_start()
                )
            })?;
        10 * power
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("invalid size '{s}': more than {} bytes", u64::MAX))
}

/// A size for people: `512 B`, `64.0 KiB`, `10.0 GiB`, `1.5 TiB` (one decimal, 1024-based).
pub fn human(bytes: u64) -> String {
    const NAMES: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut unit = 0;
    let mut div = 1024u64;
    while unit + 1 < NAMES.len() && bytes / div >= 1024 {
        unit += 1;
        div *= 1024;
    }
    // Precision loss is irrelevant at one decimal.
    #[allow(clippy::cast_precision_loss)]
    let value = bytes as f64 / div as f64;
    // 1023.96 KiB would print as "1024.0 KiB": say "1.0 MiB" instead.
    if value >= 1023.95 && unit + 1 < NAMES.len() {
        return format!("{:.1} {}", value / 1024.0, NAMES[unit + 1]);
    }
    format!("{value:.1} {}", NAMES[unit])
}

/// `part` as a percentage of `whole`, one decimal (`0.0` when `whole` is zero).
pub fn percent(part: u64, whole: u64) -> String {
    if whole == 0 {
        return "0.0".to_string();
    }
    #[allow(clippy::cast_precision_loss)]
    let p = part as f64 * 100.0 / whole as f64;
    format!("{p:.1}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_bytes() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4096B"), Ok(4096));
        assert_eq!(parse_size("4096b"), Ok(4096));
        assert_eq!(parse_size(" 12 "), Ok(12));
    }

    #[test]
    fn units_are_1024_based_in_every_spelling() {
        for (s, v) in [
            ("64K", 64 << 10),
            ("64k", 64 << 10),
            ("64KiB", 64 << 10),
            ("64KB", 64 << 10),
            ("64kib", 64 << 10),
            ("512M", 512 << 20),
            ("512MiB", 512 << 20),
            ("10G", 10 << 30),
            ("10GiB", 10 << 30),
            ("10GB", 10 << 30),
            ("10 G", 10 << 30),
            ("2T", 2 << 40),
            ("3P", 3 << 50),
            ("3PiB", 3 << 50),
        ] {
            assert_eq!(parse_size(s), Ok(v), "{s}");
        }
    }

    #[test]
    fn malformed_sizes_are_refused_with_the_input_in_the_message() {
        for s in [
            "", " ", "G", "abc", "1.5G", "10Q", "10Gi", "10GiBs", "10 GB x", "-1", "+1", "1e3",
            "0x10", "10iB", "10 B B",
        ] {
            let e = parse_size(s).expect_err(s);
            assert!(e.contains(&format!("'{s}'")), "{s}: {e}");
            assert!(e.starts_with("invalid size '"), "{s}: {e}");
        }
    }

    #[test]
    fn unknown_units_say_what_to_use() {
        assert_eq!(
            parse_size("12X").unwrap_err(),
            format!("invalid size '12X': unknown unit 'X': use bytes or K/M/G/T/P ({HOW})")
        );
    }

    #[test]
    fn fractions_suggest_a_smaller_unit() {
        assert!(parse_size("1.5G").unwrap_err().contains("fractions"));
        assert!(parse_size("1,5G").unwrap_err().contains("fractions"));
    }

    #[test]
    fn overflow_is_an_error_not_a_wrap() {
        assert_eq!(parse_size("16383P"), Ok(16383 << 50));
        assert!(parse_size("16384P").unwrap_err().contains("more than"));
        assert!(
            parse_size("99999999999999999999")
                .unwrap_err()
                .contains("too large")
        );
        assert_eq!(parse_size(&u64::MAX.to_string()), Ok(u64::MAX));
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(0), "0 B");
        assert_eq!(human(1023), "1023 B");
        assert_eq!(human(1024), "1.0 KiB");
        assert_eq!(human(64 << 10), "64.0 KiB");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(10 << 30), "10.0 GiB");
        assert_eq!(human(100 << 30), "100.0 GiB");
        assert_eq!(human((1 << 20) - 1), "1.0 MiB");
        assert_eq!(human(1 << 40), "1.0 TiB");
        assert_eq!(human(u64::MAX), "16.0 EiB");
    }

    #[test]
    fn human_output_parses_back_for_whole_units() {
        for v in [1u64 << 10, 64 << 10, 512 << 20, 10 << 30, 3 << 40] {
            let h = human(v).replace(".0 ", "").replace("iB", "");
            assert_eq!(parse_size(&h), Ok(v), "{h}");
        }
    }

    #[test]
    fn percentages() {
        assert_eq!(percent(0, 0), "0.0");
        assert_eq!(percent(1, 4), "25.0");
        assert_eq!(percent(1, 3), "33.3");
    }
}
