//! ANSI terminal output to HTML: the one place log lines become markup, for the run page's
//! first render and for the live lines sent over SSE alike (so there is one parser, unit
//! tested here, and the browser only inserts fragments the server escaped).
//!
//! Each line is rendered on its own (SGR state starts reset at every line, which keeps every
//! line self-contained for search, copy and paging). Supported: SGR bold, dim, italic,
//! underline, inverse, strike, the 16 colours (classes `a-fN`/`a-bN`, themed by the CSS), the
//! 256-colour palette and 24-bit colour (inline `color`/`background-color` built from numbers
//! only), in `;` or `:` form. Every other escape sequence (cursor moves, erase, OSC titles and
//! hyperlinks) and control character is dropped; a carriage return keeps what was drawn after
//! it (progress bars). Text is HTML-escaped: log lines are untrusted.

use std::fmt::Write;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Color {
    #[default]
    Default,
    Indexed(u8),
    Rgb(u8, u8, u8),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Style {
    fg: Color,
    bg: Color,
    bold: bool,
    dim: bool,
    italic: bool,
    underline: bool,
    inverse: bool,
    strike: bool,
}

/// A piece of a line: text (not yet escaped) and the style it is drawn in.
#[derive(Debug)]
struct Segment {
    style: Style,
    text: String,
}

/// The text of a line as a terminal would show it, without escape sequences (for the plain
/// text download and for searching).
pub fn strip(line: &str) -> String {
    segments(line).into_iter().map(|s| s.text).collect()
}

/// A log line as HTML: escaped text in `<span>`s carrying its styles.
pub fn to_html(line: &str) -> String {
    let mut out = String::with_capacity(line.len() + 16);
    for segment in segments(line) {
        if segment.text.is_empty() {
            continue;
        }
        let (classes, style) = attributes(&segment.style);
        if classes.is_empty() && style.is_empty() {
            escape_into(&mut out, &segment.text);
            continue;
        }
        out.push_str("<span");
        if !classes.is_empty() {
            let _ = write!(out, " class=\"{}\"", classes.join(" "));
        }
        if !style.is_empty() {
            let _ = write!(out, " style=\"{style}\"");
        }
        out.push('>');
        escape_into(&mut out, &segment.text);
        out.push_str("</span>");
    }
    out
}

/// HTML-escapes `text` (also quotes, so it is safe in attributes).
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    escape_into(&mut out, text);
    out
}

fn escape_into(out: &mut String, text: &str) {
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
}

fn attributes(style: &Style) -> (Vec<String>, String) {
    let (mut fg, mut bg) = (style.fg, style.bg);
    let mut classes = Vec::new();
    let mut css = String::new();
    if style.inverse {
        std::mem::swap(&mut fg, &mut bg);
        // A default side swapped becomes the theme's other colour.
        if fg == Color::Default {
            classes.push("a-fg-inv".to_owned());
        }
        if bg == Color::Default {
            classes.push("a-bg-inv".to_owned());
        }
    }
    match fg {
        Color::Default => {}
        Color::Indexed(n) if n < 16 => classes.push(format!("a-f{n}")),
        c => {
            let (r, g, b) = rgb(c);
            let _ = write!(css, "color:#{r:02x}{g:02x}{b:02x};");
        }
    }
    match bg {
        Color::Default => {}
        Color::Indexed(n) if n < 16 => classes.push(format!("a-b{n}")),
        c => {
            let (r, g, b) = rgb(c);
            let _ = write!(css, "background-color:#{r:02x}{g:02x}{b:02x};");
        }
    }
    for (on, class) in [
        (style.bold, "a-bold"),
        (style.dim, "a-dim"),
        (style.italic, "a-italic"),
        (style.underline, "a-under"),
        (style.strike, "a-strike"),
    ] {
        if on {
            classes.push(class.to_owned());
        }
    }
    (classes, css)
}

