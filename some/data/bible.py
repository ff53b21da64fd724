"""The World English Bible (Debian ``sword-text-web``, read with ``diatheke``):
the offline out-of-domain corpus, as passages with their book (a topic)."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from ..errors import CorpusUnavailableError
from ..files import atomic_write, resolve_cache_dir
from .hints import INSTALL_HINT, OFFLINE_CHOICES

__all__ = ["BIBLE_MODULE", "BIBLE_VERSES_PER_DOC", "DEUTEROCANON", "NEW_TESTAMENT", "bible_testament", "load_bible",
           "load_bible_passages", "parse_bible_options", "parse_diatheke_osis"]

log = logging.getLogger(__name__)

BIBLE_MODULE = "engWEB2015eb"  # the World English Bible module of Debian's sword-text-web
BIBLE_VERSES_PER_DOC = 8  # ~250 words, about the length of a TinyStories story

_BIBLE_PARSER_VERSION = 2
# A verse line of `diatheke -f OSIS`: "<Book> <chapter>:<verse>: <OSIS body>". diatheke sometimes
# prints a leaked section/psalm title before the reference (a SWORD quirk: the last title seen
# sticks to later verses, even in other books), so the reference may follow two spaces or a tag;
# book names are words separated by single spaces (e.g. "II Kings", "Esther (Greek)").
_VERSE_RE = re.compile(r"(?:^|(?<=\s\s)|(?<=>))(?P<book>[A-Z][A-Za-z()]*(?: [A-Za-z()]+)*) "
                       r"(?P<chapter>\d+):(?P<verse>\d+): (?P<body>.*)$")


def parse_bible_options(arg: str) -> dict[str, Any]:
    """The options of ``bible:ARG``: ``verses_per_doc`` (``chapter`` = None, ``verses=N``) and ``topic``."""
    opts: dict[str, Any] = {}
    for part in (p for p in arg.split(",") if p):
        m = re.fullmatch(r"verses=(\d+)", part)
        if part == "chapter":
            opts["verses_per_doc"] = None
        elif m and int(m.group(1)) >= 1:
            opts["verses_per_doc"] = int(m.group(1))
        elif part in ("topic=book", "topic=testament"):
            opts["topic"] = part.partition("=")[2]
        else:
            raise ValueError(f"bad 'bible' option {part!r}; expected 'bible', 'bible:chapter' or 'bible:verses=N' "
                             f"(N >= 1), optionally with ',topic=book' or ',topic=testament'")
    return opts


# The books of the module (diatheke's names) outside the 39 of the Old Testament.
DEUTEROCANON = frozenset({"Tobit", "Judith", "Esther (Greek)", "Wisdom", "Sirach", "Baruch", "I Maccabees",
                          "II Maccabees", "I Esdras", "Prayer of Manasses", "Additional Psalm", "III Maccabees",
                          "II Esdras", "IV Maccabees"})
NEW_TESTAMENT = frozenset({"Matthew", "Mark", "Luke", "John", "Acts", "Romans", "I Corinthians", "II Corinthians",
                           "Galatians", "Ephesians", "Philippians", "Colossians", "I Thessalonians",
                           "II Thessalonians", "I Timothy", "II Timothy", "Titus", "Philemon", "Hebrews", "James",
                           "I Peter", "II Peter", "I John", "II John", "III John", "Jude", "Revelation of John"})


def bible_testament(book: str) -> str:
    """``"New Testament"``, ``"Deuterocanon"`` or ``"Old Testament"`` for a book name of the module."""
    return "New Testament" if book in NEW_TESTAMENT else "Deuterocanon" if book in DEUTEROCANON else "Old Testament"


# diatheke appends the module's glossary to the last verse (Revelation 22:21); it is not Bible text.
_GLOSSARY_RE = re.compile(r"\s*The following words used in the World English Bible.*$", re.S)


def _osis_to_text(body: str) -> str:
    body = _GLOSSARY_RE.sub("", body)
    # The module's OSIS wraps words in <w>; in ~120 places two words touch ("<w>God</w><w>created</w>")
    # and plain-text output glues them ("Godcreated"), so separate them before dropping the tags.
    body = body.replace("</w><w>", "</w> <w>")
    body = re.sub(r"<[^>]*>", "", body)
    return " ".join(body.split())


def parse_diatheke_osis(output: str) -> list[tuple[str, int, int, str]]:
    """``(book, chapter, verse, text)`` for each non-empty verse of ``diatheke -f OSIS`` output.

    Leaked titles before a reference are dropped, and so are genuine psalm titles: diatheke
    does not let us tell them apart. Lines without a reference (the module name, the
    glossary appended after Revelation) are skipped.
    """
    verses = []
    for line in output.splitlines():
        m = _VERSE_RE.search(line)
        if m is None:
            continue
        text = _osis_to_text(m.group("body"))
        if text:
            verses.append((m.group("book"), int(m.group("chapter")), int(m.group("verse")), text))
    return verses


def _bible_verses(key: str, cache_dir: str | os.PathLike | None) -> list[tuple[str, int, int, str]]:
    """The verses of the WEB module in the diatheke range ``key``, parsed once and cached
    (diatheke takes ~10 s for the whole text)."""
    exe = shutil.which("diatheke")
    if exe is None:
        raise CorpusUnavailableError(
            f"the 'bible' corpus needs the program diatheke (Debian package 'diatheke'); {INSTALL_HINT}. "
            f"Other offline choices: {OFFLINE_CHOICES}")
    listing = subprocess.run([exe, "-b", "system", "-k", "modulelist"], capture_output=True, text=True,
                             timeout=60).stdout
    if BIBLE_MODULE not in listing:
        raise CorpusUnavailableError(
            f"the 'bible' corpus needs the SWORD module {BIBLE_MODULE} (Debian package 'sword-text-web'), "
            f"which diatheke does not list; {INSTALL_HINT}")
    # Key the cache by the module's files, so that an upgraded package is parsed again.
    fingerprint = hashlib.sha256(f"{_BIBLE_PARSER_VERSION}|{key}|{listing}".encode())
    for root in ("/usr/share/sword", os.path.expanduser("~/.sword")):
        for conf in sorted(Path(root, "mods.d").glob("*.conf")) if Path(root, "mods.d").is_dir() else []:
            fingerprint.update(conf.read_bytes())
        data = Path(root, "modules", "texts", "ztext", BIBLE_MODULE)
        for f in sorted(data.glob("*")) if data.is_dir() else []:
            st = f.stat()
            fingerprint.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    cache = resolve_cache_dir(cache_dir) / "corpora" / f"bible-{BIBLE_MODULE}-{fingerprint.hexdigest()[:16]}.json"
    if cache.is_file():
        try:
            return [tuple(v) for v in json.loads(cache.read_text(encoding="utf-8"))]
        except (OSError, ValueError) as e:  # a damaged cache is rebuilt, not fatal
            log.warning("ignoring unreadable corpus cache %s (%s)", cache, e)
    log.info("reading the World English Bible with diatheke (once; cached in %s)", cache.parent)
    proc = subprocess.run([exe, "-b", BIBLE_MODULE, "-f", "OSIS", "-k", key],
                          capture_output=True, text=True, timeout=600)
    verses = parse_diatheke_osis(proc.stdout)
    if proc.returncode != 0 or not verses:
        raise CorpusUnavailableError(
            f"diatheke gave no verses of the module {BIBLE_MODULE} for the range {key!r} (exit code "
            f"{proc.returncode}, stderr: {proc.stderr.strip()[:300]!r}); check the range (e.g. 'Gen-Rev', "
            f"'Ruth') or reinstall: {INSTALL_HINT}")
    atomic_write(cache, json.dumps(verses, ensure_ascii=False))
    return verses


def load_bible(verses_per_doc: int | None = BIBLE_VERSES_PER_DOC, *, key: str = "Gen-Rev",
               cache_dir: str | os.PathLike | None = None) -> list[str]:
    """The World English Bible (with Deuterocanon) as documents, in canonical order.

    A document is ``verses_per_doc`` consecutive verses of one chapter (the last passage of a
    chapter may be shorter), or a whole chapter when ``verses_per_doc`` is None. ``key`` is a
    diatheke range: the whole text by default, e.g. ``"Matthew-Revelation"`` or ``"Ruth"``.
    """
    return load_bible_passages(verses_per_doc, key=key, cache_dir=cache_dir)[0]


def load_bible_passages(verses_per_doc: int | None = BIBLE_VERSES_PER_DOC, *, key: str = "Gen-Rev",
                        cache_dir: str | os.PathLike | None = None) -> tuple[list[str], list[str]]:
    """The documents of :func:`load_bible` and the book of each."""
    if verses_per_doc is not None and verses_per_doc < 1:
        raise ValueError(f"verses_per_doc must be >= 1 or None, got {verses_per_doc}")
    chapters: dict[tuple[str, int], list[str]] = {}  # insertion order = canonical order
    for book, chapter, _verse, text in _bible_verses(key, cache_dir):
        chapters.setdefault((book, chapter), []).append(text)
    docs, books = [], []
    for (book, _), verses in chapters.items():
        step = verses_per_doc or len(verses)
        passages = [" ".join(verses[i:i + step]) for i in range(0, len(verses), step)]
        docs.extend(passages)
        books.extend([book] * len(passages))
    return docs, books
