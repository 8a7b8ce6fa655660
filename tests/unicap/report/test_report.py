"""unicap report: every section from a small run folder built here, missing parts named (never a crash),
model output escaped, --truth scored as `unicap eval-captions` scores it, the page in headless Chromium, and
the same folder in a bucket (moto's S3 server) giving the same page."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from datagen import answer_key
from datagen.synth import synth
from pipelines.stages import select_stages
from unicap.atomic import visible_parquet_files, write_json, write_parquet
from unicap.cli import main as unicap
from unicap.contract import caption as caption_record
from unicap.contract import scores as score_contract
from unicap.report import collect
from unicap.report.page import NAV

pytest_plugins = ["tests.s3_server"]  # the fixtures s3_server, bucket, s3

UNICAP = str(Path(sys.executable).with_name("unicap"))
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = (
    "--no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking "
    "--disable-component-update --disable-sync"
).split()
# model output that would be markup if it reached the page unescaped
HOSTILE = '</td></table><script>alert("caption")</script><img id="pwned" src=x onerror="alert(1)"> & \'"'
HOSTILE_DETAIL = '<b id="pwned-detail">bold</b> no CJK in <iframe src="javascript:alert(2)">'
HOSTILE_PROMPT = '<svg onload="alert(3)">a red circle</svg>'
ZH_PROMPT = "白色背景上的两个蓝色正方形"
ATTRS = ["background", "colour", "shape", "count", "position"]


def png_bytes(size: tuple[int, int], colour: tuple[int, int, int]) -> bytes:
    im = Image.new("RGB", size, colour)
    im.paste((255, 255, 255), (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def write_captions(truth_dir: Path, out: Path) -> None:
    """The answer key as the run's captions, with a hostile caption, a partial row and a failed row."""
    for i, f in enumerate(visible_parquet_files(truth_dir)):
        rows = pq.read_table(f).to_pylist()
        for r in rows:
            r.update(model="stand-in", engine="test", prompt_version="unicap-v1")
        if i == 0:
            rows[0]["caption_short_en"] = HOSTILE  # an ok row: shown in the gallery
            rows[1].update(
                status="partial",
                caption_long_zh=None,
                error=f"wrong_language: caption_long_zh: {HOSTILE_DETAIL}",
            )
            no_captions = dict.fromkeys(caption_record.caption_columns(), None)
            rows[2].update(status="failed", error="undecodable_image: truncated: pixel data ends early", **no_captions)
        table = caption_record.to_table(rows)
        caption_record.validate(table)
        write_parquet(table, out / f.name)
    summary = {"rows": 24, "shards": 2, "status": {"ok": 22, "partial": 1, "failed": 1}}
    summary["failures_by_reason"] = {"wrong_language": 1, "undecodable_image": 1}
    summary["last_run"] = {"model": "stand-in <i>model</i>"}
    write_json(summary, out / "_summary.json")


def write_scores(captions: Path, out: Path) -> None:
    """Score files against unicap.contract.scores: random CLIP and aesthetic scores, the captions' statuses."""
    rng = np.random.default_rng(0)
    levels, languages = ("long", "medium", "short"), ("en",)
    clip_columns = [score_contract.clip_column(lv, "en") for lv in levels]
    for f in visible_parquet_files(captions):
        rows = []
        for r in pq.read_table(f).to_pylist():
            w, h = r["width"], r["height"]
            best = r["caption_short_en"] == HOSTILE  # ranked first: the gallery shows it
            aesthetic = 9.0 if best else float(rng.normal(5, 1))  # drawn before the CLIP scores (seeded order)
            clip = {c: 0.5 if best else float(rng.uniform(0.1, 0.4)) for c in clip_columns}
            row = {"key": r["key"], "shard": r["shard"], "width": w, "height": h, "min_side": min(w, h)}
            row.update(aspect_ratio=max(w, h) / min(w, h), sha256=r["sha256"], source=r["source"])
            row.update(caption_status=r["status"], caption_levels_ok="long,medium,short,tags", decode_error=None)
            rows.append({**row, "aesthetic": aesthetic, "clip_model": "test-clip", **clip})
        table = pa.Table.from_pylist(rows, schema=score_contract.score_schema(levels, languages))
        score_contract.validate(table)
        write_parquet(table, out / f.name)
    write_json({"rows": 24, "status": {"ok": 22, "partial": 1, "failed": 1}}, out / "_summary.json")


