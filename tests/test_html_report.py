"""``dynlab report``: one self-contained HTML page from two real tiny runs (SFT, then DPO from its export), parsed
back (the signature table, every image a decodable PNG data URI, nothing fetched from a network, the config
differences, the probe examples that moved most with their texts), opened in a real Chromium, and bad inputs."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from dynlab.cli import main
from dynlab.evaluation.html_report import MISSING, config_differences, curve_panels, flatten
from dynlab.evaluation.signatures import check_signatures, result_word
from dynlab.tracking.plots import plot_runs
from dynlab.tracking.trajectory import read_trajectory
from tests.conftest import CONFIGS, run_dir_of, run_dynlab

ENV = {"OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}


class Page(HTMLParser):
    """What the tests read from the page: every table's rows (cell texts), every element's attributes, the
    <details> texts and the <img> sources."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tables: list[tuple[dict, list[list[str]]]] = []
        self.attrs: list[tuple[str, str, str]] = []
        self.details: list[str] = []
        self.images: list[str] = []
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self._in_details = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.attrs += [(tag, k, v or "") for k, v in attrs.items()]
        if tag == "table":
            self.tables.append((attrs, []))
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "details":
            self._in_details, _ = True, self.details.append("")
        elif tag == "img":
            self.images.append(attrs.get("src", ""))

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[-1][1].append(self._row)
            self._row = None
        elif tag == "details":
            self._in_details = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._in_details:
            self.details[-1] += data

    def table(self, **match) -> list[list[str]]:
        found = [rows for attrs, rows in self.tables if all(attrs.get(k) == v for k, v in match.items())]
        assert len(found) == 1, (match, [a for a, _ in self.tables])
        return found[0]


