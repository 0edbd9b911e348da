#!/usr/bin/python3
"""Render the README's "## Configuration" section as the man page superserver.toml(5).

Usage: packaging/readme-to-man.py README.md VERSION > superserver.toml.5

The README is the one place the configuration is documented; this converts the subset of
Markdown that section uses (### and #### headings, paragraphs, `code`, *emphasis*,
**strong**, fenced code blocks, pipe tables, "- " lists) to man(7) roff. Each table row
becomes a tagged paragraph: the first cell is the tag, the middle cells are labelled with
their column headers, the last cell is the text. Paragraphs about the README itself are left
out. The output holds no date: the same README gives the same page. Standard library only.
"""

import re
import sys

SECTION = "## Configuration"

CHARS = {
    "≤": r"\(<=", "≥": r"\(>=", "…": r"\&...", "→": r"\(->", "←": r"\(<-",
    "×": r"\(mu", "—": r"\(em", "–": r"\(en", "’": "'", "“": r"\(lq", "”": r"\(rq",
}


def escape(text, code=False):
    """Plain text to roff: backslashes, non-ASCII, and (in code) hyphens as minus signs."""
    out = text.replace("\\", r"\e")
    if code:
        out = out.replace("-", r"\-")
    res = []
    for ch in out:
        if ch in CHARS:
            res.append(CHARS[ch])
        elif ord(ch) > 127:
            res.append(r"\[u%04X]" % ord(ch))
        else:
            res.append(ch)
    return "".join(res)


INLINE = re.compile(r"``\s?(.+?)\s?``|`([^`]+)`|\*\*(.+?)\*\*|\*([^*\s][^*]*?)\*|\[([^\]]+)\]\([^)]+\)")


def inline(text):
    """Markdown inline markup to roff fonts."""
    out, pos = [], 0
    for m in INLINE.finditer(text):
        out.append(escape(text[pos:m.start()]))
        code = m.group(1) or m.group(2)
        if code is not None:
            out.append(r"\fB" + escape(code, code=True) + r"\fR")
        elif m.group(3) is not None:
            out.append(r"\fB" + inline(m.group(3)) + r"\fR")
        elif m.group(4) is not None:
            out.append(r"\fI" + inline(m.group(4)) + r"\fR")
        else:
            out.append(inline(m.group(5)))
        pos = m.end()
    out.append(escape(text[pos:]))
    return "".join(out)


def text_line(s):
    """A text line must not start with a control character."""
    return r"\&" + s if s[:1] in (".", "'") else s


def cells(row):
    row = row.strip()
    if row.startswith("|"):
        row = row[1:]
    if row.endswith("|") and not row.endswith(r"\|"):
        row = row[:-1]
    return [c.strip().replace(r"\|", "|") for c in re.split(r"(?<!\\)\|", row)]


def extract(readme):
    lines = readme.splitlines()
    try:
        start = lines.index(SECTION)
    except ValueError:
        sys.exit(f"readme-to-man: no '{SECTION}' line in the README")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return lines[start + 1:end]


def convert(lines):
    out = []
    i = 0
    para = []

    def flush():
        if para:
            text = " ".join(para)
            if "README" not in text:
                out.append(".PP")
                out.append(text_line(inline(text)))
            para.clear()

    while i < len(lines):
        line = lines[i]
        if not line.strip():
            flush()
            i += 1
        elif line.startswith("```"):
            flush()
            i += 1
            out += [".PP", ".RS 4", ".nf"]
            while i < len(lines) and not lines[i].startswith("```"):
                out.append(text_line(escape(lines[i], code=True)))
                i += 1
            out += [".fi", ".RE"]
            i += 1
        elif line.startswith("#### "):
            flush()
            out.append('.SS "' + escape(line[5:].replace("`", "").replace('"', "")) + '"')
            i += 1
        elif line.startswith("### "):
            flush()
            out.append('.SH "' + escape(line[4:].replace("`", "").replace('"', "").upper()) + '"')
            i += 1
        elif line.startswith("|"):
            flush()
            header = cells(line)
            i += 2  # the header and the |---| line
            while i < len(lines) and lines[i].startswith("|"):
                row = cells(lines[i])
                out.append(".TP")
                out.append(text_line(inline(row[0])))
                middle = [f"{h.capitalize()}: {inline(c)}." for h, c in zip(header[1:-1], row[1:-1])]
                if middle:
                    out.append(text_line(" ".join(middle)))
                    out.append(".br")
                out.append(text_line(inline(row[-1])))
                i += 1
        elif re.match(r"^- ", line):
            flush()
            item = [line[2:].strip()]
            i += 1
            while i < len(lines) and lines[i].startswith("  ") and lines[i].strip():
                item.append(lines[i].strip())
                i += 1
            out.append(r".IP \(bu 2")
            out.append(text_line(inline(" ".join(item))))
        else:
            para.append(line.strip())
            i += 1
    flush()
    return out


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__.split("\n\n")[1])
    readme, version = sys.argv[1], sys.argv[2]
    with open(readme, encoding="utf-8") as f:
        body = convert(extract(f.read()))
    page = [
        r'.\" Generated from the "Configuration" section of README.md by packaging/readme-to-man.py.',
        f'.TH SUPERSERVER.TOML 5 "" "superserver {version}" "File Formats Manual"',
        ".SH NAME",
        r"superserver.toml \- configuration of superserver(8)",
        ".SH SYNOPSIS",
        r"\fI/etc/superserver/superserver.toml\fR",
        ".br",
        r"\fI/etc/superserver/superserver.d/*.toml\fR",
        ".SH DESCRIPTION",
    ] + body + [
        ".SH FILES",
        ".TP",
        r"\fI/etc/superserver/superserver.toml\fR",
        r"The file \fBsuperserver.service\fR runs the superserver with. As packaged, it serves "
        r"the classic small services on their RFC ports on 127.0.0.1 and includes "
        r"\fI/etc/superserver/superserver.d/*.toml\fR.",
        ".TP",
        r"\fI/etc/superserver/superserver.d/\fR",
        r"Drop-in files, one or more \fB[service.\fR\fINAME\fR\fB]\fR tables each; "
        r"\fBsystemctl reload superserver\fR applies a new, changed or removed file.",
        '.SH "SEE ALSO"',
        ".BR superserver (8),",
        ".BR small\\-services (8),",
        ".BR systemd.socket (5)",
    ]
    sys.stdout.write("\n".join(page) + "\n")


if __name__ == "__main__":
    main()