def write_training(runs: Path, prompts: list[str]) -> None:
    for k, stage in enumerate(("stage1", "stage2", "stage3")):
        d = runs / stage
        (d / "samples").mkdir(parents=True)
        (d / "final").mkdir()
        lines = [json.dumps({"step": s, "loss": 1.0 / (s + k + 1), "grad_norm": 0.5, "lr": 1e-3}) for s in range(1, 31)]
        (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        state = {"step": 30, "samples_seen": 240, "skipped_samples": 0, "skipped_steps": 0}
        state.update(world_size=2, zero_stage=2, config={"run": {"sample_prompts": prompts}})
        (d / "final" / "state.json").write_text(json.dumps(state))
        (d / "config.yaml").write_text("run:\n  steps: 30\n")
        for step in (10, 30):  # the latest grid is the one shown
            (d / "samples" / f"step-{step:08d}.png").write_bytes(
                png_bytes((64 * len(prompts), 64), (40 * step % 255, 90, 160))
            )


def write_adherence(d: Path, prompt: str, language: str = "en") -> None:
    (d / "stage3").mkdir(parents=True)
    (d / "truth").mkdir()
    (d / "stage3" / "00000.png").write_bytes(png_bytes((64, 64), (200, 30, 30)))
    (d / "truth" / "00000.png").write_bytes(png_bytes((64, 64), (30, 200, 30)))
    prompts = {"n": 8, "level": "short", "language": language, "truth": "heldout"}
    rows = {"truth images": dict.fromkeys(ATTRS, 1.0), "stage1": {**dict.fromkeys(ATTRS, 0.125), "position": None}}
    rows["stage3"] = dict.fromkeys(ATTRS, 0.75)
    facts = {row: dict.fromkeys(ATTRS, 8) for row in rows}
    verdicts = {"background": True, "colour": False, "shape": True, "count": None, "position": False}
    drawn = {"weights": "stage3", "prompt": prompt, "image": "stage3/00000.png", "truth_image": "truth/00000.png"}
    escaping = {"weights": "stage3", "prompt": "escapes the folder", "image": "../../../etc/passwd"}
    examples = [{**drawn, "verdicts": verdicts}, {**escaping, "truth_image": "truth/00000.png", "verdicts": {}}]
    data = {"version": 1, "size": [64, 64], "prompts": prompts, "attributes": ATTRS, "rows": rows, "facts": facts}
    data["examples"] = examples
    (d / "adherence.json").write_text(json.dumps(data))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run folder in the demo's layout, every part present, small: 24 pool and 8 held-out images."""
    root = tmp_path_factory.mktemp("run")
    synth(str(root / "data"), 24, seed=3, shard_size=12)
    write_captions(root / "data" / "truth", root / "captions")
    write_scores(root / "captions", root / "scores")
    rules = {"stage2": {"min_side": 256}}
    select_stages(root / "scores", root / "stages", "1.0", "0.5", "0.5", rules=rules, shards_dir=str(root / "data"))
    synth(str(root / "heldout"), 8, seed=9, shard_size=8)
    shutil.copytree(root / "heldout" / "truth", root / "heldout_captions")
    write_json(
        answer_key.evaluate_folder(root / "heldout_captions", root / "heldout"),
        root / "heldout_captions" / "_eval.json",
    )
    write_training(root / "runs", ["a red circle on a white background", "两个蓝色的正方形", HOSTILE_PROMPT])
    write_adherence(root / "adherence", HOSTILE_PROMPT)
    write_adherence(root / "adherence_zh", ZH_PROMPT, language="zh")  # a second prompt language, as the demo's
    return root


def report(data: Path, out: Path, *extra: str, expect: int = 0) -> tuple[str, subprocess.CompletedProcess]:
    """`unicap report` in this process (unicap.cli.main): the page and the command's outcome."""
    argv = ["report", "--data", str(data), "--out", str(out), *extra]
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = unicap(argv)
    r = subprocess.CompletedProcess(argv, rc, stdout.getvalue(), stderr.getvalue())
    assert r.returncode == expect, r.stderr
    return (out.read_text(encoding="utf-8") if out.exists() else ""), r


class Markup(HTMLParser):
    """Every element and attribute of a page, and its visible text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def parse(page: str) -> Markup:
    m = Markup()
    m.feed(page)
    return m


def words(page: str) -> str:
    """The page's text, whitespace collapsed."""
    return " ".join(" ".join(parse(page).text).split())


@pytest.fixture(scope="module")
def full_page(run_dir, tmp_path_factory) -> str:
    """The page of the complete run folder, through the installed `unicap` command."""
    out = tmp_path_factory.mktemp("out") / "report.html"
    r = subprocess.run([UNICAP, "report", "--data", str(run_dir), "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0 and "0 missing part(s)" in r.stdout, r.stdout + r.stderr
    return out.read_text(encoding="utf-8")


def test_every_section_is_there_with_its_content(full_page, run_dir):
    for sid, _ in NAV:
        assert f'<section id="{sid}">' in full_page, sid
    assert "Missing:" not in full_page and "Could not read" not in full_page
    text = words(full_page)
    funnel = json.loads((run_dir / "stages" / "funnel.json").read_text())
    assert funnel["stage1_rules"]["caption_not_ok"]["removed"] == 2  # the partial and the failed row
    assert "caption status not one of: ok (partial: 1, failed: 1)" in text
    assert "images in the shards" in text and "stage3" in text
    assert "wrong_language" in text and "undecodable_image" in text  # failure reasons, with examples
    assert "held-out synthetic set" in text and "goal met" in text  # the _eval.json table
    assert "Held-out synthetic images" in text
    assert "0.500 → 0.032" in text  # stage1's loss, first -> last logged step
    assert "stage3 · step 30" in text  # the latest sample grid
    assert "truth images" in text and "0.75" in text  # adherence table
    # both adherence folders, each under its own heading: English and the demo's Chinese prompts
    assert "adherence/ · short en prompts" in text and "adherence_zh/ · short zh prompts" in text
    assert ZH_PROMPT in text
    assert "answer key:" in text  # the synthetic pool's truth beside its captions
    imgs = [a for tag, a in parse(full_page).tags if tag == "img"]
    assert len(imgs) >= 8 + 4 + 3 + 2 * 2 + 4  # gallery, held-out gallery, sample grids, adherence pairs, figures
    assert all(a["src"].startswith("data:image/") for a in imgs)  # self-contained
    assert not any(tag in ("script", "link", "iframe") for tag, _ in parse(full_page).tags)


def test_hostile_model_output_stays_text(full_page):
    tags = parse(full_page).tags
    assert not [t for t, a in tags if t in ("script", "iframe", "svg", "i") or a.get("id", "").startswith("pwned")]
    assert not [(t, k) for t, a in tags for k in a if k.startswith("on")]  # no event handler attributes
    assert HOSTILE not in full_page and HOSTILE_DETAIL not in full_page and HOSTILE_PROMPT not in full_page
    text = "".join(parse(full_page).text)
    for hostile in (HOSTILE, HOSTILE_DETAIL, HOSTILE_PROMPT, "stand-in <i>model</i>"):
        assert hostile in text  # shown as the text it is
    # the adherence example whose image path leaves the adherence folder is shown without it
    assert "escapes the folder" in text and full_page.count("image missing") == 2  # once per adherence folder


@pytest.mark.parametrize(
    "part, says",
    [
        ("data", "unicap ingest URLS --out"),
        ("captions", "unicap caption --input"),
        ("heldout_captions", "unicap eval-captions --captions"),
        ("scores", "unicap score --input"),
        ("stages", "unicap stages --scores"),
        ("runs", "make stage1"),
        ("adherence", "unicap adherence"),
    ],
)
def test_a_missing_part_is_named_with_its_command(run_dir, tmp_path, part, says):
    d = tmp_path / "run"
    shutil.copytree(run_dir, d)
    shutil.rmtree(d / part)
    page, r = report(d, tmp_path / "r.html")
    assert "Missing:" in page and says in words(page), part
    assert "missing part(s)" in r.stdout and "warning" not in r.stderr
    for sid, _ in NAV:
        assert f'<section id="{sid}">' in page


def test_an_empty_folder_and_unreadable_files_make_a_page(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    page, _ = report(empty, tmp_path / "empty.html")
    assert page.count("Missing:") >= 6 and "unicap synth --out" in page
    broken = tmp_path / "broken"
    (broken / "stages").mkdir(parents=True)
    (broken / "stages" / "funnel.json").write_text("{not json")
    (broken / "captions").mkdir()
    (broken / "captions" / "00000.parquet").write_bytes(b"PAR1 not parquet")
    page, r = report(broken, tmp_path / "broken.html")
    assert "Could not read this part" in page and "funnel.json: not valid JSON" in page
    assert "warning: section captions" in r.stderr  # told on the terminal too
    _, bad = report(tmp_path / "nope", tmp_path / "x.html", expect=2)
    assert "not a folder" in bad.stderr and not (tmp_path / "x.html").exists()


def test_truth_scores_the_captions_as_eval_captions_does(run_dir, tmp_path):
    ours = collect.evaluate_against_answer_key(run_dir / "captions", run_dir / "data")
    assert ours == answer_key.evaluate_folder(run_dir / "captions", run_dir / "data")
    assert ours["status"] == {"ok": 22, "partial": 1, "failed": 1} and not ours["goal"]["met"]
    page, _ = report(run_dir, tmp_path / "pool.html", "--truth", str(run_dir / "data" / "truth"))
    text = words(page)
    assert "this run's captions goal not met" in text and "ok share 0.917 < 0.95" in text
    assert "held-out synthetic set goal met" in text  # its _eval.json, the held-out keys are not in this key
    # the held-out set's answer key scores the held-out captions here; the pool's keys are not in it
    page, _ = report(run_dir, tmp_path / "heldout.html", "--truth", str(run_dir / "heldout"))
    text = words(page)
    assert f"{run_dir / 'heldout_captions'} against --truth {run_dir / 'heldout'}" in text
    assert "none of its keys is in the answer key given with --truth" in text
    assert f"--truth {run_dir / 'data'} scores it" in text
    _, bad = report(run_dir, tmp_path / "x.html", "--truth", str(run_dir / "runs"), expect=2)
    assert "no answer key there" in bad.stderr


CJK_ALIKE = """() => {
    const family = getComputedStyle(document.body).fontFamily;
    const draw = ch => {
        const c = document.createElement('canvas');
        c.width = c.height = 48;
        const g = c.getContext('2d');
        g.font = `40px ${family}`;
        g.fillText(ch, 2, 40);
        return c.toDataURL();
    };
    return draw('两') === draw('蓝');
}"""


def test_the_page_renders_in_headless_chromium(full_page, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run tools/ensure_chromium.sh (make test runs it before pytest)")
    from playwright.sync_api import sync_playwright

    path = tmp_path / "report.html"
    path.write_text(full_page, encoding="utf-8")
    problems: list[str] = []
    with sync_playwright() as p:
        options = {"executable_path": CHROMIUM, "args": CHROMIUM_ARGS, "headless": True}
        viewport = {"width": 1280, "height": 900}
        browser = p.chromium.launch_persistent_context(str(tmp_path / "profile"), viewport=viewport, **options)
        try:
            page = browser.new_page()
            page.on(
                "console",
                lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None,
            )
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))
            page.goto(path.as_uri(), wait_until="load")
            page.evaluate("document.querySelectorAll('details').forEach(d => d.open = true)")
            page.wait_for_function("[...document.images].every(i => i.complete)")
            images = page.evaluate("[...document.images].map(i => [i.alt, i.naturalWidth])")
            assert len(images) >= 20 and all(w > 0 for _, w in images), [a for a, w in images if w == 0]
            assert page.locator("#pwned").count() == 0
            assert page.locator("section#gallery").inner_text().count(HOSTILE.strip()) >= 1
            # Chinese captions show as glyphs, not as a missing font's boxes: two different characters drawn in
            # the page's own font differ (missing-glyph boxes are all alike)
            assert not page.evaluate(CJK_ALIKE), "Chinese renders as boxes: no CJK font (tools/ensure_chromium.sh)"
            shot = tmp_path / "report.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert problems == []
    im = Image.open(shot).convert("RGB")
    assert im.height > 4000  # every section laid out, not an empty page
    colours = im.resize((64, im.height // 20)).getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 50
    print(f"screenshot: {shot}")


# ---------------------------------------------------------------- object storage


def without_time(page: str) -> str:
    return re.sub(r"generated \d{4}-\d\d-\d\d \d\d:\d\d UTC", "generated (time)", page)


def test_the_page_can_be_written_to_a_bucket(run_dir, tmp_path, s3):
    from unicap import storage

    local, _ = report(run_dir, tmp_path / "report.html")
    assert unicap(["report", "--data", str(run_dir), "--out", f"{s3}/pages/report.html"]) == 0
    assert without_time(storage.resolve(f"{s3}/pages/report.html").read_text()) == without_time(local)


def upload(folder: Path, uri: str) -> None:
    """Every file under `folder` to the same relative key under `uri` (Location.write_bytes per file)."""
    from unicap import storage

    root = storage.resolve(uri)
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            root.join(f.relative_to(folder).as_posix()).write_bytes(f.read_bytes())


def test_a_run_folder_in_a_bucket_gives_the_same_page(run_dir, tmp_path, s3):
    """The same folder on disk and in a bucket (--data, --truth and --out URIs): the same page, but for the
    folder's name; the local copy is deleted before the bucket's page is built, so nothing comes from it."""
    from unicap import storage
    from unicap.report.images import thumbnails
    from unicap.report.run_folder import parquet_files, stem

    local_dir, bucket_dir = tmp_path / "run", f"{s3}/run"
    shutil.copytree(run_dir, local_dir)
    truth = [str(local_dir / "data"), str(local_dir / "heldout" / "truth")]
    local, _ = report(local_dir, tmp_path / "report.html", *(a for t in truth for a in ("--truth", t)))
    upload(local_dir, bucket_dir)
    shutil.rmtree(local_dir)
    bucket_truth = [t.replace(str(local_dir), bucket_dir) for t in truth]
    argv = ["report", "--data", bucket_dir, "--out", f"{s3}/pages/report.html"]
    assert unicap([*argv, *(a for t in bucket_truth for a in ("--truth", t))]) == 0
    remote = storage.resolve(f"{s3}/pages/report.html").read_text()
    assert bucket_dir in remote and str(local_dir) not in remote
    assert without_time(remote) == without_time(local.replace(str(local_dir), bucket_dir))
    text = words(remote)
    assert "Missing:" not in remote and "Could not read" not in remote
    assert "this run's captions goal not met" in text and "held-out synthetic set goal met" in text
    imgs = [a for tag, a in parse(remote).tags if tag == "img"]
    assert len(imgs) >= 8 + 4 + 3 + 2 * 2 + 4 and all(a["src"].startswith("data:image/") for a in imgs)
    assert "image not found in the shards" not in remote and remote.count("image missing") == 2
    # the images are the bucket's bytes (the stage manifests' `location` still names the first local folder)
    shards = storage.resolve(f"{bucket_dir}/data")
    index = parquet_files(shards)[0]
    keys = index.read_parquet(columns=["key"]).column("key").to_pylist()[:3]
    assert all(thumbnails(shards, {stem(index): keys}, 64).values())


def test_a_missing_bucket_is_a_one_line_error(run_dir, s3, tmp_path, capsys):
    missing = f"{s3}-missing/run"
    for extra in (["--data", missing], ["--data", str(run_dir), "--truth", missing]):
        assert unicap(["report", *extra, "--out", str(tmp_path / "r.html")]) == 2
        err = capsys.readouterr().err.strip()
        assert "error: " in err and missing.removeprefix("s3://").split("/")[0] in err, err
        assert len(err.splitlines()) == 1, err
        assert not (tmp_path / "r.html").exists()
    # a bucket that is there with no run folder in it: the same one line
    assert unicap(["report", "--data", f"{s3}/nothing-here", "--out", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no such file or folder" in err and len(err.splitlines()) == 1, err
