"""The Training and Samples sections, both read from runs/stageN/: the loss curve and final state of each
stage, and its latest sample grid with the prompts it was drawn from (one collect for the two). Every file is
read through unicap.storage, so runs/ in a bucket reads as on a local disk."""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Mapping

import yaml
from PIL import Image

from unicap.config import ConfigError
from unicap.contract import manifest
from unicap.report import plots
from unicap.report.images import image_inline
from unicap.report.markup import Section, esc, figure, num, section_head, table
from unicap.report.run_folder import RunFolder, empty_section, how_to, read_json, stem
from unicap.storage import Location

SAMPLING_KEY = "unicap_sampling"  # train.sample.SAMPLING_KEY (the report does not import the trainer)
MAX_INLINE_SIDE = 1536  # sample grids are shrunk to this before they are inlined
SAMPLE_WIDTH = 640  # px: sample grids narrower than this are enlarged (pixelated) to it

# ---------------------------------------------------------------- collect


def _step_of(grid: Location) -> int:
    m = re.search(r"(\d+)", stem(grid))
    return int(m.group(1)) if m else -1


def read_metrics(loc: Location) -> tuple[list[int], list[float], int]:
    """(steps, losses, lines that are not a step's JSON) of a metrics.jsonl; steps without a finite loss
    are left out."""
    steps: list[int] = []
    losses: list[float] = []
    bad_lines = 0
    for line in loc.read_bytes().decode("utf-8", errors="replace").splitlines():
        try:
            m = json.loads(line)
            step, loss = int(m["step"]), m.get("loss")
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            bad_lines += bool(line.strip())
            continue
        if isinstance(loss, int | float) and math.isfinite(loss):
            steps.append(step)
            losses.append(float(loss))
    return steps, losses, bad_lines


