"""The run report (rlhf/report.py): built from a real short run, opened in a real headless Chromium.

The browser tests need Debian's `chromium` (the Makefile bootstrap installs it); without it they
fail, saying so: a browser check that silently skips would prove nothing. The screenshot of the real run lands in the test's tmp folder (`report.png`).
"""

import base64
import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from rlhf.cli import main
from rlhf.config import load_config
from rlhf.report import build_report, data_tables, evaluation_tables, read_metrics

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium")


def _chromium() -> str:
    if CHROMIUM is None:
        pytest.fail("no chromium: `apt-get install chromium` (the make bootstrap does it)")
    return CHROMIUM


TINY = [
    "model.tiny.hidden_size=64",
    "model.tiny.num_layers=2",
    "model.tiny.num_heads=2",
    "model.tiny.num_kv_heads=2",
    "model.tiny.intermediate_size=64",
]
SFT = [
    "sft.num_workers=1",
    "sft.max_steps=4",
    "sft.warmup_steps=1",
    "sft.micro_batch_size=2",
    "sft.global_batch_size=8",
    "sft.eval_interval=2",
    "sft.save_interval=4",
    "sft.log_interval=1",
]
RL = [
    "rl.algorithm=grpo",  # no critic: one actor fewer to start
    "rl.max_steps=2",
    "rl.eval_interval=2",
    "rl.prompts_per_step=4",
    "rl.samples_per_prompt=2",
    "rl.mini_batch_size=4",
    "rl.filter_groups=false",
    "rl.rollout.chunk_size=1",
    "rl.rollout.max_new_tokens=6",
    "rl.rollout.kv_cache_gb=0.05",
    "rl.eval_prompts=8",
    "rl.policy.micro_batch_size=2",
    "rl.critic.micro_batch_size=2",
]
# Checks run inside the page after it loads; the result is appended to the DOM that
# `--dump-dom` prints. An image counts as loaded when the browser decoded it (naturalWidth > 0).
IMAGE_CHECK = """<script>
addEventListener("load", () => {
  const imgs = [...document.images];
  const out = document.createElement("pre");
  out.id = "image-check";
  out.textContent = JSON.stringify({
    total: imgs.length,
    broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt),
    fetched: performance.getEntriesByType("resource").map(e => e.name),
  });
  document.body.appendChild(out);
});
</script>"""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, ray_cluster):
    """A real pipeline run (SFT then GRPO, a few steps of a tiny model), report included."""
    from rlhf.driver import run_pipeline

    out = tmp_path_factory.mktemp("report_run")
    cfg = load_config(
        REPO / "configs/tiny_cpu.yaml",
        [
            f"run.output_dir={out}",
            "run.name=r",
            "run.stages=[sft,rl]",
            *TINY,
            *SFT,
            *RL,
            "eval.num_prompts=16",
            "eval.samples=2",
        ],
    )
    run_pipeline(cfg)
    return out / "r"


