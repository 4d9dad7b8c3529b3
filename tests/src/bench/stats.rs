//! Statistics over the rounds of a phase: medians, ranges, and paired comparisons (two
//! configs measured in the same round, a few seconds apart, compared round by round before
//! the median is taken, so that machine drift between rounds cancels).

use serde::Serialize;

/// One wrk run of one config in one round of a phase.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Sample {
    /// The round, from 1 (0: warm-up).
    pub round: u32,
    /// Requests per second (requests / wrk's duration).
    pub req_s: f64,
    /// wrk's p50 latency, µs.
    pub p50_us: f64,
    /// wrk's p99 latency, µs.
    pub p99_us: f64,
    /// CPU time of the proxy process (every thread) during the run divided by the requests,
    /// µs; `None` for `direct` (no proxy) or a run without requests.
    pub proxy_cpu_us_per_req: Option<f64>,
    /// Non-2xx answers plus socket errors (connect, read, write, timeout).
    pub errors: u64,
}

impl Sample {
    /// Wall time per request at saturation, µs: 1e6 / req/s (`None` without requests).
    pub fn us_per_req(&self) -> Option<f64> {
        (self.req_s > 0.0).then(|| 1e6 / self.req_s)
    }
}

/// The median of `values` (the mean of the two middle ones for an even count); `None` when
/// empty. NaN never occurs in what the bench measures and sorts last.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// A config's medians over the rounds of a phase.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Summary {
    /// Median requests per second.
    pub req_s: Option<f64>,
    /// Lowest req/s over the rounds.
    pub req_s_min: Option<f64>,
    /// Highest req/s over the rounds.
    pub req_s_max: Option<f64>,
    /// Median p50, µs.
    pub p50_us: Option<f64>,
    /// Median p99, µs.
    pub p99_us: Option<f64>,
    /// Median over the rounds that have a CPU figure.
    pub proxy_cpu_us_per_req: Option<f64>,
    /// Errors summed over the rounds.
    pub errors: u64,
    /// Rounds summarized (not in the JSON, which lists the rounds themselves).
    #[serde(skip)]
    pub rounds: usize,
}

impl Summary {
    /// Medians of `samples` (one per round).
    pub fn of(samples: &[Sample]) -> Summary {
        let col = |f: fn(&Sample) -> f64| samples.iter().map(f).collect::<Vec<_>>();
        let rps = col(|s| s.req_s);
        let cpu: Vec<f64> = samples.iter().filter_map(|s| s.proxy_cpu_us_per_req).collect();
        Summary {
            req_s: median(&rps),
            req_s_min: rps.iter().copied().reduce(f64::min),
            req_s_max: rps.iter().copied().reduce(f64::max),
            p50_us: median(&col(|s| s.p50_us)),
            p99_us: median(&col(|s| s.p99_us)),
            proxy_cpu_us_per_req: median(&cpu),
            errors: samples.iter().map(|s| s.errors).sum(),
            rounds: samples.len(),
        }
    }

    /// 1e6 / median req/s, µs.
    pub fn us_per_req(&self) -> Option<f64> {
        self.req_s.filter(|r| *r > 0.0).map(|r| 1e6 / r)
    }
}

/// What a config adds over a baseline: medians over the rounds both were measured in of
/// (config − baseline) in the same round.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Added {
    /// On 1e6 / req/s, µs per request.
    pub us_per_req: Option<f64>,
    /// On proxy CPU µs per request (rounds where both have one).
    pub proxy_cpu_us_per_req: Option<f64>,
    /// On p50, µs.
    pub p50_us: Option<f64>,
}

/// `x`'s samples paired with `base`'s by round: the pairs, in round order.
fn pairs<'a>(x: &'a [Sample], base: &'a [Sample]) -> Vec<(&'a Sample, &'a Sample)> {
    let mut p: Vec<_> = x.iter().filter_map(|s| base.iter().find(|b| b.round == s.round).map(|b| (s, b))).collect();
    p.sort_by_key(|(s, _)| s.round);
    p
}

/// [`Added`] of `x` over `base`.
pub fn added(x: &[Sample], base: &[Sample]) -> Added {
    let p = pairs(x, base);
    let us: Vec<f64> = p.iter().filter_map(|(s, b)| Some(s.us_per_req()? - b.us_per_req()?)).collect();
    let cpu: Vec<f64> = p.iter().filter_map(|(s, b)| Some(s.proxy_cpu_us_per_req? - b.proxy_cpu_us_per_req?)).collect();
    let p50: Vec<f64> = p.iter().map(|(s, b)| s.p50_us - b.p50_us).collect();
    Added { us_per_req: median(&us), proxy_cpu_us_per_req: median(&cpu), p50_us: median(&p50) }
}

/// How a second instance compares with the first: medians over rounds of
/// second / first measured in the same round.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Change {
    /// p50 of 2nd / 1st.
    pub p50_ratio: Option<f64>,
    /// p99 of 2nd / 1st.
    pub p99_ratio: Option<f64>,
    /// Proxy CPU µs/req of 2nd / 1st.
    pub proxy_cpu_ratio: Option<f64>,
    /// req/s of 2nd / 1st.
    pub req_s_ratio: Option<f64>,
    /// Rounds in which both were measured.
    pub rounds_paired: usize,
}