/// The xterm 256-colour palette (16-255; 0-15 are themed classes).
fn rgb(color: Color) -> (u8, u8, u8) {
    match color {
        Color::Rgb(r, g, b) => (r, g, b),
        Color::Indexed(n) if n >= 232 => {
            let v = 8 + 10 * (n - 232);
            (v, v, v)
        }
        Color::Indexed(n) if n >= 16 => {
            let n = n - 16;
            let level = |x: u8| if x == 0 { 0 } else { 55 + 40 * x };
            (level(n / 36), level((n / 6) % 6), level(n % 6))
        }
        Color::Indexed(n) => BASE16[usize::from(n)],
        Color::Default => (0, 0, 0),
    }
}

const BASE16: [(u8, u8, u8); 16] = [
    (0, 0, 0),
    (205, 49, 49),
    (13, 188, 121),
    (229, 229, 16),
    (36, 114, 200),
    (188, 63, 188),
    (17, 168, 205),
    (229, 229, 229),
    (102, 102, 102),
    (241, 76, 76),
    (35, 209, 139),
    (245, 245, 67),
    (59, 142, 234),
    (214, 112, 214),
    (41, 184, 219),
    (255, 255, 255),
];

fn segments(line: &str) -> Vec<Segment> {
    // What was drawn before the last carriage return (not at the end) was overwritten.
    let trimmed = line.strip_suffix('\r').unwrap_or(line);
    let visible = match trimmed.rfind('\r') {
        Some(at) => &trimmed[at + 1..],
        None => trimmed,
    };
    let mut out: Vec<Segment> = Vec::new();
    let mut style = Style::default();
    let mut text = String::new();
    let mut chars = visible.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            match chars.peek() {
                Some('[') => {
                    chars.next();
                    let mut params = String::new();
                    let mut last = None;
                    for c in chars.by_ref() {
                        if ('\u{40}'..='\u{7e}').contains(&c) {
                            last = Some(c);
                            break;
                        }
                        params.push(c);
                    }
                    if last == Some('m') {
                        if !text.is_empty() {
                            out.push(Segment {
                                style,
                                text: std::mem::take(&mut text),
                            });
                        }
                        apply_sgr(&mut style, &params);
                    }
                }
                Some(']') => {
                    // OSC: up to BEL or ESC \.
                    chars.next();
                    while let Some(c) = chars.next() {
                        if c == '\u{7}' {
                            break;
                        }
                        if c == '\u{1b}' && chars.peek() == Some(&'\\') {
                            chars.next();
                            break;
                        }
                    }
                }
                Some(_) => {
                    chars.next();
                }
                None => {}
            }
        } else if c == '\t' || !c.is_control() {
            text.push(c);
        }
    }
    if !text.is_empty() {
        out.push(Segment { style, text });
    }
    out
}

fn apply_sgr(style: &mut Style, params: &str) {
    // Private or malformed sequences (`?`, `>`…) change nothing.
    if params
        .chars()
        .any(|c| !(c.is_ascii_digit() || c == ';' || c == ':'))
    {
        return;
    }
    let parts: Vec<&str> = if params.is_empty() {
        vec!["0"]
    } else {
        params.split(';').collect()
    };
    let number = |p: &str| p.parse::<u32>().unwrap_or(0);
    let mut i = 0;
    while i < parts.len() {
        let part = parts[i];
        i += 1;
        // The colon form carries a colour in one part: `38:5:N`, `38:2::R:G:B` or `38:2:R:G:B`.
        if part.contains(':') {
            let sub: Vec<u32> = part.split(':').map(number).collect();
            if let [code @ (38 | 48), kind, rest @ ..] = sub.as_slice() {
                let color = match (kind, rest) {
                    (5, [n, ..]) => Some(Color::Indexed(byte(*n))),
                    (2, [.., r, g, b]) => Some(Color::Rgb(byte(*r), byte(*g), byte(*b))),
                    _ => None,
                };
                set_extended(style, *code, color);
            } else if let [4, n, ..] = sub.as_slice() {
                style.underline = *n != 0;
            }
            continue;
        }
        let code = number(part);
        match code {
            0 => *style = Style::default(),
            1 => style.bold = true,
            2 => style.dim = true,
            3 => style.italic = true,
            4 | 21 => style.underline = true,
            7 => style.inverse = true,
            9 => style.strike = true,
            22 => {
                style.bold = false;
                style.dim = false;
            }
            23 => style.italic = false,
            24 => style.underline = false,
            27 => style.inverse = false,
            29 => style.strike = false,
            30..=37 => style.fg = Color::Indexed((code - 30) as u8),
            39 => style.fg = Color::Default,
            40..=47 => style.bg = Color::Indexed((code - 40) as u8),
            49 => style.bg = Color::Default,
            90..=97 => style.fg = Color::Indexed((code - 90 + 8) as u8),
            100..=107 => style.bg = Color::Indexed((code - 100 + 8) as u8),
            38 | 48 => {
                let rest: Vec<u32> = parts[i..].iter().take(4).map(|p| number(p)).collect();
                let (color, used) = match rest.as_slice() {
                    [5, n, ..] => (Some(Color::Indexed(byte(*n))), 2),
                    [2, r, g, b, ..] => (Some(Color::Rgb(byte(*r), byte(*g), byte(*b))), 4),
                    _ => (None, rest.len().min(1)),
                };
                set_extended(style, code, color);
                i += used;
            }
            _ => {}
        }
    }
}

