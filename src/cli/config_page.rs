//! `tokenwarden.toml(5)`: the config's manual page, rendered from `docs/configuration.md`.
//!
//! The Markdown page is the one source of the config reference (a test checks that it names
//! every key the config accepts); this turns it into roff when `generate-assets` runs, so the
//! manual cannot say something else. Only what that page uses is rendered specially: headings
//! (`#` is the title, `##` a section, `###` a subsection), paragraphs, lists, fenced code,
//! tables (one tagged paragraph per row: the first cell as the tag, the others labelled with
//! their column's header), inline code and strong text (bold), emphasis (italic) and links
//! (their text in italics, naming a page of the installed docs; an absolute URL follows in
//! angle brackets).

use clap_mangen::roff::{Inline, Roff, bold, italic, roman};
use pulldown_cmark::{Event, HeadingLevel, Options, Parser, Tag, TagEnd};

/// The page's file name, as `generate-assets` writes it.
pub const FILE: &str = "tokenwarden.toml.5";

/// The Markdown the page is rendered from.
pub const SOURCE: &str = include_str!("../../docs/configuration.md");

/// The page, in roff.
pub fn render() -> String {
    render_markdown(SOURCE)
}

/// One table being collected: its header cells, then its rows.
#[derive(Default)]
struct Table {
    head: Vec<Vec<Inline>>,
    rows: Vec<Vec<Vec<Inline>>>,
    in_head: bool,
}

