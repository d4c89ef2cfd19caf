"""``dynlab generate`` on the tiny model: the file with its settings, per-row seeds, reproducibility, prompt sources
(run directory, synthetic, probe/preference/prompt-only files), the repetition table, bad input exiting 2, and the
GenerationMetrics callback during a tiny fit."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from dynlab.cli import main
from dynlab.data.synthetic import make_synthetic
from dynlab.errors import InputError
from dynlab.evaluation.generation import (
    SYNTHETIC_SPLIT,
    GenerationSettings,
    generate_rows,
    load_prompts,
    resolve_model,
)
from dynlab.evaluation.repetition import COLUMNS
from dynlab.models.load import ModelSpec, load_model, load_tokenizer, tiny_tokenizer
from dynlab.tracking.trajectory import write_jsonl
from tests.conftest import CONFIGS, REPO
from tests.test_chat import one_thread  # noqa: F401 - a fixture used by name

FIXTURES = REPO / "tests" / "fixtures"
SETTINGS_KEYS = {"model", "model_path", "prompts", "max_new_tokens", "greedy", "num_samples", "temperature", "top_p",
                 "seed", "batch_size", "max_prompt_length", "dtype", "num_prompts", "dynlab_version"}


def read(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def generate(capsys, *args: str, out: str = "gen.jsonl") -> list[dict]:
    main(["generate", "--model", "tiny", "--max-new-tokens", "6", *args, "--out", out])
    printed = capsys.readouterr().out
    assert printed.startswith(f"{out}: ") and ("| greedy |" in printed or "| sampled |" in printed)
    return read(out)


def fails(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(["generate", *args, "--out", "gen.jsonl"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dynlab: error: "), err
    assert not Path("gen.jsonl").exists() and not Path("gen.repetition.json").exists()
    return err[0]


@pytest.mark.usefixtures("one_thread")
def test_generate_writes_greedy_and_sampled_rows_with_settings(in_tmp, capsys):
    rows = generate(capsys, "--prompts", "synthetic", "--limit", "3", "--num-samples", "2", "--batch-size", "2",
                    "--seed", "7", "--temperature", "0.9", "--top-p", "0.95")
    num_train, _, seed = SYNTHETIC_SPLIT
    prompts = [r["prompt"] for r in make_synthetic(sum(SYNTHETIC_SPLIT[:2]), seed=seed)[num_train:][:3]]
    assert [(r["mode"], r["prompt_index"], r["sample_index"]) for r in rows] == [
        ("greedy", 0, 0), ("greedy", 1, 0), ("greedy", 2, 0),
        ("sampled", 0, 0), ("sampled", 1, 0), ("sampled", 2, 0),
        ("sampled", 0, 1), ("sampled", 1, 1), ("sampled", 2, 1)]
    assert [r["prompt"] for r in rows] == prompts * 3
    # the torch seed of each row's batch: seed + sample * num_prompts + the batch's first prompt index
    assert [r["seed"] for r in rows] == [None] * 3 + [7, 7, 9] + [10, 10, 12]
    assert all(isinstance(r["response"], str) for r in rows)
    settings = rows[0]["settings"]
    assert set(settings) == SETTINGS_KEYS and all(r["settings"] == settings for r in rows)
    assert settings | {"dynlab_version": None} == {
        "model": "tiny", "model_path": "tiny", "prompts": "synthetic", "max_new_tokens": 6, "greedy": True,
        "num_samples": 2, "temperature": 0.9, "top_p": 0.95, "seed": 7, "batch_size": 2, "max_prompt_length": None,
        "dtype": "float32", "num_prompts": 3, "dynlab_version": None}
    stats = json.loads(Path("gen.repetition.json").read_text())
    assert stats["model"] == "tiny" and set(stats["repetition"]) == {"greedy", "sampled"}
    assert list(stats["repetition"]["sampled"]) == list(COLUMNS) and stats["repetition"]["sampled"]["n"] == 6


@pytest.mark.usefixtures("one_thread")
def test_the_same_seed_gives_the_same_file_and_another_seed_other_samples(in_tmp, capsys):
    common = ("--prompts", "synthetic", "--limit", "4", "--num-samples", "2", "--batch-size", "3")
    first = generate(capsys, *common, out="a.jsonl")
    assert generate(capsys, *common, out="b.jsonl") == first
    other = generate(capsys, *common, "--seed", "1", out="c.jsonl")
    greedy = [r["response"] for r in first if r["mode"] == "greedy"]
    assert [r["response"] for r in other if r["mode"] == "greedy"] == greedy  # greedy ignores the seed
    assert [r["response"] for r in other if r["mode"] == "sampled"] != [r["response"] for r in first
                                                                          if r["mode"] == "sampled"]
    assert Path("a.jsonl").read_bytes() == Path("b.jsonl").read_bytes()


@pytest.mark.usefixtures("one_thread")
def test_greedy_only_and_samples_only(in_tmp, capsys):
    greedy = generate(capsys, "--prompts", "synthetic", "--limit", "2", "--num-samples", "0", out="g.jsonl")
    assert [r["mode"] for r in greedy] == ["greedy"] * 2
    sampled = generate(capsys, "--prompts", "synthetic", "--limit", "2", "--no-greedy", out="s.jsonl")
    assert [r["mode"] for r in sampled] == ["sampled"] * 2 and sampled[0]["settings"]["greedy"] is False


def tiny_run_dir(root: Path) -> Path:
    """A finished run's layout, as far as generate reads it: config.yaml, export/ and the probe splits."""
    run = root / "runs" / "dpo" / "version_0"
    (run / "probes").mkdir(parents=True)
    (run / "config.yaml").write_text("model: {}\n")
    load_model(ModelSpec("tiny")).save_pretrained(run / "export")
    load_tokenizer(ModelSpec("tiny")).save_pretrained(run / "export")
    rows = make_synthetic(6, seed=1)
    probe_rows = [{"prompt": r["prompt"], "chosen": r["chosen"]} for r in rows]
    write_jsonl(run / "probes" / "probe_train.jsonl", probe_rows[:4])
    write_jsonl(run / "probes" / "probe_test.jsonl", probe_rows[4:])
    return run


