//! Minimal SVG line charts for the benchmark report (no dependencies).

/// One named series of (x, y) points.
pub struct Series {
    /// Legend label.
    pub name: String,
    /// Points, in x order.
    pub points: Vec<(f64, f64)>,
}

const COLORS: [&str; 6] = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"];

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

fn nice_max(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let mag = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if v <= m * mag {
            return m * mag;
        }
    }
    10.0 * mag
}

fn label(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.0}k", v / 1e3)
    } else if v >= 10.0 || v == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// Renders a line chart. `log_x` uses a log10 x axis (x must be > 0).
pub fn line_chart(title: &str, x_label: &str, y_label: &str, series: &[Series], log_x: bool) -> String {
    let (w, h) = (720.0, 420.0);
    let (left, right, top, bottom) = (80.0, 170.0, 40.0, 60.0);
    let pw = w - left - right;
    let ph = h - top - bottom;
    let xs: Vec<f64> = series.iter().flat_map(|s| s.points.iter().map(|p| p.0)).collect();
    let ys: Vec<f64> = series.iter().flat_map(|s| s.points.iter().map(|p| p.1)).collect();
    let tx = |x: f64| if log_x { x.max(1e-9).log10() } else { x };
    let (mut xmin, mut xmax) =
        xs.iter().fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(tx(*x)), b.max(tx(*x))));
    if xs.is_empty() || xmin == xmax {
        xmin -= 1.0;
        xmax += 1.0;
    }
    let ymax = nice_max(ys.iter().cloned().fold(0.0, f64::max));
    let px = |x: f64| left + (tx(x) - xmin) / (xmax - xmin) * pw;
    let py = |y: f64| top + ph - (y / ymax) * ph;
    let mut out = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>
<line x1="{left}" y1="{}" x2="{}" y2="{}" stroke="black"/>
<line x1="{left}" y1="{top}" x2="{left}" y2="{}" stroke="black"/>
<text x="{}" y="{}" text-anchor="middle">{}</text>
<text x="18" y="{}" text-anchor="middle" transform="rotate(-90 18 {})">{}</text>
"#,
        left + pw / 2.0,
        escape(title),
        top + ph,
        left + pw,
        top + ph,
        top + ph,
        left + pw / 2.0,
        h - 15.0,
        escape(x_label),
        top + ph / 2.0,
        top + ph / 2.0,
        escape(y_label)
    );
    for i in 0..=5 {
        let y = ymax * i as f64 / 5.0;
        out += &format!(
            "<line x1=\"{left}\" y1=\"{0}\" x2=\"{1}\" y2=\"{0}\" stroke=\"#ddd\"/><text x=\"{2}\" y=\"{3}\" text-anchor=\"end\">{4}</text>\n",
            py(y),
            left + pw,
            left - 6.0,
            py(y) + 4.0,
            label(y)
        );
    }
    let mut xticks: Vec<f64> = xs.clone();
    xticks.sort_by(|a, b| a.total_cmp(b));
    xticks.dedup();
    if xticks.len() > 8 {
        let step = xticks.len().div_ceil(8);
        xticks = xticks.into_iter().step_by(step).collect();
    }
    for x in xticks {
        out += &format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n",
            px(x),
            top + ph + 18.0,
            label(x)
        );
    }
    for (i, s) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let pts: Vec<String> = s.points.iter().map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y))).collect();
        out += &format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>\n",
            pts.join(" ")
        );
        for (x, y) in &s.points {
            out += &format!("<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{color}\"/>\n", px(*x), py(*y));
        }
        let ly = top + 10.0 + i as f64 * 18.0;
        out += &format!(
            "<rect x=\"{}\" y=\"{}\" width=\"12\" height=\"12\" fill=\"{color}\"/><text x=\"{}\" y=\"{}\">{}</text>\n",
            left + pw + 12.0,
            ly - 10.0,
            left + pw + 30.0,
            ly,
            escape(&s.name)
        );
    }
    out += "</svg>\n";
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_series_and_escapes_text() {
        let svg = line_chart(
            "A < B",
            "size",
            "Gbit/s",
            &[
                Series { name: "relay".into(), points: vec![(64.0, 0.1), (1200.0, 1.5)] },
                Series { name: "direct".into(), points: vec![(64.0, 0.5), (1200.0, 6.0)] },
            ],
            true,
        );
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("A &lt; B"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert_eq!(svg.matches("<circle").count(), 4);
        assert_eq!(nice_max(6.0), 10.0);
        assert_eq!(nice_max(1.7), 2.0);
    }
}
