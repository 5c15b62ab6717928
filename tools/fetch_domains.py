#!/usr/bin/env python3
"""Held-out evaluation domains for the quality benchmarks, general English included.

The package's own domains (``idle``: Python's IDLE docs, ``licenses``: legal text) are Python-adjacent
or memorized; these add running prose that no default ever calibrates or trains on, taken from Debian
packages (benchmarks only: gift-quant itself never needs them):

- ``austen`` (fiction): Jane Austen's six novels, from ``r-cran-janeaustenr`` (R data, read by
  ``tools/rdata.py``), as round-robin chunks so the first windows span all six novels;
- ``reuters`` (news): the 70 Reuters-21578 articles of ``r-cran-tm`` (``texts/acq``, ``texts/crude``),
  the two topics interleaved.

Each .deb is fetched with ``apt-get download`` and unpacked with ``dpkg-deb -x`` (no root install),
under ``.domains/`` in the repository (git-ignored; ``GIFT_QUANT_DOMAINS`` moves it). The extracted text
is cached there as ``NAME.json``.

    python tools/fetch_domains.py [--domains austen,reuters] [--force]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import rdata

PACKAGE_DOMAINS = ("idle", "licenses")      # shipped with every install (gift_quant.io.data)
FETCHED_DOMAINS = ("austen", "reuters")     # general English prose from Debian packages
ALL_DOMAINS = PACKAGE_DOMAINS + FETCHED_DOMAINS
_DEBS = {"austen": "r-cran-janeaustenr", "reuters": "r-cran-tm"}
AUSTEN_CHUNK_CHARS = 6000
AUSTEN_CHUNKS_PER_NOVEL = 3


class DomainError(RuntimeError):
    """A domain could not be fetched or read (no apt, package gone, unexpected layout)."""


def cache_dir() -> Path:
    return Path(os.environ.get("GIFT_QUANT_DOMAINS", ROOT / ".domains"))


def _unpacked(pkg: str, cache: Path) -> Path:
    """The root of ``pkg``'s unpacked .deb (downloaded once)."""
    dest = cache / "debs" / pkg
    if (dest / ".complete").exists():
        return dest
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        raise DomainError(f"fetching {pkg} needs apt-get and dpkg-deb (a Debian-based system)")
    tmp = Path(tempfile.mkdtemp(prefix=f"{pkg}-", dir=cache))
    try:
        r = subprocess.run(["apt-get", "download", pkg], cwd=tmp, capture_output=True, text=True, check=False)
        debs = sorted(tmp.glob(f"{pkg}_*.deb"))
        if r.returncode != 0 or not debs:
            last = (r.stderr.strip().splitlines() or ["no .deb written"])[-1]
            raise DomainError(f"apt-get download {pkg} failed: {last} (try `apt-get update`)")
        root = tmp / "root"
        r = subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(root)], capture_output=True, text=True,
                           check=False)
        if r.returncode != 0:
            raise DomainError(f"dpkg-deb -x {debs[0].name} failed: {r.stderr.strip()}")
        (root / ".complete").write_text(debs[0].name + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        root.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _paragraphs(lines: list[str]) -> list[str]:
    """Hard-wrapped lines (blank line between paragraphs) -> one string per paragraph."""
    paras, cur = [], []
    for line in lines:
        line = (line or "").strip()
        if line:
            cur.append(line)
        elif cur:
            paras.append(" ".join(cur))
            cur = []
    if cur:
        paras.append(" ".join(cur))
    return paras


def _chunks(paras: list[str], size: int) -> list[str]:
    out, cur, n = [], [], 0
    for p in paras:
        cur.append(p)
        n += len(p) + 2
        if n >= size:
            out.append("\n\n".join(cur))
            cur, n = [], 0
    if cur:
        out.append("\n\n".join(cur))
    return out


def austen_docs(novels: dict, chunk_chars: int = AUSTEN_CHUNK_CHARS,
                per_novel: int = AUSTEN_CHUNKS_PER_NOVEL) -> list[str]:
    """{novel: lines} -> chunks taken round-robin (novel 1 chunk 1, novel 2 chunk 1, ...), each novel
    from its first chapter on."""
    per = []
    for name in sorted(novels):
        lines = list(novels[name])
        start = next((i for i, x in enumerate(lines) if x and re.match(r"(?i)chapter\s+(1|i)\b", x.strip())), 0)
        per.append(_chunks(_paragraphs(lines[start + 1:]), chunk_chars)[:per_novel])
    return [c[i] for i in range(per_novel) for c in per if i < len(c)]


def _austen(cache: Path) -> list[str]:
    root = _unpacked(_DEBS["austen"], cache)
    rdx = next(root.glob("usr/lib/R/site-library/janeaustenr/data/Rdata.rdx"), None)
    if rdx is None:
        raise DomainError("r-cran-janeaustenr has no data/Rdata.rdx (layout changed?)")
    data = rdata.read_lazyload(rdx)
    novels = {k: v for k, v in data.items() if isinstance(v, list) and len(v) > 1000}
    if len(novels) < 6:
        raise DomainError(f"r-cran-janeaustenr: expected 6 novels, found {sorted(novels)}")
    return austen_docs(novels)


def reuters_article(xml_text: str) -> str | None:
    """Title and body of one Reuters-21578 article (the body's hard wraps joined, 'Reuter' dropped)."""
    node = ET.fromstring(xml_text)
    body = node.findtext(".//BODY")
    if not body:
        return None
    title = (node.findtext(".//TITLE") or "").strip()
    body = re.sub(r"\s*Reuter\s*$", "", body.strip())
    paras = [" ".join(p.split()) for p in re.split(r"\n\s{2,}", body) if p.strip()]
    return "\n\n".join(([title.capitalize()] if title else []) + paras)


def _reuters(cache: Path) -> list[str]:
    root = _unpacked(_DEBS["reuters"], cache)
    texts = root / "usr/lib/R/site-library/tm/texts"
    topics = []
    for topic in ("acq", "crude"):
        files = sorted((texts / topic).glob("*.xml"))
        if not files:
            raise DomainError(f"r-cran-tm has no texts/{topic}/*.xml (layout changed?)")
        arts = [reuters_article(f.read_text(encoding="utf-8", errors="replace")) for f in files]
        topics.append([a for a in arts if a])
    a, c = topics
    return [x for pair in zip(a, c) for x in pair] + a[len(c):] + c[len(a):]


_BUILDERS = {"austen": _austen, "reuters": _reuters}


def fetch(name: str, force: bool = False) -> list[str]:
    """The documents of a fetched domain (extracted once, then read from the cache)."""
    if name not in _BUILDERS:
        raise DomainError(f"unknown domain {name!r}; choose from {', '.join(ALL_DOMAINS)}")
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    out = cache / f"{name}.json"
    if out.exists() and not force:
        return json.loads(out.read_text(encoding="utf-8"))
    docs = _BUILDERS[name](cache)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(docs), encoding="utf-8")
    tmp.replace(out)
    return docs