@pytest.mark.usefixtures("one_thread")
def test_a_run_directory_is_its_export_and_its_probe_splits(in_tmp, capsys):
    run = tiny_run_dir(in_tmp)
    assert resolve_model(str(run)) == str(run / "export")
    rows = generate(capsys, "--prompts", f"{run}:train", "--num-samples", "0")
    synthetic = make_synthetic(6, seed=1)
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in synthetic[:4]]
    assert load_prompts(str(run)) == load_prompts(f"{run}:test") == [r["prompt"] for r in synthetic[4:]]
    main(["generate", "--model", str(run), "--prompts", str(run), "--max-new-tokens", "6", "--num-samples", "0",
          "--out", "run.jsonl"])
    from_run = read("run.jsonl")
    assert from_run[0]["settings"]["model_path"] == str(run / "export")
    # the export holds the tiny model's weights: the same greedy responses as the tiny spec itself
    main(["generate", "--model", "tiny", "--prompts", f"{run}:test", "--max-new-tokens", "6", "--num-samples", "0",
          "--out", "tiny.jsonl"])
    assert [r["response"] for r in from_run] == [r["response"] for r in read("tiny.jsonl")]


def test_prompt_files(in_tmp):
    flat = load_prompts(str(FIXTURES / "flat_small.jsonl"))
    assert flat == ["\n\nHuman: Say hi.\n\nAssistant:", "\n\nHuman: Count to three.\n\nAssistant:"]
    hh = load_prompts(str(FIXTURES / "hh_small.jsonl"))
    assert hh[0] == "\n\nHuman: How do I keep basil fresh?\n\nAssistant:"
    assert len(load_prompts(str(FIXTURES / "ultrafeedback_small.json"))) >= 1
    # prompt-only rows, duplicates kept once, and a generation file read back as prompts
    write_jsonl("p.jsonl", [{"prompt": "Q1"}, {"prompt": "Q2"}, {"prompt": "Q1"}])
    assert load_prompts("p.jsonl") == ["Q1", "Q2"] and load_prompts("p.jsonl", limit=1) == ["Q1"]
    write_jsonl("g.jsonl", [{"prompt": "Q1", "response": "x", "mode": "greedy"}])
    assert load_prompts("g.jsonl") == ["Q1"]
    assert load_prompts("synthetic:train")[:2] == [r["prompt"] for r in make_synthetic(128, 0)[:2]]


