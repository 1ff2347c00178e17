"""A freely licensed English corpus from Debian packages, for pretraining the bundled model.

No dataset can be downloaded here, but Debian's package archive is reachable, and two of its
packages hold clean, freely licensed English prose:
- `dict-jargon`: the Jargon File 4.4.7 (~1.4 MB of definitions and anecdotes), in the public
  domain ("to be freely used, shared, and modified");
- `wordnet-base`: WordNet 3.0 (Princeton), whose ~117,000 glosses and example sentences become
  short definitional sentences; WordNet 3.0 license (permission to use, copy, modify and
  distribute for any purpose, with its copyright notice kept).

`apt-get download` fetches the .deb files (no root, nothing installed) and `dpkg-deb -x`
unpacks them into a cache folder; on a system without apt, point `fetch_packages` at
already-downloaded .deb files or pass your own documents.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

from lfm2.errors import LFM2Error
from lfm2.files import atomic_write

PACKAGES = {
    "dict-jargon": "The Jargon File 4.4.7, public domain (Eric S. Raymond et al.)",
    "wordnet-base": "WordNet 3.0, Copyright 2006 Princeton University, WordNet 3.0 license (permissive)",
}
DEFAULT_CACHE = Path(os.environ.get("LFM2_CACHE", Path.home() / ".cache" / "lfm2")) / "corpus"


def fetch_packages(cache: Path = DEFAULT_CACHE) -> Path:
    """Download and unpack the corpus packages into `cache`; returns the unpacked root."""
    root = cache / "root"
    if all((cache / f"{name}.done").is_file() for name in PACKAGES):
        return root
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise LFM2Error(f"building the corpus needs Debian's {tool}; pass your own documents instead")
    cache.mkdir(parents=True, exist_ok=True)
    for name in PACKAGES:
        if (cache / f"{name}.done").is_file():
            continue
        r = subprocess.run(["apt-get", "download", name], cwd=cache, capture_output=True, text=True)
        debs = sorted(cache.glob(f"{name}_*.deb"))
        if not debs:
            raise LFM2Error(f"apt-get download {name} failed: {r.stderr.strip() or r.stdout.strip()}")
        subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(root)], check=True)
        atomic_write(cache / f"{name}.done", "ok\n")
    return root


def jargon_entries(root: Path) -> Iterator[str]:
    """Each Jargon File entry as one document: the headword line, then its text, reflowed."""
    path = root / "usr/share/dictd/jargon.dict.dz"
    text = gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace")
    # Entries start with an unindented headword line; their body is indented.
    for block in re.split(r"\n(?=\S)", text):
        lines = block.strip().splitlines()
        if len(lines) < 2:
            continue
        head = lines[0].strip()
        body = " ".join(line.strip() for line in lines[1:] if line.strip())
        body = re.sub(r"[{}]", "", body)  # cross-reference braces
        if len(body) > 40 and not head.startswith("00-"):
            yield f"{head}: {body}"


def wordnet_glosses(root: Path) -> Iterator[str]:
    """WordNet synsets as sentences: "word (noun): gloss. Example sentences." """
    pos_names = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}
    for pos, pos_name in pos_names.items():
        path = root / f"usr/share/wordnet/data.{pos}"
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith(" ") or "|" not in line:
                continue  # the license header lines start with spaces
            fields, gloss = line.split("|", 1)
            parts = fields.split()
            n_words = int(parts[3], 16)
            words = [parts[4 + 2 * i].replace("_", " ") for i in range(n_words)]
            words = [re.sub(r"\(.*\)$", "", w) for w in words]
            gloss = gloss.strip().rstrip(";").strip()
            if gloss:
                gloss = gloss[0].upper() + gloss[1:]
                yield f"{', '.join(words)} ({pos_name}): {gloss}."


def documents(cache: Path = DEFAULT_CACHE) -> list[str]:
    """The whole corpus, one string per document (Jargon entries, WordNet glosses in groups of 20)."""
    root = fetch_packages(cache)
    docs = list(jargon_entries(root))
    glosses = list(wordnet_glosses(root))
    docs += ["\n".join(glosses[i : i + 20]) for i in range(0, len(glosses), 20)]
    return docs