/// [`Change`] of `second` against `first` (a ratio is left out of a round whose
/// denominator is not positive).
pub fn change(first: &[Sample], second: &[Sample]) -> Change {
    let p = pairs(second, first);
    let ratio = |f: fn(&Sample) -> Option<f64>| -> Option<f64> {
        let r: Vec<f64> = p.iter().filter_map(|(b, a)| Some((f(b)?, f(a).filter(|d| *d > 0.0)?)).map(|(n, d)| n / d)).collect();
        median(&r)
    };
    Change {
        p50_ratio: ratio(|s| Some(s.p50_us)),
        p99_ratio: ratio(|s| Some(s.p99_us)),
        proxy_cpu_ratio: ratio(|s| s.proxy_cpu_us_per_req),
        req_s_ratio: ratio(|s| Some(s.req_s)),
        rounds_paired: p.len(),
    }
}

/// `x / unit`, e.g. an added cost in units of the empty filter's; `None` when either is
/// missing or `unit` is not positive (the unit was not measurable).
pub fn ratio(x: Option<f64>, unit: Option<f64>) -> Option<f64> {
    match (x, unit) {
        (Some(x), Some(u)) if u > 0.0 => Some(x / u),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(round: u32, req_s: f64, p50: f64, cpu: Option<f64>) -> Sample {
        Sample { round, req_s, p50_us: p50, p99_us: p50 * 2.0, proxy_cpu_us_per_req: cpu, errors: round as u64 % 2 }
    }

    #[test]
    fn median_odd_even_empty() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0]), Some(3.0));
        assert_eq!(median(&[5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[10.0, -1.0]), Some(4.5));
    }

    #[test]
    fn summary_is_medians_range_and_error_sum() {
        let v = [s(1, 1000.0, 16.0, Some(60.0)), s(2, 4000.0, 4.0, None), s(3, 2000.0, 8.0, Some(70.0))];
        let m = Summary::of(&v);
        assert_eq!(m.req_s, Some(2000.0));
        assert_eq!((m.req_s_min, m.req_s_max), (Some(1000.0), Some(4000.0)));
        assert_eq!((m.p50_us, m.p99_us), (Some(8.0), Some(16.0)));
        assert_eq!(m.proxy_cpu_us_per_req, Some(65.0), "median of the rounds that have a CPU figure");
        assert_eq!((m.errors, m.rounds), (2, 3));
        assert_eq!(m.us_per_req(), Some(500.0));
        assert_eq!(Summary::of(&[]), Summary::default());
    }

    #[test]
    fn added_pairs_rounds_before_the_median() {
        // Round 3 of x has no baseline: left out. Per round: us 1000-500=500, 250-200=50.
        let base = [s(1, 2000.0, 10.0, Some(50.0)), s(2, 5000.0, 20.0, None)];
        let x = [s(2, 4000.0, 25.0, Some(80.0)), s(1, 1000.0, 13.0, Some(60.0)), s(3, 1.0, 0.0, None)];
        let a = added(&x, &base);
        assert_eq!(a.us_per_req, Some(275.0));
        assert_eq!(a.proxy_cpu_us_per_req, Some(10.0), "only round 1 has CPU on both sides");
        assert_eq!(a.p50_us, Some(4.0));
        // The median of paired differences is not the difference of medians.
        let base = [s(1, 1000.0, 10.0, None), s(2, 2000.0, 10.0, None), s(3, 4000.0, 10.0, None)];
        let x = [s(1, 500.0, 10.0, None), s(2, 4000.0, 10.0, None), s(3, 2000.0, 10.0, None)];
        assert_eq!(added(&x, &base).us_per_req, Some(250.0));
    }

    #[test]
    fn change_is_the_median_of_same_round_ratios() {
        let first = [s(1, 100.0, 10.0, Some(50.0)), s(2, 100.0, 20.0, Some(0.0)), s(3, 100.0, 40.0, Some(40.0))];
        let second = [s(1, 110.0, 11.0, Some(55.0)), s(2, 90.0, 30.0, Some(10.0)), s(3, 120.0, 40.0, Some(60.0))];
        let c = change(&first, &second);
        assert_eq!(c.rounds_paired, 3);
        assert_eq!(c.p50_ratio, Some(1.1));
        assert_eq!(c.req_s_ratio, Some(1.1));
        // Round 2's CPU denominator is 0: left out; median of 1.1 and 1.5.
        assert_eq!(c.proxy_cpu_ratio, Some(1.3));
    }

    #[test]
    fn ratio_needs_a_positive_unit() {
        assert_eq!(ratio(Some(3.0), Some(2.0)), Some(1.5));
        assert_eq!(ratio(Some(3.0), Some(0.0)), None);
        assert_eq!(ratio(Some(3.0), Some(-1.0)), None);
        assert_eq!(ratio(None, Some(1.0)), None);
    }
}