def chromium(profile: Path, *args: str) -> subprocess.CompletedProcess:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",  # containers often have a small /dev/shm
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
    ]
    done = subprocess.run([_chromium(), *flags, *args], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"chromium exited {done.returncode}: {done.stderr[-2000:]}"
    return done


def browser_check(report: Path, tmp: Path) -> tuple[str, dict]:
    """(the DOM Chromium rendered, the in-page image check) for a report file."""
    page = tmp / "checked.html"
    page.write_text(report.read_text().replace("</body>", IMAGE_CHECK + "</body>"))
    dom = chromium(tmp / "profile", "--virtual-time-budget=10000", "--dump-dom", page.as_uri())
    found = re.search(r'<pre id="image-check">(.*?)</pre>', dom.stdout, re.S)
    assert found, f"the page's check did not run; DOM ends: {dom.stdout[-500:]}"
    return dom.stdout, json.loads(html.unescape(found.group(1)))


@pytest.mark.ray
@pytest.mark.vllm
@pytest.mark.e2e
@pytest.mark.slow
def test_a_finished_run_leaves_a_self_contained_report_of_every_stage(run_dir):
    text = (run_dir / "report.html").read_text()
    assert "<title>rlhf run report: r</title>" in text
    for section in ("stage-sft", "stage-rl", "evaluation", "config"):
        assert f'id="{section}"' in text
    # Nothing is fetched: no links to files or servers, every image is an inline PNG.
    assert not re.search(r'(src|href)="(?!data:|#)', text)
    assert "<link" not in text and "<script" not in text
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)"', text)
    assert [alt for alt, _ in images] == ["sft curves", "rl curves", "rl time per step"]
    assert all(base64.b64decode(b64)[:8] == b"\x89PNG\r\n\x1a\n" for _, b64 in images)
    # The evaluation table compares RL with SFT with the p-values summary.json holds.
    summary = json.loads((run_dir / "summary.json").read_text())["evaluation"]
    assert "greedy p (McNemar)" in text and "sampled p (Wilcoxon)" in text
    _, _, compared, _ = evaluation_tables(summary)
    assert compared[0][:2] == ["rl", "sft"]
    # The data reports of both stages are there: SFT's files and RL's prompt files.
    assert "Data report" in text and "Prompt report" in text
    assert "rlhf/data/samples/prompts.jsonl" in text and "sft_io.jsonl" in text


@pytest.mark.ray
@pytest.mark.vllm
@pytest.mark.e2e
@pytest.mark.slow
def test_the_report_renders_in_headless_chromium_with_every_image_loaded(run_dir, tmp_path):
    report = run_dir / "report.html"
    dom, check = browser_check(report, tmp_path)
    assert "<title>rlhf run report: r</title>" in dom
    for heading in ("<h2>Stages</h2>", "<h2>sft</h2>", "<h2>rl</h2>", "<h2>Evaluation</h2>"):
        assert heading in dom
    assert check["total"] == 3 and check["broken"] == []
    assert check["fetched"] == []  # no external resource was requested
    shot = tmp_path / "report.png"
    chromium(
        tmp_path / "profile", "--window-size=1400,3000", f"--screenshot={shot}", report.as_uri()
    )
    from PIL import Image

    with Image.open(shot) as img:
        assert img.size == (1400, 3000)
        colours = img.convert("L").getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 50  # plots and text, not a blank page


@pytest.mark.ray
@pytest.mark.vllm
@pytest.mark.e2e
@pytest.mark.slow
def test_the_browser_check_reports_an_image_that_does_not_decode(run_dir, tmp_path):
    text = (run_dir / "report.html").read_text()
    start = text.index("base64,") + len("base64,")
    broken = tmp_path / "broken.html"
    broken.write_text(text[:start] + "AAAA" + text[start + 4 :])  # the PNG signature is gone
    _, check = browser_check(broken, tmp_path)
    assert check["broken"] == ["sft curves"]


@pytest.mark.ray
@pytest.mark.vllm
@pytest.mark.e2e
@pytest.mark.slow
def test_rlhf_report_shows_an_interrupted_paused_stage_and_its_monitor_events(
    run_dir, tmp_path, capsys
):
    """A copy of the run as a kill would leave it: RL without done.json, its last line cut
    short, no summary.json; the monitor logged events and paused the stage."""
    copy = tmp_path / "r"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("model", "tensorboard", "base"))
    (copy / "summary.json").unlink()
    (copy / "report.html").unlink()
    (copy / "rl" / "done.json").unlink()
    event = {
        "rule": "kl",
        "action": "pause",
        "step": 3,
        "values": {"kl/mean_per_sequence": 9.5},
        "message": "KL per sequence 9.5 > monitor.kl.max_kl = 5.0",
        "config_key": "monitor.kl.max_kl",
        "threshold": 5.0,
        "observed": 9.5,
    }
    with open(copy / "rl" / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"event": "monitor", "time": 1.7e9, "data": event}) + "\n")
        fh.write('{"step": 4, "rl/reward/sco')  # killed mid-line
    (copy / "rl" / "paused.json").write_text(json.dumps({**event, "resume": "re-run"}))
    assert main(["report", str(copy)]) == 0
    assert capsys.readouterr().out.strip() == str(copy / "report.html")
    text = (copy / "report.html").read_text()
    assert "paused by the monitor" in text and "<h3>paused.json</h3>" in text
    assert "1 unreadable line(s)" in text
    assert "<h3>Monitor events</h3>" in text and "monitor.kl.max_kl" in text
    assert "no summary.json" in text
    assert text.count("<img ") == 3  # the curves of what was logged are still drawn