def test_chat_rows_use_the_tokenizers_chat_template(in_tmp):
    tok = tiny_tokenizer().__class__(tokenizer_object=tiny_tokenizer().backend_tokenizer, eos_token="<|endoftext|>")
    tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    write_jsonl("chat.jsonl", [{"chosen": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "A"}],
                                "rejected": [{"role": "user", "content": "Hi?"},
                                             {"role": "assistant", "content": "B"}]}])
    assert load_prompts("chat.jsonl", tok) == ["<user>Hi?<assistant>"]


@pytest.mark.usefixtures("one_thread")
def test_max_prompt_length_keeps_the_end_of_the_prompt():
    tok, model = tiny_tokenizer(), load_model(ModelSpec("tiny"))
    prompt = "\n\nHuman: " + "a long preamble about nothing " * 8 + "What is the capital of Peru?\n\nAssistant:"
    short = "\n\nHuman: What is the capital of Peru?\n\nAssistant:"
    n = len(tok(short)["input_ids"])
    settings = GenerationSettings(model="tiny", model_path="tiny", prompts="x", max_new_tokens=5, num_samples=0,
                                  max_prompt_length=n)
    cut = generate_rows(model, tok, [prompt], settings)[0]
    whole = generate_rows(model, tok, [short], settings)[0]
    assert cut["response"] == whole["response"] and cut["prompt"] == prompt  # the row keeps the prompt as given


@pytest.mark.parametrize("args, message", [
    (["--model", "tiny", "--prompts", "missing.jsonl"], "missing.jsonl: no such file"),
    (["--model", "tiny", "--prompts", "bad.jsonl"], "bad.jsonl: row 2: not valid JSON"),
    (["--model", "tiny", "--prompts", "empty.jsonl"], "empty.jsonl: row 1: field 'prompt': the prompt is empty"),
    (["--model", "tiny", "--prompts", "nowhere:test"], "neither a dynlab run directory"),
    (["--model", "tiny", "--prompts", "synthetic", "--num-samples", "0", "--no-greedy"], "field 'num_samples'"),
    (["--model", "tiny", "--prompts", "synthetic", "--temperature", "0"], "temperature > 0"),
    (["--model", "./no/such/dir", "--prompts", "synthetic"], "no such model directory"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(in_tmp, capsys, args, message):
    Path("bad.jsonl").write_text('{"prompt": "ok"}\n{not json\n')
    Path("empty.jsonl").write_text('{"prompt": "  "}\n')
    assert message in fails(capsys, *args)


def test_a_run_without_export_or_probes_is_an_input_error(in_tmp):
    run = in_tmp / "runs" / "sft" / "version_0"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("{}\n")
    with pytest.raises(InputError, match="did not finish"):
        resolve_model(str(run))
    (run / "probes").mkdir()
    with pytest.raises(InputError, match="no probes/probe_test.jsonl"):
        load_prompts(f"{run}:test")


@pytest.mark.usefixtures("one_thread")
def test_generation_metrics_callback_logs_at_the_probe_cadence(in_tmp):
    main(["fit", "--config", str(CONFIGS / "dpo.yaml"), "--config", str(CONFIGS / "tiny.yaml"),
          "--trainer.callbacks+=dynlab.evaluation.callback.GenerationMetrics",
          "--trainer.callbacks.num_prompts=3", "--trainer.callbacks.max_new_tokens=5"])
    run = next(Path("runs", "dpo").glob("version_*"))
    with open(run / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("generation/mean_len")]
    assert [int(r["step"]) for r in rows] == [0, 3, 6]  # step 0, every probe_every_n_steps=3, the last step
    assert all(0 < float(r["generation/mean_len"]) and 0 <= float(r["generation/distinct_1"]) <= 1 for r in rows)
    assert {k for k in rows[0] if k.startswith("generation/") and rows[0][k]} >= {
        "generation/distinct_2", "generation/rep_3", "generation/longest_repeat", "generation/unique_frac"}
    saved = sorted((run / "generations").glob("step_*.jsonl"))
    assert [p.name for p in saved] == ["step_00000000.jsonl", "step_00000003.jsonl", "step_00000006.jsonl"]
    texts = read(saved[0])
    probe_test = read(run / "probes" / "probe_test.jsonl")
    assert [t["prompt"] for t in texts] == [r["prompt"] for r in probe_test[:3]]
    assert all(t["step"] == 0 and t["split"] == "test" and isinstance(t["response"], str) for t in texts)