def _read_yaml(loc: Location) -> dict:
    """A YAML file's mapping (as unicap.config.read_yaml reads a local one)."""
    try:
        data = yaml.safe_load(loc.read_bytes().decode("utf-8", errors="replace")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{loc}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{loc}: the top level must be a mapping")
    return data


def _sample_prompts(d: Location, state: dict | None) -> list[str]:
    """run.sample_prompts of the config saved in the final state, else of the stage's config.yaml."""
    run_cfg = ((state or {}).get("config") or {}).get("run")
    if run_cfg is None and d.join("config.yaml").is_file():
        run_cfg = _read_yaml(d.join("config.yaml")).get("run")
    return [str(p) for p in (run_cfg or {}).get("sample_prompts") or []]


def grid_sampling(data: bytes) -> dict | None:
    """The sampler settings a grid PNG records (train.sample.SAMPLING_KEY, a text chunk), or None."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            text = (getattr(im, "text", None) or {}).get(SAMPLING_KEY)
        value = json.loads(text) if text else None
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def sampling_line(sampling: Mapping | None) -> str:
    """One sentence naming a grid's sampler settings."""
    if not sampling:
        return "Sampler settings not recorded (a grid drawn before they were)."
    cache = sampling.get("cache_threshold") or 0
    cached = f"step cache threshold {cache:g} ({sampling.get('cache')})" if cache else "no step cache"
    evals = sampling.get("evaluations")
    return (
        f"Sampler: {sampling.get('solver')}, {sampling.get('steps')} steps, {cached}, guidance "
        f"{sampling.get('cfg_scale')}; {evals} transformer evaluations per image "
        f"(<code>unicap sample {esc(sampling.get('args', ''))}</code> redraws with these)."
    )


def read_stage(d: Location) -> dict:
    """One stage's run folder: the loss curve, the final state, the latest sample grid that decodes and its
    prompts, and what is missing."""
    metrics = d.join("metrics.jsonl")
    missing: list[str] = []
    has_metrics = metrics.is_file()
    steps, loss, bad_lines = read_metrics(metrics) if has_metrics else ([], [], 0)
    if not has_metrics:
        missing.append(f"{metrics} (the trainer writes one line per step)")
    state_file = d.join("final", "state.json")
    state = read_json(state_file)
    if state is None:
        missing.append(f"{state_file} (written when the stage finishes)")
    info = {"steps": steps, "loss": loss, "bad_lines": bad_lines, "state": state, "sample": None, "sample_step": None}
    info["sampling"] = None
    prompts = _sample_prompts(d, state)
    samples = d.join("samples")
    grids = sorted((g for g in samples.files(".png") if g.name.startswith("step-")), key=_step_of)
    info.update(sample_steps=[_step_of(g) for g in grids], prompts=prompts, missing=missing)
    for grid in reversed(grids):  # the latest step that decodes
        data = grid.read_bytes()
        inlined = image_inline(data, MAX_INLINE_SIDE, keep_png=True)
        if inlined:
            info["sample"], info["sample_width"], _ = inlined
            info["sample_step"] = _step_of(grid)
            info["sampling"] = grid_sampling(data)
            break
    if info["sample"] is None:
        missing.append(f"sample grids in {samples} (run.sample_every, and at the end)")
    return info


def collect_training(run: RunFolder) -> dict:
    """Per stage: the loss curve (metrics.jsonl), the final state, the latest sample grid and its prompts."""
    sec = empty_section(stages={})
    for stage in manifest.STAGES:
        d = run.runs.join(stage)
        if d.is_dir():
            sec["stages"][stage] = read_stage(d)
        else:
            sec["missing"].append((f"{d}", how_to(run)["runs"].replace("stage1 stage2 stage3", stage)))
    return sec


# ---------------------------------------------------------------- render: training

STATE_KEYS = ("step", "samples_seen", "skipped_samples", "skipped_steps", "world_size", "zero_stage")
HEAD = ["stage", "steps", "samples seen", "skipped samples", "skipped steps", "ranks", "ZeRO", "loss first → last"]


def training_body(r: Mapping) -> str:
    sec = r["training"]
    out = section_head(sec)
    stages = sec.get("stages") or {}
    rows = []
    for stage, info in stages.items():
        st = info.get("state") or {}
        loss = info.get("loss") or []
        curve = f"{loss[0]:.3f} → {loss[-1]:.3f}" if loss else "–"
        rows.append([esc(stage), *(num(st.get(k)) for k in STATE_KEYS), curve])
        for m in info.get("missing") or []:
            if "samples" not in m:
                out += f'<div class="missing"><b>{esc(stage)}:</b> missing {esc(m)}.</div>'
        if info.get("bad_lines"):
            bad = f"{info['bad_lines']} lines of metrics.jsonl are not JSON; skipped."
            out += f'<div class="note">{esc(stage)}: {bad}</div>'
    if rows:
        out += table(HEAD, rows, num_cols=range(1, len(HEAD)))
    return out + figure(plots.loss_curves(stages), "training loss per stage")


TRAINING_LEAD = (
    "Next-DiT's flow-matching loss at every logged step (<code>runs/stageN/metrics.jsonl</code>); "
    "each stage starts from the previous one's weights."
)
TRAINING = Section("training", "Training", "Training loss per stage", TRAINING_LEAD, training_body)

# ---------------------------------------------------------------- render: samples

PROMPTS_LEGEND = "Prompts from the run's config (<code>run.sample_prompts</code>), one per column."


def _sample_grid(stage: str, info: Mapping) -> str:
    """A stage's latest grid, small grids enlarged to SAMPLE_WIDTH, with its prompts one per column."""
    prompts = info.get("prompts") or []
    natural = int(info["sample_width"])
    shown = natural if natural >= SAMPLE_WIDTH else min(SAMPLE_WIDTH, natural * 4)  # small grids enlarged
    pixelated = ' style="image-rendering:pixelated"' if shown > natural else ""
    labels = "".join(f"<div>{esc(p)}</div>" for p in prompts)
    columns = f"grid-template-columns:repeat({max(len(prompts), 1)}, 1fr)"
    grid = f'<div class="prompts" style="{columns}">{labels}</div>' if prompts else ""
    img = f'<img src="{info["sample"]}" alt="{esc(stage)} samples"{pixelated}>'
    steps = info.get("sample_steps") or []
    return (
        f"<h3>{esc(stage)} · step {esc(info['sample_step'])}</h3>"
        f'<figure style="max-width:{shown}px">{img}{grid}</figure>'
        f'<p class="legend">{len(steps)} grid(s) saved; the latest shown. {PROMPTS_LEGEND} '
        f"{sampling_line(info.get('sampling'))}</p>"
    )


def samples_body(r: Mapping) -> str:
    stages = r["training"].get("stages") or {}
    out = section_head({"missing": [m for m in r["training"].get("missing") or []]})
    for stage, info in stages.items():
        if info.get("sample"):
            out += _sample_grid(stage, info)
        else:
            why = esc(", ".join(info.get("missing") or []))
            out += f'<div class="missing"><b>{esc(stage)}:</b> no sample grid ({why}).</div>'
    return f'<div class="samples">{out}</div>'


SAMPLES_LEAD = "Images generated from fixed prompts with each stage's EMA weights (<code>runs/stageN/samples/</code>)."
SAMPLES = Section("samples", "Samples", "Sample grids per stage", SAMPLES_LEAD, samples_body)
