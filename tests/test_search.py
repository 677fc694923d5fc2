"""lambda: auto and lambda: learned end to end on tiny trained fine-tunes: the chosen scale is the
best of its trace, the trace's score is the gain recomputed independently (transformers' own loss on
windows drawn here), the written model is the merge at that scale (or, learned, base + the sum of
each fine-tune's task vector times its layer's scale), and the choice reaches the card and the key."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import CODE, VERSE, cli, error_line, write_jsonl, write_recipe
from mergecli.engine.calibration import Windows, load_texts, make_windows, spread_windows
from mergecli.errors import MergeCliError
from mergecli.recipe.schema import DatasetSpec


@pytest.fixture(scope="module")
def trained(tmp_path_factory, models):
    """Two real (tiny) fine-tunes, each clearly better than the base on its own text."""
    from mergecli.app.finetune import TrainSettings, train
    from mergecli.progress import SILENT

    root = tmp_path_factory.mktemp("trained")
    for name, texts in (("code", CODE), ("verse", VERSE)):
        write_jsonl(root / f"{name}.jsonl", texts)
        train(models / "base", texts, root / name, TrainSettings(steps=8, lr=3e-3, seq_len=32), SILENT, name)
    return root


def recipe_for(root, models, merges, seed=0, **calibration):
    return write_recipe(root / "r.yaml", str(models / "base"), [
        {"name": n, "model": str(root / n), "dataset": {"path": f"./{n}.jsonl"}} for n in ("code", "verse")],
        merges, calibration={"samples": 8, "seq_len": 32, "seed": seed, **calibration})


def loss(folder, windows):
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return float(model(input_ids=windows.input_ids, labels=windows.input_ids).loss)


def calibration_gain(trained, models, folder, seed, gaps=False):
    """Mean gain retained by the model in `folder` on held-out calibration windows (drawn with
    `seed` from each fine-tune's calibration part), from transformers' own loss; with `gaps`, also
    the mean gap between the base and the fine-tunes there."""
    tok = AutoTokenizer.from_pretrained(models / "base")
    gains, gap = [], []
    for name in ("code", "verse"):
        texts = load_texts(DatasetSpec(path=str(trained / f"{name}.jsonl")), trained, tok)
        windows = spread_windows(texts, tok, 8, 32, seed)
        base, own, merged = (loss(f, windows) for f in (models / "base", trained / name, folder))
        gains.append((base - merged) / (base - own))
        gap.append(base - own)
    return (sum(gains) / 2, sum(gap) / 2) if gaps else sum(gains) / 2


def sources(windows, documents):
    """For each window, the documents whose tokens contain it as one contiguous run."""
    def inside(row, doc):
        return any(doc[i:i + len(row)] == row for i in range(len(doc) - len(row) + 1))
    return [{k for k, doc in enumerate(documents) if inside(row, doc)} for row in windows.input_ids.tolist()]


def test_scoring_windows_are_spread_one_per_document(models):
    """The windows `lambda: auto` and `learned` score on: a long document gives one window, not the
    run of windows packing takes from it, so a few long files cannot be all the merge is fitted on."""
    tok = AutoTokenizer.from_pretrained(models / "base")
    long = [" ".join(f"{letter}{j}" for j in range(150)) for letter in "abcdefhilm"]  # > 32 tokens, all known
    documents = [tok(t, add_special_tokens=False)["input_ids"] for t in long]
    spread = spread_windows(long, tok, 8, 32, seed=5)
    assert spread.input_ids.shape == (8, 32) and bool(spread.attention_mask.all())
    found = sources(spread, documents)
    assert all(len(s) == 1 for s in found) and len(set().union(*found)) == 8  # eight documents, one window each
    packed = sources(make_windows(long, tok, 8, 32, seed=5), documents)
    assert len(set().union(*packed)) <= 3  # packing: whole documents in turn
    assert torch.equal(spread.input_ids, spread_windows(long, tok, 8, 32, seed=5).input_ids)
    assert not torch.equal(spread.input_ids, spread_windows(long, tok, 8, 32, seed=6).input_ids)
    # fewer documents than windows: every document gives one before any gives a second
    again = sources(spread_windows(long[:3], tok, 7, 32, seed=0), documents[:3])
    assert [len(s) for s in again] == [1] * 7
    assert set().union(*again[:3]) == set().union(*again[3:6]) == {0, 1, 2}  # round by round
    # documents shorter than a window are packed as make_windows packs them: EOS after each
    short = ["x = 1", "def add(a, b):", "hello there"]
    eos = tok.eos_token_id
    order = torch.randperm(3, generator=torch.Generator().manual_seed(0)).tolist()
    stream = [t for i in order for t in tok(short[i], add_special_tokens=False)["input_ids"] + [eos]]
    window = spread_windows(short, tok, 1, 8, seed=0)
    assert window.input_ids[0].tolist() == stream[:8]
    with pytest.raises(MergeCliError, match="tiny set has .* tokens, 4 windows of 32 need 128"):
        spread_windows(short, tok, 4, 32, seed=0, what="tiny set")


def test_lambda_auto_chooses_the_best_scale_on_calibration_windows(trained, models):
    recipe = recipe_for(trained, models, [{"name": "ta", "method": "task_arithmetic", "lambda": "auto"}])
    result = json.loads(cli("--json", "merge", str(recipe)).stdout)[0]
    search = result["search"]
    trace = {float(k): v for k, v in search["trace"].items()}
    assert search["parameter"] == "lambda" and len(trace) <= 12 and {0.0, 2.0} <= set(trace)
    assert search["chosen"] == max(trace, key=trace.get) and search["score"] == trace[search["chosen"]]
    assert result["seconds"] >= search["seconds"] > 0  # the merge's time includes its search
    assert 0 < search["chosen"] <= 2 and search["domains"] == ["code", "verse"] and search["windows"] == 8
    # the score at the chosen scale, recomputed: windows drawn here (seed + 1 of the calibration
    # part), losses from transformers' own loss on the written model, the base and the fine-tunes
    assert search["score"] == pytest.approx(calibration_gain(trained, models, trained / "out" / "ta", 1), abs=1e-4)
    # the written model is the merge at that scale (written from the part it was scored on, the base
    # plus lambda times the merge's change at lambda 1: equal to fp32 rounding)
    fixed = recipe_for(trained, models, [{"name": "ta-fixed", "method": "task_arithmetic",
                                         "lambda": search["chosen"]}])
    cli("merge", str(fixed))
    auto = AutoModelForCausalLM.from_pretrained(trained / "out" / "ta").state_dict()
    same = AutoModelForCausalLM.from_pretrained(trained / "out" / "ta-fixed").state_dict()
    for k in auto:
        torch.testing.assert_close(auto[k], same[k], rtol=1e-6, atol=1e-7)
    card = (trained / "out" / "ta" / "README.md").read_text()
    assert f"lambda: auto chose {search['chosen']:.4g}" in card and "held-out calibration windows" in card
    # cached while nothing changes; other calibration windows are another choice
    again = cli("--json", "merge", str(recipe_for(trained, models, [{"name": "ta", "method": "task_arithmetic",
                                                                     "lambda": "auto"}])))
    assert json.loads(again.stdout)[0]["reused"]
    other = cli("--json", "merge", str(recipe_for(trained, models, [{"name": "ta", "method": "task_arithmetic",
                                                                     "lambda": "auto"}], seed=3)))
    assert not json.loads(other.stdout)[0]["reused"]


def sampled(folder, count, seq_len, seed, batch_size):
    """Text sampled from a model as the spec says, step by step without a cache: the start token,
    then each next token drawn from the softmax of the logits (temperature 1, the whole vocabulary,
    EOS excluded), `batch_size` rows at a time from one seeded random stream."""
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    torch.manual_seed(seed)
    rows = []
    for begin in range(0, count, batch_size):
        ids = torch.full((min(batch_size, count - begin), 1), model.config.bos_token_id)
        with torch.no_grad():
            while ids.shape[1] < seq_len:
                logits = model(input_ids=ids).logits[:, -1].float()
                logits[:, model.config.eos_token_id] = -float("inf")
                ids = torch.cat([ids, torch.multinomial(torch.softmax(logits, -1), 1)], 1)
        rows.append(ids)
    ids = torch.cat(rows)
    return Windows(ids, torch.ones_like(ids))


def test_base_text_is_sampled_at_temperature_one_from_the_start_token(models, tmp_path):
    from mergecli.quality.basetext import sample_windows

    model = AutoModelForCausalLM.from_pretrained(models / "base").eval()
    defaults = {"do_sample": False, "top_k": 1, "no_repeat_ngram_size": 1, "min_p": 0.9, "suppress_tokens": [3]}
    for field, value in defaults.items():  # the model's generation defaults are not used
        setattr(model.generation_config, field, value)
    state = torch.get_rng_state()
    windows = sample_windows(model, 5, 24, seed=5, batch_size=2, device=torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random stream is left as it was
    assert model.generation_config.no_repeat_ngram_size == 1  # ... and the model's defaults are its own again
    assert windows.input_ids.shape == (5, 24) and bool(windows.attention_mask.all())
    assert torch.equal(windows.input_ids, sampled(models / "base", 5, 24, 5, 2).input_ids)
    assert not torch.equal(windows.input_ids, sample_windows(model, 5, 24, 6, 2, torch.device("cpu")).input_ids)
    model.config.bos_token_id = model.config.eos_token_id = None
    with pytest.raises(MergeCliError, match="no BOS or EOS token"):
        sample_windows(model, 1, 8, 0, 1, torch.device("cpu"))


def test_lambda_learned_scales_each_fine_tunes_part_per_layer(trained, models, monkeypatch):
    from mergecli.quality import learn

    recipe = recipe_for(trained, models, [{"name": "ta", "method": "task_arithmetic", "lambda": "learned"},
                                          {"name": "ta1", "method": "task_arithmetic", "lambda": 1.0}])
    learned = json.loads(cli("--json", "merge", str(recipe)).stdout)[0]["search"]
    assert learned["mode"] == "learned" and learned["models"] == ["code", "verse"]
    assert learned["held_to"] == "text sampled from the base"  # no calibration.general
    assert learned["windows"] == learned["selected_on"] == 8  # both sets capped by calibration.samples
    groups = {f"layer {k.split('.')[2]} {k.split('.')[3]}" for k in AutoModelForCausalLM.from_pretrained(
        models / "base").state_dict() if k.startswith("model.layers.")}  # a layer's attention, MLP, each norm
    assert {g for g in learned["scales"] if g.startswith("layer ")} == groups and len(groups) >= 8
    assert "model.embed_tokens.weight" in learned["scales"]
    assert all(len(v) == 2 for v in learned["scales"].values())
    # learned on windows of seed + 1, selected on windows of seed + 2 and on 8 windows of text the
    # base samples (seed + 2): the pass kept is the best start (every scale 1) or epoch by its gain less
    # what it forgot of the base's text beyond the start, in mean gaps between base and fine-tune
    gain, gap = calibration_gain(trained, models, trained / "out" / "ta", 2, gaps=True)
    assert learned["score"] == learned["trace"][learned["kept"]] and learned["trace"][0] == learned["start"]
    assert learned["forgetting"][0] == 0 and len(learned["forgetting"]) == len(learned["trace"]) == 9
    judged = [t - max(f, 0) / gap for t, f in zip(learned["trace"], learned["forgetting"])]
    assert learned["kept"] == judged.index(max(judged)) and judged[learned["kept"]] >= judged[0]
    assert learned["score"] > learned["start"]  # these fine-tunes are far from their best sum at scale 1
    assert learned["score"] == pytest.approx(gain, abs=1e-4)
    text = sampled(models / "base", 8, 32, 2, 4)  # calibration.batch_size rows at a time
    forgot = loss(trained / "out" / "ta", text) - loss(trained / "out" / "ta1", text)
    assert learned["forgetting"][learned["kept"]] == pytest.approx(forgot, abs=1e-4)
    # the written model: base + sum_i s[layer, i] * tau_i, tensor by tensor
    base = AutoModelForCausalLM.from_pretrained(models / "base").state_dict()
    fine = {n: AutoModelForCausalLM.from_pretrained(trained / n).state_dict() for n in ("code", "verse")}
    merged = AutoModelForCausalLM.from_pretrained(trained / "out" / "ta").state_dict()
    for key, theta in base.items():
        parts = key.split(".")
        group = f"layer {parts[2]} {parts[3]}" if parts[1] == "layers" else key
        if key == "lm_head.weight":  # tied to the embedding
            group = "model.embed_tokens.weight"
        scales = learned["scales"].get(group, [1.0, 1.0])
        expected = theta + sum(s * (fine[n][key] - theta) for s, n in zip(scales, ("code", "verse")))
        assert torch.allclose(merged[key], expected, atol=1e-5), key
    card = (trained / "out" / "ta" / "README.md").read_text()
    assert "lambda: learned: one scale per module of each layer and fine-tune" in card
    assert "| layer 0 self_attn | " in card
    assert json.loads(cli("--json", "merge", str(recipe)).stdout)[0]["reused"]
    # how many windows the scales learn on is an input of the merge: fewer make another merge
    monkeypatch.setattr(learn, "WINDOWS", 4)
    fewer = json.loads(cli("--json", "merge", str(recipe)).stdout)[0]
    assert not fewer["reused"] and fewer["search"]["windows"] == 4 and fewer["search"]["selected_on"] == 8


def test_a_chosen_merge_is_written_from_the_parts_it_was_scored_on(trained, models):
    """lambda: learned writes base + sum_i s_i * part_i from the parts in the workspace (the sum it
    scored, to the bit: a second merge would differ in the last fp32 bits), and the density it reports
    is the one the merge at fixed scales reports."""
    from safetensors.torch import load_file

    topk = {"method": "task_arithmetic_topk", "density": 0.5}
    recipe = recipe_for(trained, models, [{"name": "topk", "lambda": "learned", **topk}, {"name": "fixed", **topk}])
    learned, fixed = json.loads(cli("--json", "merge", str(recipe)).stdout)
    assert learned["kept_density"] == fixed["kept_density"] and 0.45 < fixed["kept_density"] < 0.55
    scales = learned["search"]["scales"]
    folder = max((trained / "ws" / "parts").iterdir(), key=lambda f: f.stat().st_mtime)  # this merge's
    parts = [load_file(folder / f"part-{i}" / "model.safetensors") for i in range(2)]
    base = load_file(models / "base" / "model.safetensors")
    written = load_file(trained / "out" / "topk" / "model.safetensors")
    assert set(parts[0]) <= set(base) and set(written) == set(base)
    for name, theta in base.items():
        pieces = name.split(".")
        group = f"layer {pieces[2]} {pieces[3]}" if pieces[1] == "layers" else name
        expected = theta.float()
        for s, part in zip(scales[group], parts):
            expected = torch.add(expected, part[name], alpha=s)  # as scored: one rounding per term
        assert torch.equal(written[name], expected), name


def test_with_pack_false_the_scoring_windows_are_one_padded_window_per_document(trained, models, tmp_path):
    """A recipe that does not pack (each document one padded window) scores on its documents' first
    tokens, as its hessian stage reads them: a few one-line documents are enough for eight windows."""
    for name, texts in (("code", CODE), ("verse", VERSE)):
        write_jsonl(tmp_path / f"{name}.jsonl", [t.splitlines()[0] for t in texts[:12]])  # a few held out
    recipe = write_recipe(tmp_path / "r.yaml", str(models / "base"), [
        {"name": n, "model": str(trained / n), "dataset": {"path": f"./{n}.jsonl"}}
        for n in ("code", "verse")], [{"name": "ta", "method": "task_arithmetic", "lambda": "auto"}],
        calibration={"samples": 8, "seq_len": 32, "pack": False})
    result = cli("--json", "merge", str(recipe))
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)[0]["search"]["windows"] == 8


def test_lambda_learned_needs_an_additive_method(trained, models):
    bad = recipe_for(trained, models, [{"name": "t", "method": "ties", "lambda": "learned"}])
    result = cli("validate", str(bad), code=None)
    assert result.exit_code != 0 and "merges.0.lambda: learned" in result.stderr and "regmean" in result.stderr


def test_lambda_auto_is_refused_where_it_cannot_be_chosen(trained, models):
    bad = write_recipe(trained / "bad.yaml", str(models / "base"), [{"name": "code", "model": str(trained / "code")}],
                       [{"name": "ta", "method": "task_arithmetic", "lambda": "auto"}])
    result = cli("validate", str(bad), code=None)
    assert result.exit_code != 0 and "lambda: auto is chosen on calibration text" in result.stderr
    schedule = recipe_for(trained, models, [{"name": "ta", "method": "task_arithmetic", "lambda": [0.5, "auto"]}])
    result = cli("validate", str(schedule), code=None)
    assert result.exit_code != 0 and "must be a number" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("choice", ["auto", "learned"])
def test_lambda_choice_under_torchrun_is_the_single_process_choice(trained, models, choice):
    """Two processes. auto: rank 0 searches and sends its choice, so the merge equals one process's
    bit for bit. learned: each process runs its share of every step's windows and the gradients are
    added up over the ranks, a different order of fp32 sums than one process's, so the scales and
    the merge equal one process's to within that rounding (and the same step is kept)."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    recipe = recipe_for(trained, models, [{"name": "ta", "method": "task_arithmetic", "lambda": choice}])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    runs = {}
    for label, launcher in (("one", [sys.executable, "-m", "mergecli"]),
                            ("two", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                     "--nproc-per-node=2", "-m", "mergecli"])):
        done = subprocess.run(launcher + ["-q", "--json", "merge", str(recipe), f"workspace=ws-{choice}-{label}",
                                          f"output_dir=out-{choice}-{label}"], capture_output=True, text=True, env=env,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[label] = json.loads(done.stdout)[0]
    one, two = ({k: v for f in sorted((trained / f"out-{choice}-{label}" / "ta").glob("*.safetensors"))
                 for k, v in load_file(f).items()} for label in ("one", "two"))
    assert one.keys() == two.keys()
    if choice == "auto":
        assert runs["two"]["search"] == {**runs["one"]["search"], "seconds": runs["two"]["search"]["seconds"]}
        assert all(torch.equal(one[k], two[k]) for k in one)
        return
    a, b = runs["one"]["search"], runs["two"]["search"]
    assert a["kept"] == b["kept"] and a["scales"].keys() == b["scales"].keys()
    assert b["trace"] == pytest.approx(a["trace"], rel=1e-6) and b["score"] == pytest.approx(a["score"], rel=1e-6)
    assert all(b["scales"][g] == pytest.approx(a["scales"][g], abs=2e-6) for g in a["scales"])
    assert all(torch.allclose(one[k].float(), two[k].float(), rtol=1e-5, atol=1e-6) for k in one)


GENERAL = [f"The river number {i} runs past the old mill, and the town sleeps under the hill." for i in range(60)]


def test_lambda_learned_is_held_to_the_general_text_the_recipe_gives(trained, models, monkeypatch):
    """With `calibration.general`, the learned scales are held to windows of that text's calibration
    part (drawn as the domains' are) instead of the base's samples: the forgetting the merge reports
    is the NLL there over the merge at scale 1, recomputed here; the text is an input of the merge's
    key, not of the Hessians'."""
    from mergecli.quality import learn

    monkeypatch.setattr(learn, "EPOCHS", 2)
    general = write_jsonl(trained / "general.jsonl", GENERAL)
    merges = [{"name": "held", "method": "task_arithmetic", "lambda": "learned"},
              {"name": "held1", "method": "task_arithmetic", "lambda": 1.0}]
    hessians = json.loads(cli("--json", "hessian", str(recipe_for(trained, models, merges))).stdout)
    recipe = recipe_for(trained, models, merges, general={"path": "./general.jsonl"})
    assert all(h["reused"] for h in json.loads(cli("--json", "hessian", str(recipe)).stdout)) and hessians
    result = json.loads(cli("--json", "merge", str(recipe)).stdout)
    learned = result[0]["search"]
    assert learned["held_to"] == "calibration.general (./general.jsonl [train])" and len(learned["forgetting"]) == 3
    _, gap = calibration_gain(trained, models, trained / "out" / "held", 2, gaps=True)
    judged = [t - max(f, 0) / gap for t, f in zip(learned["trace"], learned["forgetting"])]
    assert learned["kept"] == judged.index(max(judged))
    # selected on the general text's calibration part (its last tenth is held out for evaluation),
    # 8 windows spread one per document with seed + 2
    tok = AutoTokenizer.from_pretrained(models / "base")
    texts = load_texts(DatasetSpec(path=str(general)), trained, tok)
    assert len(texts) == 54
    text = spread_windows(texts, tok, 8, 32, 2)
    forgot = loss(trained / "out" / "held", text) - loss(trained / "out" / "held1", text)
    assert learned["forgetting"][learned["kept"]] == pytest.approx(forgot, abs=1e-4)
    card = (trained / "out" / "held" / "README.md").read_text()
    assert "Held to calibration.general (./general.jsonl [train])" in card
    # other general text is another learned merge; the plain merge does not depend on it
    write_jsonl(general, GENERAL[::-1])
    again = json.loads(cli("--json", "merge", str(recipe)).stdout)
    assert [r["reused"] for r in again] == [False, True]
    general.unlink()
    missing = cli("merge", str(recipe), code=1)
    assert error_line(missing).startswith("Error: calibration.general: dataset ./general.jsonl")
