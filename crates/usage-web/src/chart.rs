//! Bar charts drawn as SVG on the server: no script, no library, nothing to load.

use maud::{Markup, html};

/// One bar: its label (a day), its total and the part of it that failed.
#[derive(Debug, Clone)]
pub struct Bar {
    /// Shown under the bar and in its tooltip.
    pub label: String,
    /// Calls.
    pub total: u64,
    /// Calls answered with status >= 400 (drawn over the bar's base, in the error colour).
    pub errors: u64,
}

const WIDTH: u32 = 720;
const HEIGHT: u32 = 200;
const BASELINE: u32 = 170;
const TOP: u32 = 10;

/// A bar chart of `bars`, with its data also as a table for screen readers and copying.
pub fn bars(title: &str, bars: &[Bar]) -> Markup {
    let max = bars.iter().map(|b| b.total).max().unwrap_or(0).max(1);
    let slot = f64::from(WIDTH) / bars.len().max(1) as f64;
    let bar_width = (slot * 0.8).max(1.0);
    let scale = f64::from(BASELINE - TOP) / max as f64;
    // Label about ten bars, whatever their number.
    let label_every = bars.len().div_ceil(10).max(1);
    html! {
        figure.chart {
            svg viewBox={ "0 0 " (WIDTH) " " (HEIGHT) } role="img" aria-labelledby="chart-title" {
                title #chart-title { (title) }
                line.axis x1="0" y1=(BASELINE) x2=(WIDTH) y2=(BASELINE) {}
                text.scale x="2" y=(TOP + 8) { (group(max)) }
                @for (i, bar) in bars.iter().enumerate() {
                    @let x = i as f64 * slot + (slot - bar_width) / 2.0;
                    @let h = bar.total as f64 * scale;
                    @let e = bar.errors.min(bar.total) as f64 * scale;
                    g {
                        title { (bar.label) ": " (group(bar.total)) " calls, " (group(bar.errors)) " errors" }
                        rect.calls x=(fmt(x)) y=(fmt(f64::from(BASELINE) - h)) width=(fmt(bar_width)) height=(fmt(h)) {}
                        @if bar.errors > 0 {
                            rect.errors x=(fmt(x)) y=(fmt(f64::from(BASELINE) - e)) width=(fmt(bar_width)) height=(fmt(e)) {}
                        }
                    }
                    @if i.is_multiple_of(label_every) {
                        text.label x=(fmt(x)) y=(BASELINE + 16) { (short_label(&bar.label)) }
                    }
                }
            }
            figcaption {
                span.key.calls-key { "calls" } " "
                span.key.errors-key { "errors (status ≥ 400)" }
            }
            details {
                summary { "Data" }
                table {
                    thead { tr { th scope="col" { "Day" } th scope="col" { "Calls" } th scope="col" { "Errors" } } }
                    tbody {
                        @for bar in bars {
                            tr { td { (bar.label) } td.num { (group(bar.total)) } td.num { (group(bar.errors)) } }
                        }
                    }
                }
            }
        }
    }
}

fn fmt(v: f64) -> String {
    format!("{v:.1}")
}

/// `2026-11-05` → `11-05`.
fn short_label(label: &str) -> &str {
    label.get(5..).unwrap_or(label)
}

/// `1234567` → `1,234,567`.
pub fn group(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_grouped_by_thousands() {
        assert_eq!(group(0), "0");
        assert_eq!(group(999), "999");
        assert_eq!(group(1000), "1,000");
        assert_eq!(group(1_234_567), "1,234,567");
    }

    #[test]
    fn bars_scale_to_the_largest_and_errors_sit_inside() {
        let svg = bars(
            "Calls",
            &[
                Bar {
                    label: "2026-11-01".into(),
                    total: 100,
                    errors: 10,
                },
                Bar {
                    label: "2026-11-02".into(),
                    total: 50,
                    errors: 0,
                },
            ],
        )
        .into_string();
        // The largest bar spans the whole height; the other half of it.
        assert!(svg.contains(r#"height="160.0""#), "{svg}");
        assert!(svg.contains(r#"height="80.0""#), "{svg}");
        assert!(svg.contains(r#"class="errors""#));
        assert!(svg.contains("2026-11-01: 100 calls, 10 errors"));
        // No data: no division by zero, no bars.
        assert!(!bars("Calls", &[]).into_string().contains("<rect"));
    }
}