def test_rlhf_report_on_a_folder_that_is_not_a_run_is_an_error_naming_it(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path}: not a run folder")
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'nowhere'}: no such folder\n"


def test_a_report_that_fails_is_printed_and_does_not_fail_the_run(tmp_path, capsys):
    from rlhf.driver import write_report

    write_report(tmp_path)  # not a run: build_report raises, write_report does not
    assert "warning: report.html not written: ReportError" in capsys.readouterr().out
    assert not (tmp_path / "report.html").exists()


def test_metrics_keep_the_last_line_of_a_step_logged_twice_and_count_broken_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [
        {"event": "data", "time": 0, "data": {"skipped": 0}},
        {"step": 1, "sft/loss": 2.0},
        {"step": 2, "sft/loss": 1.5},
        {"step": 2, "sft/loss": 1.4},  # a resumed stage re-logs step 2
        {"step": 3, "sft/loss": "nan"},  # the writer's spelling of a non-finite value
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + '\n{"step": 4, "sf')
    rows, events, bad = read_metrics(path)
    assert [(r["step"], r["sft/loss"]) for r in rows] == [(1, 2.0), (2, 1.4), (3, "nan")]
    assert [e["event"] for e in events] == ["data"] and bad == 1


def test_evaluation_keys_become_a_policy_table_and_a_comparison_table():
    ev = {
        "eval/num_prompts": 400,
        "eval/sft_accuracy": 0.9275,
        "eval/sft_sampled_accuracy": 0.89,
        "eval/rl_accuracy": 0.94,
        "eval/rl_sampled_accuracy": 0.91,
        "eval/rl_vs_sft_fixed": 11,
        "eval/rl_vs_sft_broken": 6,
        "eval/rl_vs_sft_greedy_p": 0.33,
        "eval/rl_vs_sft_win_rate_exact": 0.506,
        "eval/rl_vs_sft_sampled_p": 0.002,
        "eval/safety_refusal_rate": 0.5,  # a key this report does not know
    }
    per_policy, header, compared, rest = evaluation_tables(ev)
    assert per_policy == [["sft", 0.9275, 0.89], ["rl", 0.94, 0.91]]
    assert header == [
        "policy",
        "against",
        "fixed",
        "broken",
        "greedy p (McNemar)",
        "sampled p (Wilcoxon)",
        "win rate (exact match)",
    ]
    # p = 0.002 is marked as significant, 0.33 is not
    assert compared == [["rl", "sft", 11, 6, 0.33, (0.002, "sig"), 0.506]]
    assert rest == [["eval/safety_refusal_rate", 0.5]]


def test_a_nested_data_report_becomes_a_matrix_per_level():
    report = {
        "train": {"files": {"a.jsonl": {"read": 10, "used": 5}}, "samples": 5, "skipped": 0},
        "eval": {"files": {"b.jsonl": {"read": 4, "used": 4}}, "samples": 4, "skipped": 0},
    }
    out = data_tables(report)
    # one row per split with its counts, then one row per split and file
    assert "<td>train</td><td>5</td><td>0</td>" in out
    assert "<td>eval › b.jsonl</td><td>4</td><td>4</td>" in out


def test_non_finite_metrics_are_drawn_as_gaps_and_listed_as_they_are(tmp_path):
    stage = tmp_path / "sft"
    stage.mkdir()
    rows = [
        {"step": 1, "sft/loss": 2.0},
        {"step": 2, "sft/loss": "inf"},
        {"step": 3, "sft/loss": "nan", "sft/eval_loss": 1.0},
    ]
    (stage / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    text = build_report(tmp_path).read_text()
    assert "partial: no done.json" in text and "loss nan" in text  # the last value, as logged
    assert text.count('<img alt="sft curves"') == 1