/// Renders `markdown` as the `tokenwarden.toml(5)` page.
fn render_markdown(markdown: &str) -> String {
    let mut r = Roff::new();
    r.control(
        "TH",
        [
            "tokenwarden.toml",
            "5",
            "",
            &format!("tokenwarden {}", env!("CARGO_PKG_VERSION")),
            "File Formats Manual",
        ],
    );
    r.control("SH", ["NAME"]);
    r.text([roman(
        "tokenwarden.toml - the configuration file of tokenwarden(8)",
    )]);

    // Inline text of the block being read, and the style its next words take.
    let mut line: Vec<Inline> = Vec::new();
    let (mut strong, mut emphasis, mut in_title) = (0u32, 0u32, false);
    let mut heading: Option<HeadingLevel> = None;
    let mut link_url: Vec<String> = Vec::new();
    let mut code_block: Option<String> = None;
    // Open lists: whether each is ordered, and the number of its next item.
    let mut lists: Vec<Option<u64>> = Vec::new();
    // Whether the current list item has not yet started a paragraph of its own.
    let mut item_fresh = false;
    let mut table: Option<Table> = None;
    let mut cell: Vec<Inline> = Vec::new();
    let mut row: Vec<Vec<Inline>> = Vec::new();

    let push = |text: &str, strong: u32, emphasis: u32, out: &mut Vec<Inline>| {
        if text.is_empty() {
            return;
        }
        out.push(if strong > 0 {
            bold(text)
        } else if emphasis > 0 {
            italic(text)
        } else {
            roman(text)
        });
    };

    for event in Parser::new_ext(markdown, Options::ENABLE_TABLES) {
        // Inline content goes into the table cell when one is open.
        let target: &mut Vec<Inline> = if table.is_some() {
            &mut cell
        } else {
            &mut line
        };
        match event {
            Event::Start(Tag::Heading { level, .. }) => {
                heading = Some(level);
                in_title = level == HeadingLevel::H1;
            }
            Event::End(TagEnd::Heading(_)) => {
                let text = plain(&line);
                line.clear();
                match heading.take() {
                    Some(HeadingLevel::H1) => {
                        r.control("SH", ["DESCRIPTION"]);
                    }
                    Some(HeadingLevel::H2) => {
                        r.control("SH", [section_title(&text).as_str()]);
                    }
                    _ => {
                        r.control("SS", [text.as_str()]);
                    }
                }
                in_title = false;
            }
            Event::Start(Tag::Paragraph) => {
                if lists.is_empty() {
                    r.control("PP", []);
                } else if !item_fresh {
                    r.control("IP", ["\"\"", "4"]);
                }
                item_fresh = false;
            }
            Event::End(TagEnd::Paragraph) => flush(&mut r, &mut line),
            Event::Start(Tag::List(start)) => {
                flush(&mut r, &mut line);
                if !lists.is_empty() {
                    r.control("RS", ["4"]);
                }
                lists.push(start);
            }
            Event::End(TagEnd::List(_)) => {
                flush(&mut r, &mut line);
                lists.pop();
                if !lists.is_empty() {
                    r.control("RE", []);
                }
            }
            Event::Start(Tag::Item) => {
                flush(&mut r, &mut line);
                match lists.last_mut() {
                    Some(Some(n)) => {
                        r.control("IP", [format!("{n}.").as_str(), "4"]);
                        *n += 1;
                    }
                    _ => {
                        r.control("IP", ["\\(bu", "4"]);
                    }
                }
                item_fresh = true;
            }
            Event::End(TagEnd::Item) => flush(&mut r, &mut line),
            Event::Start(Tag::CodeBlock(_)) => {
                flush(&mut r, &mut line);
                code_block = Some(String::new());
            }
            Event::End(TagEnd::CodeBlock) => {
                if let Some(code) = code_block.take() {
                    r.control("PP", []);
                    r.control("RS", ["4"]);
                    r.control("nf", []);
                    for l in code.trim_end_matches('\n').lines() {
                        r.text([roman(l)]);
                    }
                    r.control("fi", []);
                    r.control("RE", []);
                }
            }
            Event::Start(Tag::Table(_)) => {
                flush(&mut r, &mut line);
                table = Some(Table::default());
            }
            Event::Start(Tag::TableHead) => {
                if let Some(t) = table.as_mut() {
                    t.in_head = true;
                }
            }
            Event::End(TagEnd::TableHead) => {
                if let Some(t) = table.as_mut() {
                    t.head = std::mem::take(&mut row);
                    t.in_head = false;
                }
            }
            Event::End(TagEnd::TableCell) => row.push(std::mem::take(&mut cell)),
            Event::End(TagEnd::TableRow) => {
                if let Some(t) = table.as_mut()
                    && !t.in_head
                {
                    t.rows.push(std::mem::take(&mut row));
                }
            }
            Event::End(TagEnd::Table) => {
                if let Some(t) = table.take() {
                    render_table(&mut r, t);
                }
            }
            Event::Start(Tag::Strong) => strong += 1,
            Event::End(TagEnd::Strong) => strong = strong.saturating_sub(1),
            Event::Start(Tag::Emphasis) => emphasis += 1,
            Event::End(TagEnd::Emphasis) => emphasis = emphasis.saturating_sub(1),
            Event::Start(Tag::Link { dest_url, .. }) => {
                link_url.push(dest_url.to_string());
                emphasis += 1;
            }
            Event::End(TagEnd::Link) => {
                emphasis = emphasis.saturating_sub(1);
                if let Some(url) = link_url.pop()
                    && (url.starts_with("https://") || url.starts_with("http://"))
                {
                    push(&format!(" <{url}>"), 0, 0, target);
                }
            }
            Event::Text(text) => match code_block.as_mut() {
                Some(code) => code.push_str(&text),
                None if in_title => {}
                None => push(&text, strong, emphasis, target),
            },
            Event::Code(code) if !in_title => push(&code, 1, 0, target),
            Event::SoftBreak => push(" ", strong, emphasis, target),
            Event::HardBreak => target.push(Inline::LineBreak),
            _ => {}
        }
    }
    flush(&mut r, &mut line);

    r.control("SH", ["SEE ALSO"]);
    r.text([
        bold("tokenwarden"),
        roman("(8), "),
        bold("tokenwarden-check"),
        roman("(8), "),
        bold("systemd.exec"),
        roman("(5), "),
        roman("the pages of "),
        italic("/usr/share/doc/tokenwarden/docs/"),
        roman(" (this page is configuration.md there), "),
        italic("/usr/share/doc/tokenwarden/examples/"),
    ]);
    r.render()
}