fn byte(v: u32) -> u8 {
    u8::try_from(v.min(255)).unwrap_or(u8::MAX)
}

fn set_extended(style: &mut Style, code: u32, color: Option<Color>) {
    if let Some(color) = color {
        if code == 38 {
            style.fg = color;
        } else {
            style.bg = color;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_is_escaped() {
        assert_eq!(
            to_html("<script>alert('x')</script> & \"q\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot;"
        );
    }

    #[test]
    fn sixteen_colours_and_attributes() {
        assert_eq!(
            to_html("\u{1b}[31mred\u{1b}[0m plain"),
            "<span class=\"a-f1\">red</span> plain"
        );
        assert_eq!(
            to_html("\u{1b}[1;4;92mok\u{1b}[22m still"),
            "<span class=\"a-f10 a-bold a-under\">ok</span><span class=\"a-f10 a-under\"> still</span>"
        );
        assert_eq!(
            to_html("\u{1b}[44;97mx\u{1b}[49;39my"),
            "<span class=\"a-f15 a-b4\">x</span>y"
        );
    }

    #[test]
    fn palette_and_true_colour() {
        assert_eq!(
            to_html("\u{1b}[38;5;196mx"),
            "<span style=\"color:#ff0000;\">x</span>"
        );
        assert_eq!(
            to_html("\u{1b}[38;5;244mx"),
            "<span style=\"color:#808080;\">x</span>"
        );
        assert_eq!(to_html("\u{1b}[38;5;3mx"), "<span class=\"a-f3\">x</span>");
        assert_eq!(
            to_html("\u{1b}[38;2;1;2;3;48;2;250;128;0mx"),
            "<span style=\"color:#010203;background-color:#fa8000;\">x</span>"
        );
        assert_eq!(
            to_html("\u{1b}[38:2::10:20:30mx"),
            "<span style=\"color:#0a141e;\">x</span>"
        );
    }

    #[test]
    fn inverse_swaps_and_other_sequences_vanish() {
        assert_eq!(
            to_html("\u{1b}[7mi"),
            "<span class=\"a-fg-inv a-bg-inv\">i</span>"
        );
        assert_eq!(
            to_html("a\u{1b}[2Kb\u{1b}]0;title\u{7}c\u{1b}]8;;http://x\u{1b}\\d\u{7}e"),
            "abcde"
        );
        assert_eq!(to_html("10%\r50%\r100%"), "100%");
        assert_eq!(strip("\u{1b}[1;31mERROR\u{1b}[0m: x\r"), "ERROR: x");
    }

    #[test]
    fn hostile_escapes_never_produce_markup() {
        // Parameters that are not numbers are ignored, never copied into the output.
        let html = to_html("\u{1b}[38;2;\"><img src=x onerror=alert(1)>m<b>");
        assert!(!html.contains("<img"), "{html}");
        assert!(!html.contains("<b>"), "{html}");
        let html = to_html("\u{1b}[38;5;999999999999mx");
        assert!(html.contains("x"), "{html}");
    }
}
