//! The one definition of the benchmarks' medians and percentiles, shared
//! by `bench`, `vm-bench` and `vm-wan-bench`.
//!
//! A percentile is a sample, never an interpolation: the value at index
//! round(p/100 x (n - 1)) of the sorted samples (numpy's `nearest`). A
//! median is therefore always one of the runs (for an even count the upper
//! of the two middle ones), which lets a report plot "the median run".

/// The `p`th percentile of `v`; `None` when `v` is empty.
pub(crate) fn percentile(v: &[f64], p: f64) -> Option<f64> {
    rank_index(v, p).map(|i| v[i])
}

/// The median of `v` (its 50th percentile).
pub(crate) fn median(v: &[f64]) -> Option<f64> {
    percentile(v, 50.0)
}

/// Index in `v` of the value [`median`] returns.
pub(crate) fn median_index(v: &[f64]) -> Option<usize> {
    rank_index(v, 50.0)
}

/// Index in `v` of its `p`th percentile.
fn rank_index(v: &[f64], p: f64) -> Option<usize> {
    if v.is_empty() {
        return None;
    }
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
    let rank = ((p / 100.0) * (v.len() as f64 - 1.0)).round() as usize;
    Some(order[rank.min(v.len() - 1)])
}

/// "median (min–max)" of some values with `digits` decimals; one value
/// alone, "–" for none.
pub(crate) fn mmm(v: &[f64], digits: usize) -> String {
    let Some(med) = median(v) else {
        return "–".into();
    };
    if v.len() == 1 {
        return format!("{med:.digits$}");
    }
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{med:.digits$} ({min:.digits$}–{max:.digits$})")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(51.0));
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&v, 100.0), Some(100.0));
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(3.0));
        assert_eq!(mmm(&[3.0, 1.0, 2.0], 1), "2.0 (1.0–3.0)");
        assert_eq!(mmm(&[3.0], 0), "3");
        assert_eq!(mmm(&[], 0), "–");
        for v in [
            vec![3.0, 1.0, 2.0],
            vec![5.0, 4.0],
            vec![7.0],
            vec![2.0, 9.0, 1.0, 4.0],
        ] {
            assert_eq!(Some(v[median_index(&v).unwrap()]), median(&v), "{v:?}");
        }
        assert_eq!(median_index(&[]), None);
    }
}