def fit(cwd: Path, stage: str, *extra: str) -> Path:
    proc = run_dynlab("fit", "--config", str(CONFIGS / f"{stage}.yaml"), "--config", str(CONFIGS / "tiny.yaml"),
                      *extra, cwd=cwd, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir_of(proc, cwd)


@pytest.fixture(scope="module")
def runs(module_tmp) -> list[Path]:
    cwd = module_tmp("report_runs")
    sft = fit(cwd, "sft")
    return [sft, fit(cwd, "dpo", f"--model.init_args.init_from={sft / 'export'}")]


@pytest.fixture(scope="module")
def report(runs, module_tmp) -> tuple[Path, str]:
    out = module_tmp("report") / "report.html"
    main(["report", *map(str, runs), "--out", str(out)])
    return out, out.read_text(encoding="utf-8")


@pytest.mark.parametrize("split", ["train", "test"])
def test_both_splits_signature_tables_show_every_check_in_the_shared_wording(runs, report, split):
    expected = check_signatures([str(r) for r in runs], split=split)
    rows = Page(report[1]).table(id=f"signature-table-{split}")
    assert rows[0] == ["id", "claim", "result", "numbers", "runs", "reference"]
    assert len(rows) == 1 + len(expected) and expected
    for row, sig in zip(rows[1:], expected):
        assert row[0] == str(sig.id) and row[1].startswith(sig.claim.strip())
        assert row[5] == (sig.reference.strip() or "–")
        assert row[2] == result_word(sig)  # 12/16 "pass"/"FAIL", the others "shown"/"not shown (at this scale)"
        for key in sig.numbers:  # the numbers are there whatever the result
            assert key in row[3]
    assert {row[2] for row in rows[1:] if row[0] in ("12", "16")} <= {"pass", "FAIL", "undecided"}


def test_one_split_on_request_and_each_runs_role_in_the_header(runs, tmp_path):
    out = tmp_path / "r.html"
    main(["report", *map(str, runs), "--split", "test", "--out", str(out)])
    page = Page(text := out.read_text())
    assert [a for a in page.tables if a[0].get("class") == "signatures"][0][0]["id"] == "signature-table-test"
    assert 'id="signature-table-train"' not in text
    for role, run in zip(("sft", "dpo"), runs):
        assert f"({role}): <code>{run.resolve()}</code>" in text


def test_every_image_is_an_embedded_png_and_nothing_comes_from_a_network(runs, report, tmp_path):
    page = Page(report[1])
    figures = plot_runs(runs, tmp_path / "figs")
    assert len(page.images) == len(figures) + 1  # dynlab plot's figures and the training curves
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        png = base64.b64decode(src.removeprefix("data:image/png;base64,"), validate=True)
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        image = Image.open(io.BytesIO(png))
        image.load()
        assert image.width > 300 and image.height > 200
    links = [(tag, name, value) for tag, name, value in page.attrs if name in ("src", "href")]
    assert links and all(not value.strip().lower().startswith(("http:", "https:", "//")) for _, _, value in links)
    assert not [a for a in page.attrs if a[0] == "script"] and "@import" not in report[1]
    assert "url(" not in report[1]  # no CSS-loaded fonts or images either


def test_the_report_file_is_whole_and_readable(report):
    out, text = report
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    assert sorted(p.name for p in out.parent.iterdir()) == ["report.html"]  # no temporary file left behind
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # a new file's usual mode, not a temporary file's 0600


def test_configs_collapsed_and_their_differences_tabled(runs, report):
    page = Page(report[1])
    assert len(page.details) == 2
    assert "dynlab.modules.SFTModule" in page.details[0] and "dynlab.modules.DPOModule" in page.details[1]
    diff = {row[0]: row[1:] for row in page.table(id="config-diff")[1:]}
    assert diff["model.class_path"] == ['"dynlab.modules.SFTModule"', '"dynlab.modules.DPOModule"']
    assert diff["model.init_args.init_from"][0] == "null" and "export" in diff["model.init_args.init_from"][1]
    assert diff["model.init_args.reduction"] == ['"token_mean"', "–"]  # SFTModule's own argument
    assert "model.init_args.beta" in diff and "data.init_args.num_train" not in diff  # equal values stay out


def test_config_differences_by_hand():
    a = flatten({"m": {"lr": 1e-3, "betas": [0.9, 0.99]}, "x": 1, "only_a": None})
    b = flatten({"m": {"lr": 1e-4, "betas": [0.9, 0.999]}, "x": 1})
    assert a == {"m.lr": 1e-3, "m.betas.0": 0.9, "m.betas.1": 0.99, "x": 1, "only_a": None}
    # a key one config lacks differs even where the other's value is null
    assert config_differences([a, b]) == {"m.lr": [1e-3, 1e-4], "m.betas.1": [0.99, 0.999], "only_a": [None, MISSING]}


def test_training_curves_group_what_metrics_csv_holds(runs, report):
    columns = list(pd.read_csv(runs[1] / "metrics.csv").columns)
    panels = curve_panels(columns)
    assert panels["train/loss"] == ["train/loss"]
    assert set(panels["train/rewards"]) == {"train/rewards/chosen", "train/rewards/rejected", "train/rewards/margin"}
    assert panels["train/accuracy"] == ["train/rewards/accuracy"]
    assert set(panels["train/logps"]) == {"train/logps/chosen", "train/logps/rejected"}
    assert "probe/train/margin" in panels["probe margin (log π(y⁺) − log π(y⁻))"]
    assert curve_panels(["step", "lr-AdamW", "probe/train/dlogp/chosen"]) == {"learning rate": ["lr-AdamW"]}
    assert "training curves" in report[1]


def test_the_probe_examples_that_moved_most_with_their_texts(runs, report):
    tables = [rows for attrs, rows in Page(report[1]).tables if attrs.get("class") == "movers"]
    assert len(tables) == 2
    for run, rows in zip(runs, tables):
        frame = read_trajectory(run)
        logp = frame.pivot_table(index=["split", "type", "row"], columns="step", values="logp")
        delta = (logp[logp.columns.max()] - logp[logp.columns.min()])
        top = delta.abs().sort_values(ascending=False).head(5)
        assert len(rows) == 1 + 5
        shown = [(r[0], r[1], int(r[2])) for r in rows[1:]]
        assert shown == list(top.index)
        for (split, ptype, row), cells in zip(shown, rows[1:]):
            assert float(cells[5]) == pytest.approx(delta[(split, ptype, row)], abs=0.006)
            probe = [json.loads(x) for x in (run / "probes" / f"probe_{split}.jsonl").read_text().splitlines()]
            text = probe[row][ptype].strip()
            assert cells[7] == text or (cells[7].endswith("…") and text.startswith(cells[7][:-1]))


def test_texts_are_escaped_and_credentials_redacted(runs, tmp_path):
    """A probe text with markup shows as text, never as markup; a credential in config.yaml never shows."""
    copy = tmp_path / "edited" / "dpo" / "version_0"
    shutil.copytree(runs[1], copy, ignore=shutil.ignore_patterns("export", "checkpoints"))
    frame = read_trajectory(copy)
    logp = frame.pivot_table(index=["split", "type", "row"], columns="step", values="logp")
    split, ptype, row = (logp[logp.columns.max()] - logp[logp.columns.min()]).abs().idxmax()
    probe_file = copy / "probes" / f"probe_{split}.jsonl"
    rows = [json.loads(x) for x in probe_file.read_text().splitlines()]
    rows[row][ptype] = "<script>alert('x')</script> & <b>bold</b>"
    probe_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = copy / "config.yaml"
    config.write_text(config.read_text().replace("rephraser: null",
                                                 "rephraser: openai:https://user:SECRETKEY123@host.example/v1@m"))
    out = tmp_path / "r.html"
    main(["report", str(runs[1]), str(copy), "--out", str(out)])
    text = out.read_text()
    assert "<script" not in text and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &lt;b&gt;" in text
    assert "SECRETKEY123" not in text and "https://***@host.example" in text
    diff = {r[0]: r[1:] for r in Page(text).table(id="config-diff")[1:]}
    assert diff["data.init_args.rephraser"][0] == "null" and "***" in diff["data.init_args.rephraser"][1]


HOSTILE = {"corrupt_parquet": "not a readable parquet file", "csv_not_utf8": "not a readable UTF-8 CSV",
           "config_not_utf8": "not UTF-8", "no_plot_column": "no 'peakiness' column"}


@pytest.mark.parametrize("case", ["missing", "no_config", "no_trajectory", "top_k", *HOSTILE])
def test_bad_inputs_are_one_line_naming_the_path(case, runs, tmp_path, capsys):
    bad = tmp_path / "bad_run"
    if case == "no_config":
        shutil.copytree(runs[1] / "probes", bad / "probes")
    elif case == "no_trajectory":
        bad.mkdir()
        shutil.copy(runs[1] / "config.yaml", bad)
    elif case in HOSTILE:
        shutil.copytree(runs[1], bad, ignore=shutil.ignore_patterns("export", "checkpoints"))
        steps = sorted((bad / "probes" / "trajectory").glob("step_*.parquet"))
        if case == "corrupt_parquet":
            steps[-1].write_bytes(b"PAR1 truncated")
        elif case == "csv_not_utf8":
            (bad / "metrics.csv").write_bytes(b"step,train/loss\n0,\xff\xfe\n")
        elif case == "config_not_utf8":
            (bad / "config.yaml").write_bytes((bad / "config.yaml").read_bytes() + b"# \xff\n")
        else:
            for step in steps:
                pd.read_parquet(step).drop(columns="peakiness").to_parquet(step)
    out = tmp_path / "report.html"
    out.write_text("an earlier report")
    args = ["report", str(runs[0]), str(bad), "--out", str(out)]
    if case == "top_k":
        args = ["report", str(runs[0]), "--top-k", "0", "--out", str(out)]
    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("dynlab: error: ") and err.count("\n") == 1
    expected = {"missing": "no such run directory", "no_config": "no config.yaml",
                "no_trajectory": "no probe trajectory", "top_k": "--top-k", **HOSTILE}[case]
    assert expected in err and (case == "top_k" or str(bad) in err)
    if case == "corrupt_parquet":
        assert steps[-1].name in err  # the very file
    assert out.read_text() == "an earlier report"  # nothing half-written, nothing overwritten


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


def test_a_real_browser_renders_the_page(report, tmp_path):
    """Chromium opens the file (file://, no network): no console or page errors, no failed request, every image
    decoded, the signature table there. Driven by playwright where installed, else by Chromium's own headless
    --dump-dom and --screenshot."""
    binary = chromium()
    if binary is None:
        pytest.skip("no chromium binary (Debian: apt-get install chromium); CI installs it")
    out, _ = report
    shot = tmp_path / "report.png"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if sync_playwright is not None:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=binary, args=["--no-sandbox", "--disable-dev-shm-usage"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            problems = []
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
            page.goto(out.resolve().as_uri(), wait_until="load")
            images = page.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth])")
            rows = page.locator("table.signatures tbody tr").count()
            page.screenshot(path=str(shot), full_page=True)
            browser.close()
        assert problems == []
        assert images and all(complete and width > 0 for complete, width in images), images
        assert rows > 0
    else:
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
        dom = subprocess.run([binary, *flags, "--dump-dom", out.resolve().as_uri()], capture_output=True, text=True,
                             timeout=120)
        assert dom.returncode == 0, dom.stderr[-2000:]
        assert 'id="signature-table-train"' in dom.stdout and dom.stdout.count("<img") == report[1].count("<img")
        subprocess.run([binary, *flags, f"--screenshot={shot}", "--window-size=1400,3000", out.resolve().as_uri()],
                       capture_output=True, timeout=120, check=True)
    image = Image.open(shot)
    assert image.width >= 1000 and image.height >= 1000
    assert len(set(image.convert("L").resize((64, 64)).getdata())) > 10  # a page, not a blank canvas
