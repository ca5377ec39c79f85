#!/usr/bin/env python3
"""Build the shipped calibration / held-out prose from gensim's shortened Wikipedia dump.

Source: ``gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``
inside the gensim 4.4.0 wheel (about 200 pages, about half of them redirects).  gensim is never
installed or imported: the wheel is fetched with ``pip download`` and read as a zip file.

Output (default ``calibration/`` at the repository root):

* ``calib.txt``   -- articles with index % 4 != 3 (articles sorted by page id)
* ``heldout.txt`` -- articles with index % 4 == 3
* ``SOURCES.md``  -- titles and page ids of each split, source file, sha256, licence

Articles are separated by one blank line; each starts with its title on its own line, followed
by one line per paragraph / section heading.  The wiki-markup cleaner is stdlib only and
deterministic: running the script twice gives byte-identical files.

Usage::

    python tools/make_calibration_text.py                 # downloads the wheel into a temp dir
    python tools/make_calibration_text.py path/to/dump.bz2 # or the .whl, or an extracted .xml
"""

from __future__ import annotations

import argparse
import bz2
import hashlib
import html
import io
import os
import re
import subprocess
import sys
import tempfile
import unicodedata
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

GENSIM_VERSION = "4.4.0"
DUMP_NAME = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
DUMP_MEMBER = "gensim/test/test_data/" + DUMP_NAME
# sha256 of the .bz2 as shipped in gensim 4.4.0 (checked: manylinux x86_64 cp311 wheel).
EXPECTED_DUMP_SHA256 = "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d"
# Pin one wheel so that `pip download` fetches the same file on any host / Python.
PIP_PLATFORM_ARGS = (
    "--only-binary=:all:",
    "--platform", "manylinux_2_28_x86_64",
    "--python-version", "3.11",
    "--implementation", "cp",
    "--abi", "cp311",
)
HELDOUT_EVERY = 4  # index % 4 == 3 -> held-out

REPO_ROOT = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------- source loading


