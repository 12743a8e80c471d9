"""Captioned items from the three offline image sources: openclipart, emoji, tuxpaint stamps.

Every item is one image with a few English captions in sentence form. MiniLM embeds single words
noisily (e.g. "trouser" lands near bird names), so captions are short phrases and sentences ("a drawing
of a light bulb", "light bulb, electronics clip art") rather than bare file-name tokens.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

OPENCLIPART_DIR = Path("/usr/share/openclipart/png")
TUXPAINT_DIR = Path("/usr/share/tuxpaint/stamps")

# openclipart file names read "<title>_<author, truncated>_<NN>"; these end markers say an author follows.
_AUTHOR_SUFFIX = re.compile(r"(_\d{1,2}|_r|_)$")
_MIN_AUTHOR_COUNT = 4


@dataclass
class Item:
    """One image and its captions; `group` keeps near-duplicates on the same side of the split."""

    source: str
    path: str
    title: str
    captions: list[str] = field(default_factory=list)
    group: str = ""


def article(noun: str) -> str:
    """'a' or 'an' by the first letter: good enough for caption phrasing."""
    return "an" if noun[:1].lower() in "aeiou" else "a"


def _words(text: str) -> list[str]:
    return [w for w in re.split(r"[\s_\-]+", text) if w]


def _clean_tokens(tokens: list[str]) -> list[str]:
    """Drop numbering and sizes ("88pt09step", "01", "md"), which say nothing about the picture."""
    return [t for t in tokens if not re.search(r"\d", t) and len(t) > 1]


def _author_tokens(stems: list[str]) -> set[str]:
    """Tokens that often stand in the author slot (just before an _NN end marker) across files."""
    counts: Counter[str] = Counter()
    for stem in stems:
        if _AUTHOR_SUFFIX.search(stem):
            tokens = _words(_AUTHOR_SUFFIX.sub("", stem))
            if len(tokens) >= 3:
                counts.update(t.lower() for t in tokens[-2:])
    return {t for t, n in counts.items() if n >= _MIN_AUTHOR_COUNT and len(t) > 2}


def _strip_author(stem: str, authors: set[str]) -> list[str]:
    """Title tokens of an openclipart stem: trailing author names (also truncated ones) removed."""
    marked = bool(_AUTHOR_SUFFIX.search(stem))
    tokens = _words(_AUTHOR_SUFFIX.sub("", stem))
    if not marked:
        return tokens
    while len(tokens) > 1 and any(a.startswith(tokens[-1].lower()) for a in authors):
        tokens.pop()
    return tokens


def openclipart_items(root: Path = OPENCLIPART_DIR) -> list[Item]:
    """Items from openclipart-png: title from the file name, context from the folder path."""
    paths = sorted(root.rglob("*.png"))
    authors = _author_tokens([p.stem for p in paths])
    items = []
    for path in paths:
        folders = [f.replace("_", " ") for f in path.relative_to(root).parent.parts]
        tokens = _clean_tokens(_strip_author(path.stem, authors))
        title = " ".join(tokens).lower() or (folders[-1] if folders else "picture")
        where = folders[-1] if folders else "clip art"
        captions = [
            f"a drawing of {article(title)} {title}.",
            f"{title}, {where} clip art",
            f"clip art of {article(title)} {title} from the {' / '.join(folders)} collection.",
        ]
        items.append(Item("openclipart", str(path), title, captions, group="oc:" + "/".join(folders)))
    return items


def emoji_items(package_dir: Path) -> list[Item]:
    """Items from emoji-datasource-google: one per base emoji (skin-tone variants would be near-copies)."""
    records = json.loads((package_dir / "emoji.json").read_text(encoding="utf-8"))
    image_dir = package_dir / "img" / "google" / "64"
    items = []
    for rec in records:
        path = image_dir / rec["image"]
        if not rec.get("has_img_google") or not path.is_file():
            continue
        name = (rec.get("name") or rec["short_name"].replace("_", " ")).lower()
        sub = rec.get("subcategory", "").replace("-", " ")
        short = rec["short_name"].replace("_", " ").replace("-", " ")
        captions = [
            f"an emoji of {article(name)} {name}.",
            f"{name}, {sub} emoji",
            f"a small icon showing {short}, from the {rec.get('category', '').lower()} category.",
        ]
        items.append(Item("emoji", str(path), name, captions, group="emoji:" + sub))
    return items


def _tuxpaint_description(txt: Path) -> str:
    """The English description is the first line without a `lang.utf8=` prefix."""
    for line in txt.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.strip() and "=" not in line.split(" ")[0]:
            return line.strip()
    return ""


def tuxpaint_items(root: Path = TUXPAINT_DIR) -> list[Item]:
    """Items from tuxpaint-stamps-default PNG stamps with their English .txt description."""
    items = []
    for path in sorted(root.rglob("*.png")):
        if path.stem.endswith("_mirror") or "_desc" in path.stem:
            continue
        txt = path.with_suffix(".txt")
        description = _tuxpaint_description(txt) if txt.is_file() else ""
        title = " ".join(_clean_tokens(_words(path.stem.removeprefix("t_")))).lower() or path.parent.name
        folders = [f.replace("_", " ") for f in path.relative_to(root).parent.parts]
        captions = [f"a drawing of {article(title)} {title}.", f"{title}, {folders[-1] if folders else ''} stamp"]
        if description:
            captions.insert(0, description)
        items.append(Item("tuxpaint", str(path), title, captions, group="tux:" + "/".join(folders)))
    return items


def all_items(emoji_dir: Path | None) -> list[Item]:
    """Every available captioned item; a missing source is skipped (the record counts each source)."""
    items = openclipart_items() if OPENCLIPART_DIR.is_dir() else []
    if emoji_dir is not None and (emoji_dir / "emoji.json").is_file():
        items += emoji_items(emoji_dir.resolve())  # resolved: cache keys use the item paths
    if TUXPAINT_DIR.is_dir():
        items += tuxpaint_items()
    return items
