//! Tables for people: aligned columns, two blanks apart, no trailing blanks.

/// `rows` (the header first) as aligned lines: the columns in `right` right-aligned (numbers),
/// the others left-aligned.
pub fn render(rows: &[Vec<String>], right: &[usize]) -> String {
    let mut widths = vec![0usize; rows.first().map_or(0, Vec::len)];
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (i, (c, &w)) in r.iter().zip(&widths).enumerate() {
            if right.contains(&i) {
                line.push_str(&format!("{c:>w$}  "));
            } else {
                line.push_str(&format!("{c:<w$}  "));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}