def download_dump(tmpdir: Path) -> bytes:
    """pip-download the gensim wheel (no deps, binary only) and return the .bz2 bytes from it."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *PIP_PLATFORM_ARGS,
           f"gensim=={GENSIM_VERSION}", "-d", str(tmpdir)]
    print("running:", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True, stdout=sys.stderr)
    wheels = sorted(tmpdir.glob(f"gensim-{GENSIM_VERSION}-*.whl"))
    if not wheels:
        raise SystemExit(f"pip download left no gensim {GENSIM_VERSION} wheel in {tmpdir}")
    return read_from_wheel(wheels[0])


def read_from_wheel(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as zf:
        return zf.read(DUMP_MEMBER)


def load_dump(path: str | None) -> bytes:
    """Return the compressed (.bz2) dump bytes, or raw XML bytes for an extracted .xml."""
    if path is None:
        with tempfile.TemporaryDirectory(prefix="sq_calib_") as tmp:
            return download_dump(Path(tmp))
    p = Path(path)
    if p.suffix == ".whl":
        return read_from_wheel(p)
    return p.read_bytes()


def xml_stream(data: bytes) -> io.BufferedIOBase:
    if data[:3] == b"BZh":
        return bz2.BZ2File(io.BytesIO(data))
    return io.BytesIO(data)


def iter_articles(data: bytes):
    """Yield (page_id, title, wikitext) for main-namespace, non-redirect pages."""
    for _event, elem in ET.iterparse(xml_stream(data), events=("end",)):
        if elem.tag.rsplit("}", 1)[-1] != "page":
            continue
        ns = elem.findtext("{*}ns")
        redirect = elem.find("{*}redirect") is not None
        title = elem.findtext("{*}title") or ""
        page_id = int(elem.findtext("{*}id"))
        text = elem.findtext("{*}revision/{*}text") or ""
        elem.clear()
        if ns != "0" or redirect or text.lstrip().lower().startswith("#redirect"):
            continue
        yield page_id, title, text


# --------------------------------------------------------------------------- wiki markup cleaner

DROP_SECTIONS = {
    "see also", "references", "external links", "further reading", "notes", "footnotes",
    "bibliography", "sources", "citations", "notes and references", "references and notes",
    "works cited", "cited sources", "sources and further reading", "external sources",
    "other uses", "gallery", "related articles", "bibliography and further reading",
    "general references", "literature", "online sources", "print sources", "primary sources",
    "secondary sources", "notes and sources", "footnotes and references", "explanatory notes",
    "links", "web links", "reference", "note", "discography", "filmography", "selected works",
    "works", "publications", "selected publications", "selected bibliography",
    "secondary references", "references and further reading", "reference literature",
    "partial filmography as director", "other books", "list of works", "etymological bibliography",
    "editions", "cited in footnotes", "bibliographies", "additional references", "books",
    "travel books", "textbooks and key theoretical works", "articles written for vedanta and the west",
    "major works", "resources", "online resources", "further information",
}
# Also dropped: any heading mentioning one of these.
DROP_SECTION_RE = re.compile(
    r"bibliograph|filmograph|discograph|further reading|external links|see also|references")

# Tags whose whole content goes (not prose, or not renderable as prose).
DROP_CONTENT_TAGS = (
    "ref", "math", "gallery", "timeline", "source", "syntaxhighlight", "score", "hiero",
    "imagemap", "graph", "chem", "ce", "references", "mapframe", "maplink", "templatedata",
    "inputbox", "categorytree", "noinclude", "includeonly",
)

LANG_PREFIX = re.compile(r"^[a-z]{2,3}(?:-[a-z]{2,8})*$|^simple$")
DROP_LINK_FULL = {"file", "image", "category", "media"}
LINK_PREFIXES = {"wikipedia", "wp", "template", "help", "portal", "special", "user", "talk",
                 "module", "draft", "book", "mediawiki", "timedtext", "wikt", "wiktionary",
                 "wikisource", "s", "q", "wikiquote", "n", "wikinews", "b", "wikibooks",
                 "v", "wikiversity", "voy", "wikivoyage", "commons", "species", "wikispecies",
                 "d", "wikidata", "m", "meta", "w", "category", "file", "image", "media"}

CONVERT_UNITS = {
    "km2": "km²", "sqkm": "km²", "mi2": "sq mi", "sqmi": "sq mi", "m2": "m²", "sqm": "m²",
    "ft2": "sq ft", "sqft": "sq ft", "cm2": "cm²", "km3": "km³", "m3": "m³", "cuft": "cu ft",
    "C": "°C", "F": "°F", "K": "K", "acre": "acres", "ha": "ha", "mi": "mi", "km": "km",
    "m": "m", "ft": "ft", "in": "in", "cm": "cm", "mm": "mm", "kg": "kg", "lb": "lb", "t": "t",
    "kmh": "km/h", "km/h": "km/h", "mph": "mph", "nmi": "nmi", "ftm": "fathoms", "l": "L",
    "L": "L", "usgal": "US gal", "impgal": "imp gal", "oz": "oz", "g": "g", "mg": "mg",
    "lb/sqin": "psi", "psi": "psi", "kn": "kn", "hp": "hp", "kW": "kW", "MW": "MW",
    "GW": "GW", "km/s": "km/s", "m/s": "m/s", "ft/s": "ft/s", "AU": "AU", "ly": "ly",
    "pc": "pc", "e6km2": "million km²", "e6sqmi": "million sq mi", "e3km2": "thousand km²",
    "e6acre": "million acres", "e6t": "million tonnes", "e3t": "thousand tonnes",
    "ST": "short tons", "LT": "long tons", "nm": "nm", "um": "µm", "μm": "µm", "yd": "yd",
}
CONVERT_RANGE = {"-": "–", "–": "–", "to": " to ", "and": " and ", "or": " or ",
                 "by": " by ", "x": " × ", "×": " × ", "+": " + ", "to(-)": " to ",
                 "and(-)": " and "}

MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December")

# Templates whose first positional argument is the displayed text.
FIRST_ARG = {
    "nowrap", "nobr", "small", "smaller", "big", "larger", "large", "resize", "vanchor",
    "visible anchor", "angbr", "abbr", "nihongo", "nihongo2", "flag", "flagcountry",
    "not a typo", "not typo", "proper name", "sub", "sup", "mvar", "var", "math", "ill", "interlanguage link",
    "interlanguage link multi", "nts", "ntsh", "number table sorting", "sortname", "sort",
    "keypress", "em", "strong", "tooltip", "text", "ety", "lang-en", "linktext", "wikt-lang",
    "nastaliq", "script", "transl", "oldstyle", "unbulleted list", "midsize",
    "serif", "sans-serif", "smallcaps", "small caps", "sc", "lowercase", "uc", "lc",
    "gloss", "qnote", "bigger", "nbsp", "mono", "code", "samp", "kbd", "nq", "vr", "nobold",
    "marriage", "nowrap begin",
}
# Templates whose last positional argument is the displayed text.
LAST_ARG = {"lang", "transl", "transliteration", "sortname", "lang-rtl", "rtl-lang"}
LITERAL = {
    "'": "'", "'s": "'s", "''": "", "snd": " – ", "spaced ndash": " – ", "ndash": "–",
    "mdash": "—", "spaced mdash": " — ", "nbsp": " ", "-": "", "·": "", "dot": "", "middot": "·",
    "!": "", "pipe": "", "=": "=", "en dash": "–", "em dash": "—", "sndash": " – ",
    "thinsp": " ", "zwsp": "", "hair space": " ", "tsp": " ", "bull": "•", "shy": "",
    "times": "×", "degree": "°", "mdashb": "—", "spaces": " ", "' \"": "'\"",
    "carbon": "C", "hydrogen": "H", "oxygen": "O", "nitrogen": "N", "sulfur": "S", "eqm": " ⇌ ", "eqn": " ⇌ ", "ell": "ℓ", "minus": "−", "euro": "€", "pound": "£", "yen": "¥",
}


def _find_close(s: str, i: int, open_: str, close: str) -> int:
    """Index just past the `close` that balances the `open_` at s[i]; -1 if unbalanced."""
    depth = 0
    n = len(s)
    while i < n:
        if s.startswith(open_, i):
            depth += 1
            i += len(open_)
        elif s.startswith(close, i):
            depth -= 1
            i += len(close)
            if depth == 0:
                return i
        else:
            i += 1
    return -1


def _split_args(body: str) -> list[str]:
    """Split template body at top-level pipes (links [[a|b]] keep their pipes)."""
    parts, depth, cur, i = [], 0, [], 0
    while i < len(body):
        if body.startswith("[[", i):
            depth += 1
            cur.append("[[")
            i += 2
        elif body.startswith("]]", i) and depth:
            depth -= 1
            cur.append("]]")
            i += 2
        elif body[i] == "|" and depth == 0:
            parts.append("".join(cur))
            cur = []
            i += 1
        else:
            cur.append(body[i])
            i += 1
    parts.append("".join(cur))
    return parts


def _named(args: list[str]) -> tuple[list[str], dict[str, str]]:
    pos, named, numbered = [], {}, {}
    for a in args:
        m = re.match(r"\s*([A-Za-z0-9_ -]+?)\s*=(.*)$", a, re.S)
        if m and not a.lstrip().startswith("[["):
            key = m.group(1).strip().lower()
            if key.isdigit():
                numbered[int(key)] = m.group(2).strip()  # {{x|1=a=b}}
            else:
                named[key] = m.group(2).strip()
        else:
            pos.append(a.strip())
    for k in sorted(numbered):
        if 1 <= k <= len(pos):
            pos[k - 1] = numbered[k]
        else:
            pos.append(numbered[k])
    return pos, named


def _date(pos: list[str]) -> str:
    nums = [p for p in pos if re.fullmatch(r"-?\d{1,4}", p)]
    if len(nums) >= 3 and 1 <= int(nums[1]) <= 12:
        return f"{int(nums[2])} {MONTHS[int(nums[1]) - 1]} {int(nums[0])}"
    if len(nums) == 2 and 1 <= int(nums[1]) <= 12:
        return f"{MONTHS[int(nums[1]) - 1]} {int(nums[0])}"
    if nums:
        return nums[0]
    return ""


def _convert(pos: list[str]) -> str:
    if not pos:
        return ""
    parts = [pos[0]]
    i = 1
    while i + 1 < len(pos) and pos[i] in CONVERT_RANGE:
        parts.append(CONVERT_RANGE[pos[i]])
        parts.append(pos[i + 1])
        i += 2
    unit = pos[i] if i < len(pos) else ""
    unit = CONVERT_UNITS.get(unit, unit)
    value = "".join(parts)
    if unit in ("°C", "°F"):
        return f"{value} {unit}"
    return f"{value} {unit}".strip()


def render_template(body: str) -> str:
    """Render one template (inner templates already rendered) to plain text, usually ''."""
    args = _split_args(body)
    name = args[0].strip().replace("_", " ")
    lname = re.sub(r"\s+", " ", name).lower()
    if lname.startswith("template:"):
        lname = lname[len("template:"):]
    pos, named = _named(args[1:])
    if lname in LITERAL:
        return LITERAL[lname]
    if ":" in lname and lname.split(":", 1)[0] in ("formatnum", "lc", "uc", "lcfirst", "ucfirst"):
        return name.split(":", 1)[1].strip()
    if lname in ("ship", "uss", "hms", "sms", "hmas", "hmcs", "rms", "ss", "mv"):
        prefix = "" if lname == "ship" else name.strip().upper() + " "
        return (prefix + " ".join(pos[:2])).strip()
    if lname in ("simplenuclide2", "simplenuclide", "nuclide2", "nuclide"):
        return "-".join(pos[:2])
    if lname == "e":
        return ("×10^" + pos[0]) if pos else ""
    if lname == "music":
        return {"flat": "♭", "sharp": "♯", "natural": "♮"}.get(pos[0] if pos else "", "")
    if lname == "sic":
        return pos[-1] if pos and pos[-1] not in ("?", "nolink=y") else ""
    if lname in ("convert", "cvt"):
        return _convert(pos)
    if lname.startswith("lang-") and lname not in ("lang-rtl",):
        return pos[0] if pos else ""
    if lname in LAST_ARG:
        return pos[-1] if pos else ""
    if lname in FIRST_ARG:
        return pos[0] if pos else ""
    if lname in ("as of", "asof"):
        if not pos:
            return ""
        lead = "as of" if named.get("lc", "") in ("y", "yes", "on") else "As of"
        return f"{lead} {_date(pos) or pos[0]}"
    if lname in ("circa", "c.", "c"):
        return ("c. " + pos[0]) if pos else "c."
    if lname in ("birth date", "death date", "birth date and age", "death date and age",
                 "start date", "end date", "start date and age", "dts", "date", "bda",
                 "film date", "release date"):
        return _date(pos)
    if lname in ("frac", "fraction", "sfrac"):
        if len(pos) == 3:
            return f"{pos[0]} {pos[1]}/{pos[2]}"
        if len(pos) == 2:
            return f"{pos[0]}/{pos[1]}"
        return f"1/{pos[0]}" if pos else ""
    if lname in ("quote", "blockquote", "quotation", "cquote", "quote box"):
        text = named.get("text") or named.get("quote") or (pos[0] if pos else "")
        return "\n" + text + "\n" if text else ""
    if lname in ("chem", "chem2", "chemf"):
        return "".join(pos)
    if lname in ("val",):
        return pos[0] if pos else ""
    if lname in ("ordinal", "ord"):
        return pos[0] if pos else ""
    if lname in ("us$", "usd", "us dollar"):
        return ("US$" + pos[0]) if pos else "US$"
    if lname in ("£", "gbp"):
        return ("£" + pos[0]) if pos else "£"
    if lname in ("€", "eur"):
        return ("€" + pos[0]) if pos else "€"
    if lname in ("bce", "bc"):
        return (pos[0] + " BC") if pos else "BC"
    if lname in ("ce", "ad"):
        return (pos[0] + " AD") if pos else "AD"
    if lname in ("floruit", "fl.", "fl"):
        return ("fl. " + pos[0]) if pos else "fl."
    if lname in ("reign", "r."):
        return ("r. " + "–".join(pos[:2])) if pos else "r."
    if lname in ("lit", "literally", "lit."):
        return ("lit. '" + pos[0] + "'") if pos else ""
    if lname in ("ipa", "ipa-all", "ipac-en", "ipa-en", "ipac", "respell", "audio", "pronunciation"):
        return ""
    return ""


def expand_templates(s: str) -> str:
    out, i, n = [], 0, len(s)
    while i < n:
        j = s.find("{{", i)
        if j < 0:
            out.append(s[i:])
            break
        out.append(s[i:j])
        if s.startswith("{{{", j):  # template parameter {{{x|default}}} -> default / ''
            end = _find_close(s, j, "{{{", "}}}")
            if end < 0:
                i = j + 3
                continue
            inner = _split_args(expand_templates(s[j + 3:end - 3]))
            out.append(inner[1] if len(inner) > 1 else "")
            i = end
            continue
        end = _find_close(s, j, "{{", "}}")
        if end < 0:  # unbalanced: drop the opener, keep going
            i = j + 2
            continue
        body = expand_templates(s[j + 2:end - 2])
        out.append(render_template(body))
        i = end
    return "".join(out)


def remove_tables(s: str) -> str:
    out, depth = [], 0
    for line in s.split("\n"):
        st = line.lstrip(" :")
        if st.startswith("{|"):
            depth += 1
            continue
        if depth:
            if st.startswith("|}"):
                depth -= 1
            continue
        out.append(line)
    return "\n".join(out)


def drop_sections(s: str) -> str:
    out, skip_level = [], 0
    for line in s.split("\n"):
        m = re.match(r"^(=+)\s*(.*?)\s*\1\s*$", line.strip())
        if m and len(m.group(1)) <= 6:
            level = len(m.group(1))
            if skip_level and level > skip_level:
                continue
            skip_level = 0
            title = re.sub(r"<[^>]*>|\[\[|\]\]|'{2,}", "", m.group(2)).strip().lower()
            if title in DROP_SECTIONS or DROP_SECTION_RE.search(title):
                skip_level = level
                continue
        elif skip_level:
            continue
        out.append(line)
    return "\n".join(out)


def _link(inner: str) -> str:
    """Plain text of one link body (the part between [[ and ]])."""
    target, _, text = inner.partition("|")
    t = target.strip()
    colon = t.startswith(":")
    t = t.lstrip(":").strip()
    prefix = t.split(":", 1)[0].strip().lower() if ":" in t else ""
    if prefix in DROP_LINK_FULL and not colon:
        return ""  # images, categories
    if prefix and LANG_PREFIX.match(prefix) and not colon and not text:
        return ""  # interlanguage link
    if text:
        if "|" in text:  # unexpected extra parameters: keep the last part
            text = text.rsplit("|", 1)[-1]
        if text.strip():
            return text
        # pipe trick: [[Foo (bar)|]] -> Foo, [[Wiktionary:foo|]] -> foo
        t = t.split(":", 1)[1] if prefix in LINK_PREFIXES else t
        return re.sub(r"\s*\(.*\)$", "", t)
    if t.startswith("#"):
        return t[1:]
    t = t.split("#", 1)[0]
    if prefix in LINK_PREFIXES or (prefix and LANG_PREFIX.match(prefix)):
        return t.split(":", 1)[1]
    return t  # includes real titles with a colon ("Star Wars: Episode IV")


def replace_links(s: str) -> str:
    """Resolve [[...]] links; nested links (captions of [[File:...|...]]) resolve first.

    Balanced on "[[" / "]]" only, so single brackets inside a caption ("bicyclo[1.1.0]butane")
    do not confuse it.  An unbalanced "[[" is dropped.
    """
    out, i, n = [], 0, len(s)
    while i < n:
        j = s.find("[[", i)
        if j < 0:
            out.append(s[i:])
            break
        out.append(s[i:j])
        end = _find_close(s, j, "[[", "]]")
        if end < 0:
            i = j + 2
            continue
        inner = replace_links(s[j + 2:end - 2])
        out.append(_link(inner))
        i = end
    return "".join(out)


_TAG_BLOCK = re.compile(
    r"<\s*(" + "|".join(DROP_CONTENT_TAGS) + r")\b[^>]*?(?<!/)>.*?<\s*/\s*\1\s*>",
    re.S | re.I)
_MATH = re.compile(r"<\s*math\b[^>]*?(?<!/)>(.*?)<\s*/\s*math\s*>", re.S | re.I)
_SIMPLE_MATH = re.compile(r"[A-Za-z0-9 =+\-*/().,<>']{1,40}")


def _simple_math(m: re.Match) -> str:
    """Keep a formula only when it reads as plain text ("X=Y", "n > 2"); drop TeX."""
    body = m.group(1).strip()
    return body if _SIMPLE_MATH.fullmatch(body) else ""


_TAG_SELF = re.compile(r"<\s*(?:" + "|".join(DROP_CONTENT_TAGS) + r")\b[^>]*/\s*>", re.I)
_TAG_OPEN_UNCLOSED = re.compile(r"<\s*(?:ref|math|gallery|timeline)\b[^>]*>.*", re.S | re.I)
_ANY_TAG = re.compile(r"</?\s*[A-Za-z][A-Za-z0-9]*\b[^<>]*/?\s*>")
_EXT_LINK = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]*\s*([^\]]*)\]")
_BARE_URL = re.compile(r"(?<![\w/])(?:https?|ftp)://[^\s<>\]\)]+")
_SPACES = str.maketrans({"\u00a0": " ", "\u2009": " ", "\u202f": " ", "\u2002": " ",
                         "\u2003": " ", "\u200a": " ", "\u2007": " ", "\t": " ",
                         "\u200b": None, "\u200c": None, "\u200d": None, "\u00ad": None,
                         "\u200e": None, "\u200f": None, "\ufeff": None})


def _tidy(line: str) -> str:
    line = re.sub(r" {2,}", " ", line).strip()
    # punctuation / bracket debris left by removed refs, templates and pronunciations
    for _ in range(3):
        prev = line
        line = re.sub(r"\(\s*(?:[,;:.–—-]\s*)*\)", "", line)        # "( , )" -> ""
        line = re.sub(r"\[\s*\]", "", line)
        line = re.sub(r"\(\s*(?:[,;:]\s*)+", "(", line)              # "(; born" -> "(born"
        line = re.sub(r"(?:\s*[,;:])+\s*\)", ")", line)               # "x, )" -> "x)"
        line = re.sub(r"\s+([,.;:!?)\]])", r"\1", line)              # "word ," -> "word,"
        line = re.sub(r"([(\[])\s+", r"\1", line)
        line = re.sub(r",(?:\s*,)+", ",", line)
        line = re.sub(r"\.(?:\s*\.)(?!\.)", ".", line) if "..." not in line else line
        line = re.sub(r" {2,}", " ", line).strip()
        if line == prev:
            break
    return line.strip(" ,;")


def clean_wikitext(text: str) -> list[str]:
    """Wikitext -> list of plain lines ("H" headings and "P" paragraphs)."""
    s = text.replace("\r\n", "\n").replace("\r", "\n")
    s = re.sub(r"<!--.*?(?:-->|$)", "", s, flags=re.S)
    s = _TAG_SELF.sub("", s)
    s = _MATH.sub(_simple_math, s)
    s = _TAG_BLOCK.sub("", s)
    s = _TAG_OPEN_UNCLOSED.sub("", s)  # an unclosed <ref> swallows the rest of the page
    s = re.sub(r"<\s*br\s*/?\s*>", " ", s, flags=re.I)
    s = drop_sections(s)
    s = expand_templates(s)
    s = s.replace("{{", "").replace("}}", "")
    s = remove_tables(s)
    s = re.sub(r"__[A-Z]+__", "", s)
    # strip remaining tags, keep their content
    s = _TAG_BLOCK.sub("", s)
    s = _ANY_TAG.sub("", s)
    s = replace_links(s)
    s = _EXT_LINK.sub(r"\1", s)
    s = _BARE_URL.sub("", s)
    s = re.sub(r"'{2,}", "", s)

    # Wikitext paragraphs: consecutive plain lines form one paragraph; blank lines, headings,
    # list items and indented lines start a new one.
    raw_lines: list[str] = []
    joinable = False
    for raw in s.split("\n"):
        line = raw.strip()
        if not line:
            joinable = False
            continue
        special = line[0] in "=*#:;|!" or line.startswith("{|")
        if joinable and not special:
            raw_lines[-1] += " " + line
        else:
            raw_lines.append(line)
        joinable = not special

    items: list[tuple[str, int, str]] = []
    for line in raw_lines:
        m = re.match(r"^(=+)\s*(.*?)\s*\1$", line)
        if m:
            kind, level, line = "H", len(m.group(1)), m.group(2)
        else:
            if line.startswith(("|", "!", "----", "{|", "|}")):
                continue  # table / rule debris
            kind, level = "P", 99
            line = re.sub(r"^[*#:;]+\s*", "", line)
        line = html.unescape(line)
        line = unicodedata.normalize("NFC", line.translate(_SPACES))
        line = _ANY_TAG.sub("", line)  # tags that were entity-escaped in the wikitext
        line = _tidy(line)
        if kind == "H":
            if line and re.search(r"[A-Za-z]", line):
                items.append((kind, level, line))
            continue
        if "ISBN" in line or "ISSN" in line or "doi:" in line:
            continue  # bibliography entry outside a dropped section
        if len(line) < 20 or not re.search(r"[A-Za-z]{2}", line):
            continue  # short debris ("thumb", stray numbers, list stubs)
        if len(re.findall(r"[A-Za-z]", line)) < 0.5 * len(line.replace(" ", "")):
            continue  # mostly symbols / numbers: table or formula residue
        items.append((kind, level, line))

    # keep a heading only if some paragraph follows before the next heading of its level or above
    out: list[str] = []
    for i, (kind, level, line) in enumerate(items):
        if kind == "H":
            has_text = False
            for k2, l2, _ in items[i + 1:]:
                if k2 == "P":
                    has_text = True
                    break
                if l2 <= level:
                    break
            if not has_text:
                continue
        out.append(line)
    return out


# --------------------------------------------------------------------------- output


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    os.replace(tmp, path)


def render_split(articles: list[tuple[int, str, list[str]]]) -> str:
    return "\n\n".join("\n".join([title, *lines]) for _pid, title, lines in articles) + "\n"


def counts(text: str) -> tuple[int, int, int]:
    return len(text), len(text.split()), len(text.encode("utf-8"))


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def sources_md(dump_sha: str, calib: list, heldout: list, calib_txt: str, held_txt: str) -> str:
    def table(arts):
        rows = ["| # | page id | title |", "|---:|---:|---|"]
        rows += [f"| {i} | {pid} | {_md_cell(title)} |" for i, (pid, title, _l) in enumerate(arts)]
        return "\n".join(rows)

    c, h = counts(calib_txt), counts(held_txt)
    return f"""# Sources of the calibration / held-out text