def domain_texts(names=ALL_DOMAINS, warn=True) -> dict:
    """{domain: documents} for every name that can be had; a warning names each one left out."""
    from gift_quant.io.data import load_texts
    out = {}
    for n in names:
        try:
            out[n] = load_texts(n) if n in PACKAGE_DOMAINS else fetch(n)
        except Exception as e:  # noqa: BLE001 - one missing domain must not stop the benchmark
            if warn:
                print(f"warning: evaluation domain {n!r} left out: {e}", file=sys.stderr)
    return out


def geomean(values) -> float:
    v = list(values)
    return math.exp(sum(math.log(x) for x in v) / len(v)) if v else float("nan")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--domains", default=",".join(FETCHED_DOMAINS))
    ap.add_argument("--force", action="store_true", help="extract again even if cached")
    a = ap.parse_args(argv)
    names = [n for n in a.domains.split(",") if n]
    bad = [n for n in names if n not in _BUILDERS]
    if bad:
        print(f"error: unknown domain(s) {', '.join(bad)}; choose from {', '.join(FETCHED_DOMAINS)}", file=sys.stderr)
        return 2
    rc = 0
    for n in names:
        try:
            docs = fetch(n, force=a.force)
        except (DomainError, rdata.RError, OSError) as e:
            print(f"error: {n}: {e}", file=sys.stderr)
            rc = 1
            continue
        print(f"{n}: {len(docs)} documents, {sum(map(len, docs)):,} chars -> {cache_dir() / (n + '.json')}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