/// Writes the inline text collected so far as one text line, if there is any.
fn flush(r: &mut Roff, line: &mut Vec<Inline>) {
    if let Some(Inline::Roman(first) | Inline::Bold(first) | Inline::Italic(first)) =
        line.first_mut()
    {
        // A text line that starts with a space would start a new line in roff.
        *first = first.trim_start().to_string();
    }
    if !line.is_empty() {
        r.text(std::mem::take(line));
    }
}

/// The text of inline pieces, without their styles.
fn plain(inlines: &[Inline]) -> String {
    inlines
        .iter()
        .map(|i| match i {
            Inline::Roman(t) | Inline::Bold(t) | Inline::Italic(t) => t.as_str(),
            Inline::LineBreak => " ",
        })
        .collect()
}

/// A section heading as man pages write them: upper case, but not inside `[table]` names.
fn section_title(text: &str) -> String {
    if text.starts_with('[') {
        text.to_string()
    } else {
        text.to_uppercase()
    }
}

/// One tagged paragraph per row: the first cell as the tag, then every other non-empty cell
/// labelled with its column's header ("type: …; default: …"); the last column, the
/// description, unlabelled after a full stop.
fn render_table(r: &mut Roff, t: Table) {
    let labels: Vec<String> = t.head.iter().map(|h| plain(h)).collect();
    for mut cells in t.rows {
        if cells.is_empty() {
            continue;
        }
        let tag = cells.remove(0);
        r.control("TP", []);
        r.text(tag);
        let last = cells.len().saturating_sub(1);
        let mut body: Vec<Inline> = Vec::new();
        for (i, cell) in cells.into_iter().enumerate() {
            if plain(&cell).trim().is_empty() {
                continue;
            }
            if i == last && i > 0 {
                if !body.is_empty() {
                    body.push(roman(". "));
                }
            } else {
                if !body.is_empty() {
                    body.push(roman("; "));
                }
                if let Some(label) = labels.get(i + 1)
                    && last > 0
                {
                    body.push(italic(label.as_str()));
                    body.push(roman(": "));
                }
            }
            body.extend(cell);
        }
        if !body.is_empty() {
            r.text(body);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_each_construct() {
        let page = render_markdown(
            "# Title\n\nIntro with `code` and **strong**.\n\n## Keys\n\n\
             | key | type | default | meaning |\n|---|---|---|---|\n\
             | `socket` | path | none | the socket |\n\n\
             ### `[daemon]`\n\n- one\n- two [link](https://example.com/x)\n\n\
             ```toml\n.dot = 1\n[daemon]\n```\n",
        );
        for needle in [
            ".TH tokenwarden.toml 5",
            ".SH DESCRIPTION",
            "Intro with \\fBcode\\fR and \\fBstrong\\fR.",
            ".SH KEYS",
            ".TP\n\\fBsocket\\fR\n\\fItype\\fR: path; \\fIdefault\\fR: none. the socket",
            ".SS [daemon]",
            ".IP \\(bu 4\none",
            "two \\fIlink\\fR <https://example.com/x>",
            ".nf\n\\&.dot = 1\n[daemon]\n.fi",
            ".SH \"SEE ALSO\"",
        ] {
            assert!(page.contains(needle), "{needle:?} missing from:\n{page}");
        }
        assert!(!page.contains("Title"), "{page}");
    }

    #[test]
    fn the_real_page_renders() {
        let page = render();
        assert!(page.contains(".SH NAME"));
        assert!(page.contains("max_concurrent_refreshes"));
    }
}
