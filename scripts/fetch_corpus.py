"""Fetch the bundled models' corpus from the system package manager and write it as jsonl.

    python scripts/fetch_corpus.py --out data/corpus

Downloads Debian's `fortunes-zh` (Tang poems, Song ci, Chinese quotes) and `fortunes` packages with
`apt-get download` into a temporary directory (nothing is installed, no root needed), unpacks them with
`dpkg-deb -x`, and converts every fortune file (`%`-separated entries) into documents
`{"text", "source"[, "title", "author"]}` in `OUT/corpus.jsonl`. `OUT/SOURCES.json` records each package's
name, version, licence and full copyright file. The raw data never enters the repository: keep OUT out of
version control.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Any

DEFAULT_PACKAGES = ("fortunes-zh", "fortunes")
FORTUNE_DIR = "usr/share/games/fortunes"
# Terminal colour codes around titles and authors in fortunes-zh (`\x1b[32m《静夜思》\x1b[m`).
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# Backspace overstrike (`_\bx`) that old fortunes use for underlining: keep the visible character.
OVERSTRIKE = re.compile(r".\x08")
TITLE = re.compile(r"《(.+?)》")
AUTHOR = re.compile(r"^作者\s*[:：]\s*([^（(\s]+)")
# Licence names looked for in a copyright file that is not in the machine-readable (DEP-5) format.
KNOWN_LICENCES = re.compile(
    r"\b(L?GPL-?[23](?:\.\d)?\+?|BSD|MIT|Apache|Artistic|[Pp]ublic [Dd]omain)(?![\w-])"
)


class FetchError(Exception):
    """A problem the user must fix (missing tool, unknown package); printed as one line."""


def _run(cmd: list[str], cwd: str | None = None) -> str:
    try:
        res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise FetchError(f"{cmd[0]} not found") from None
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or [f"exit status {res.returncode}"])[-1]
        raise FetchError(f"`{' '.join(cmd)}` failed: {last}")
    return res.stdout


def licences(copyright_text: str) -> list[str]:
    """Licence names of a Debian copyright file: the DEP-5 `License:` fields, else known names in the text."""
    found = [m.group(1).strip() for m in re.finditer(r"^License:[ \t]*(\S.*)$", copyright_text, re.M)]
    if not found:
        found = KNOWN_LICENCES.findall(copyright_text)
    return list(dict.fromkeys(found)) or ["unknown (see copyright)"]


def parse_fortunes(text: str) -> list[str]:
    """Entries of a fortune file (separated by lines holding only `%`), cleaned of terminal codes."""
    text = OVERSTRIKE.sub("", ANSI.sub("", text.replace("\r\n", "\n")))
    entries = re.split(r"^%[ \t]*$", text, flags=re.M)
    return [e.strip("\n") for e in entries if e.strip()]


def document(entry: str, source: str) -> dict[str, Any]:
    """A corpus document; poems whose first lines name a title `《…》` and an author get those fields too."""
    doc: dict[str, Any] = {"text": entry, "source": source}
    lines = entry.split("\n")
    title = TITLE.search(lines[0])
    author = AUTHOR.match(lines[1].strip()) if len(lines) > 2 else None
    if title and author:
        doc["title"], doc["author"] = title.group(1), author.group(1)
    return doc


def fetch_package(name: str, workdir: str) -> tuple[dict[str, Any], str]:
    """Download and unpack one package; returns its SOURCES entry and the unpacked root."""
    pkg_dir = os.path.join(workdir, name)
    os.makedirs(pkg_dir)
    _run(["apt-get", "download", name], cwd=pkg_dir)
    debs = [f for f in os.listdir(pkg_dir) if f.endswith(".deb")]
    if len(debs) != 1:
        raise FetchError(f"apt-get download {name} produced {len(debs)} .deb files")
    deb = os.path.join(pkg_dir, debs[0])
    fields = dict(
        line.split(": ", 1) for line in _run(["dpkg-deb", "-f", deb, "Package", "Version"]).splitlines()
    )
    root = os.path.join(pkg_dir, "root")
    _run(["dpkg-deb", "-x", deb, root])
    cfile = os.path.join(root, "usr/share/doc", fields["Package"], "copyright")
    copyright_text = ""
    if os.path.isfile(cfile):
        with open(cfile, encoding="utf-8", errors="replace") as f:
            copyright_text = f.read()
    entry = {
        "package": fields["Package"],
        "version": fields["Version"],
        "licence": licences(copyright_text),
        "copyright": copyright_text,
    }
    return entry, root


def fortune_files(root: str, wanted: set[str] | None) -> list[str]:
    """The fortune data files of an unpacked package (not the `.dat` indexes nor `.u8` links)."""
    d = os.path.join(root, FORTUNE_DIR)
    if not os.path.isdir(d):
        return []
    names = sorted(
        n
        for n in os.listdir(d)
        if not n.endswith((".dat", ".u8"))
        and os.path.isfile(os.path.join(d, n))
        and not os.path.islink(os.path.join(d, n))
    )
    return [os.path.join(d, n) for n in names if wanted is None or n in wanted]


def fetch_corpus(out: str, packages: list[str], files: list[str] | None = None) -> dict[str, Any]:
    """Fetch `packages` and write OUT/corpus.jsonl and OUT/SOURCES.json; returns the SOURCES record."""
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise FetchError(
                f"{tool} is unavailable: this script needs a Debian or Ubuntu system with apt "
                "(or copy corpus.jsonl from a machine that has one)"
            )
    from ernie45.utils import atomic_write_text

    wanted = set(files) if files else None
    sources: list[dict[str, Any]] = []
    lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="ernie45-corpus-") as tmp:
        for name in packages:
            entry, root = fetch_package(name, tmp)
            entry["files"] = {}
            for path in fortune_files(root, wanted):
                with open(path, encoding="utf-8", errors="replace") as f:
                    entries = parse_fortunes(f.read())
                source = f"{entry['package']}/{os.path.basename(path)}"
                lines += [json.dumps(document(e, source), ensure_ascii=False) for e in entries]
                entry["files"][os.path.basename(path)] = len(entries)
            sources.append(entry)
    if not lines:
        raise FetchError(f"no fortune files found in {', '.join(packages)}")
    atomic_write_text(os.path.join(out, "corpus.jsonl"), "\n".join(lines) + "\n")
    record = {"documents": len(lines), "packages": sources}
    atomic_write_text(
        os.path.join(out, "SOURCES.json"), json.dumps(record, indent=2, ensure_ascii=False) + "\n"
    )
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory (corpus.jsonl, SOURCES.json)")
    p.add_argument("--packages", nargs="+", default=list(DEFAULT_PACKAGES), help="Debian packages to fetch")
    p.add_argument(
        "--files",
        nargs="+",
        metavar="NAME",
        help="only these fortune files (e.g. tang300 song100); default: all",
    )
    args = p.parse_args(argv)
    try:
        record = fetch_corpus(args.out, args.packages, args.files)
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for pkg in record["packages"]:
        print(
            f"{pkg['package']} {pkg['version']} ({', '.join(pkg['licence'])}): "
            f"{sum(pkg['files'].values())} documents from {len(pkg['files'])} files"
        )
    print(f"wrote {record['documents']} documents to {os.path.join(args.out, 'corpus.jsonl')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