Generated by `tools/make_calibration_text.py`; do not edit by hand.

## Source

- File: `{DUMP_NAME}`
- Shipped in: the gensim {GENSIM_VERSION} wheel from PyPI, as `{DUMP_MEMBER}`
  (read out of the wheel with `zipfile`; gensim is neither installed nor imported)
- sha256 of the `.bz2`: `{dump_sha}`
- Pages used: main namespace (ns 0), redirects skipped, sorted by page id; index % {HELDOUT_EVERY} == {HELDOUT_EVERY - 1}
  goes to `heldout.txt`, every other article to `calib.txt`.

## Licence and attribution

Text adapted from English Wikipedia articles, as shipped in gensim's test data
(English Wikipedia dump `enwiki-latest-pages-articles1.xml-p000000010p000030302`, shortened by
the gensim project). Wikipedia text is licensed under the Creative Commons
Attribution-ShareAlike 4.0 International licence (CC BY-SA 4.0,
https://creativecommons.org/licenses/by-sa/4.0/) and the GNU Free Documentation License (GFDL).
The derived files `calib.txt` and `heldout.txt` are distributed under the same licence
(CC BY-SA 4.0 / GFDL), not under the project's MIT licence. The authors are the Wikipedia
contributors to each article listed below; each article's history is at
`https://en.wikipedia.org/w/index.php?curid=<page id>&action=history`.

Changes made: wiki markup, templates, tables, references, images, categories and the
"See also" / "References" / "External links" / "Further reading" / "Notes" (and similar)
sections were removed; link text, headings and prose were kept; HTML entities unescaped;
whitespace collapsed; short debris lines dropped.

## Output files

| file | articles | chars | words | bytes (UTF-8) | sha256 |
|---|---:|---:|---:|---:|---|
| `calib.txt` | {len(calib)} | {c[0]} | {c[1]} | {c[2]} | `{sha256(calib_txt.encode())}` |
| `heldout.txt` | {len(heldout)} | {h[0]} | {h[1]} | {h[2]} | `{sha256(held_txt.encode())}` |

## calib.txt ({len(calib)} articles)

{table(calib)}

## heldout.txt ({len(heldout)} articles)

{table(heldout)}
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dump", nargs="?", default=None,
                    help="the .bz2 dump, the gensim wheel (.whl) or an extracted .xml; "
                         f"default: pip-download gensim=={GENSIM_VERSION} into a temp dir")
    ap.add_argument("--out-dir", default=str(REPO_ROOT / "calibration"),
                    help="output directory (default: calibration/ at the repository root)")
    args = ap.parse_args(argv)

    data = load_dump(args.dump)
    dump_sha = sha256(data)
    if data[:3] == b"BZh" and dump_sha != EXPECTED_DUMP_SHA256:
        print(f"warning: dump sha256 {dump_sha} differs from the gensim {GENSIM_VERSION} "
              f"file ({EXPECTED_DUMP_SHA256})", file=sys.stderr)

    articles = []
    for pid, title, text in iter_articles(data):
        lines = clean_wikitext(text)
        if sum(len(x) for x in lines) < 200:
            print(f"skipping near-empty article {pid} {title!r}", file=sys.stderr)
            continue
        articles.append((pid, title, lines))
    articles.sort(key=lambda a: a[0])

    calib = [a for i, a in enumerate(articles) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1]
    heldout = [a for i, a in enumerate(articles) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]
    calib_txt, held_txt = render_split(calib), render_split(heldout)

    out = Path(args.out_dir)
    write_text(out / "calib.txt", calib_txt)
    write_text(out / "heldout.txt", held_txt)
    write_text(out / "SOURCES.md", sources_md(dump_sha, calib, heldout, calib_txt, held_txt))

    for name, arts, txt in (("calib.txt", calib, calib_txt), ("heldout.txt", heldout, held_txt)):
        c, w, b = counts(txt)
        print(f"{name}: {len(arts)} articles, {w} words, {c} chars ({b} bytes UTF-8)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
